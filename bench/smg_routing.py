"""Cache-aware against round-robin routing through SMG over llmrpc replicas, on one trace of shared prefixes.

For each routing policy this starts N llmrpc replicas (a worker and a scheduler each, on the tiny
random Llama of bench/tiny_model.py, CPU) behind a fresh SMG gateway (`smg launch --worker-urls
grpc://SCHEDULER ...`, PyPI `smg`), replays one Bailian-format trace through the gateway's OpenAI
HTTP with bench/load.py at each time scale, and reports per policy and load: the prefix-cache hit
rate, TTFT p50/p99 and goodput against the SLOs. The trace (written beside the results unless one is
given) has G prompt groups, each a long prefix of hash-id blocks shared by every request of the
group plus a few blocks of its own, groups drawn uniformly, Poisson arrivals. Each replica's KV pool
holds about half of all the prefixes: routed by prefix, each replica needs only its half;
round-robin makes both cycle through all of them.

The gateway's process plumbing (`gateway`, `wait_routable`, `wait_model`) is services/launcher.py's,
shared with `llmrpc serve --replicas` and tests/services/test_smg.py.

    python -m llmrpc.bench.smg_routing --out bench/results/smg-routing-cpu-tiny
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from llmrpc.bench import load
from llmrpc.bench.record import provenance, write_json
from llmrpc.services.cli import COMMAND
from llmrpc.services.launcher import ServiceProcess, find_smg, gateway, wait_model, wait_routable
from llmrpc.services.rpc import free_port

CONTEXT = 2048


# ---- the replicas as processes (the gateway: services/launcher.py) -----------------------------


def replica(log_dir: Path, model: Path, *worker_args: object) -> tuple[ServiceProcess, ServiceProcess]:
    """One model replica: a worker and the scheduler in front of it (start the worker first)."""
    def process(name: str, *argv: object) -> ServiceProcess:
        port = free_port()
        return ServiceProcess(name, [*COMMAND, name, "--port", str(port), *map(str, argv)], f"127.0.0.1:{port}",
                              log_path=log_dir / f"{name}-{port}.log", own_group=True)

    worker = process("worker", "--model", model, "--device", "cpu", *worker_args)
    return worker, process("scheduler", "--workers", worker.target)


# ---- the benchmark ------------------------------------------------------------------------------


def synthesize_trace(path: Path, groups: int, prefix_blocks: int, own_blocks: int, output_len: int,
                     num_requests: int, rate: float, seed: int, block_size: int = 16) -> dict:
    """A Bailian-format trace of `groups` shared prefixes; returns its description."""
    rng = random.Random(seed)
    t, rows = 0.0, []
    for i in range(num_requests):
        group = rng.randrange(groups)
        hash_ids = [group * 10_000 + k for k in range(prefix_blocks)] + [10**8 + i * own_blocks + k
                                                                        for k in range(own_blocks)]
        rows.append({"chat_id": i, "timestamp": round(t, 6), "input_length": len(hash_ids) * block_size,
                     "output_length": output_len, "type": "text", "turn": 1, "hash_ids": hash_ids})
        t += rng.expovariate(rate)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"path": str(path), "groups": groups, "prefix_tokens": prefix_blocks * block_size,
            "own_tokens": own_blocks * block_size, "output_len": output_len, "num_requests": num_requests,
            "rate": rate, "seed": seed, "prefix_working_set_tokens": groups * prefix_blocks * block_size}


def run_policy(policy: str, model: Path, log_dir: Path, args: argparse.Namespace, trace: Path) -> dict:
    """One gateway over fresh replicas; bench/load.py's report of the trace at every time scale."""
    replicas = [replica(log_dir, model, "--max-total-tokens", args.kv_tokens, "--max-running-requests", args.slots)
                for _ in range(args.replicas)]
    schedulers = [s.target for _, s in replicas]
    front = gateway(log_dir, model, schedulers, policy)
    processes = [p for pair in replicas for p in pair]
    try:
        for p in processes:
            p.start()
        for p in processes:
            p.wait_serving()
        front.start()
        wait_routable(front, schedulers)
        wait_model(front)
        return load.main(["--target", front.http, "--api", "http", "--trace", str(trace), "--num-requests", "0",
                          "--time-scale", args.time_scale, "--warmup", str(args.warmup), "--goodput", *args.goodput,
                          "--seed", str(args.seed)])
    finally:
        for p in [front, *reversed(processes)]:
            p.stop()


def plot(result: dict, path: Path) -> None:
    """Hit rate, TTFT p50/p99 and goodput against the offered load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for (policy, report), color in zip(result["policies"].items(), ("#d62728", "#1f77b4", "#2ca02c")):
        levels = report["levels"]
        x = [lv["offered_load"] for lv in levels]
        axes[0].plot(x, [100 * (lv["prefix_cache_hit_rate"] or 0) for lv in levels], "o-", color=color, label=policy)
        axes[1].plot(x, [lv["median_ttft_ms"] for lv in levels], "o-", color=color, label=f"{policy} p50")
        axes[1].plot(x, [lv["p99_ttft_ms"] for lv in levels], "s--", color=color, label=f"{policy} p99")
        axes[2].plot(x, [lv["request_goodput"] for lv in levels], "o-", color=color, label=f"{policy} goodput")
        axes[2].plot(x, [lv["request_throughput"] for lv in levels], ":", color=color, label=f"{policy} throughput")
    axes[0].set_ylim(0, 100)
    slos = ", ".join(f"{k} <= {v:g} ms" for k, v in result["goodput"].items())
    for ax, title, unit in zip(axes, ("prompt tokens served from the prefix cache", "time to first token",
                                      f"requests/s meeting {slos}"), ("%", "ms", "requests/s")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    t = result["trace"]
    fig.suptitle(f"SMG {result['smg_version']} over {result['replicas']} llmrpc replicas ({result['model']}, CPU): "
                 f"{t['groups']} prefixes of {t['prefix_tokens']} tokens, {result['kv_tokens']} KV tokens per replica",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="llmrpc.bench.smg_routing", description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="round_robin,cache_aware")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kv-tokens", type=int, default=10240, help="each replica's KV pool (--max-total-tokens)")
    p.add_argument("--slots", type=int, default=32, help="each replica's --max-running-requests")
    p.add_argument("--trace", default=None, help="a Bailian-format JSONL trace (default: one synthesized)")
    p.add_argument("--groups", type=int, default=16, help="synthesized trace: shared prefixes")
    p.add_argument("--prefix-blocks", type=int, default=64, help="synthesized trace: 16-token blocks per prefix")
    p.add_argument("--own-blocks", type=int, default=4, help="synthesized trace: blocks of each request's own")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=150)
    p.add_argument("--rate", type=float, default=2.5, help="synthesized trace: arrivals per second at time scale 1")
    p.add_argument("--time-scale", default="1,0.5,0.25", help="load levels (bench/load.py --time-scale)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--goodput", nargs="+", default=["ttft:100", "tpot:50"], help="SLOs (bench/load.py --goodput)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json, OUT.png and the synthesized OUT.trace.jsonl")
    args = p.parse_args(argv)

    from llmrpc.bench.tiny_model import DESCRIPTION, build_tiny_llama
    from llmrpc.engine.default_model import ensure_default_model
    from llmrpc.services.cli import default_cache_dir

    with tempfile.TemporaryDirectory(prefix="smg-routing-") as tmp:
        model = build_tiny_llama(Path(tmp) / "tiny-llama", ensure_default_model(default_cache_dir()), CONTEXT)
        trace = Path(args.trace) if args.trace else (Path(args.out).with_suffix(".trace.jsonl") if args.out
                                                     else Path(tmp) / "trace.jsonl")
        described = {"path": str(trace)} if args.trace else synthesize_trace(
            trace, args.groups, args.prefix_blocks, args.own_blocks, args.output_len, args.num_requests,
            args.rate, args.seed)
        reports = {policy: run_policy(policy, model, Path(tmp), args, trace) for policy in args.policies.split(",")}
    import subprocess

    version = subprocess.run([find_smg() or "smg", "--version"], capture_output=True, text=True).stdout.split()
    result = {**provenance("llmrpc.bench.smg_routing", argv), "smg_version": version[-1] if version else "",
              "model": DESCRIPTION, "replicas": args.replicas, "kv_tokens": args.kv_tokens, "slots": args.slots,
              "trace": described, "goodput": load.parse_goodput(args.goodput),
              "policies": {policy: {k: v for k, v in r.items() if k not in ("command", "commit", "hardware", "date")}
                           for policy, r in reports.items()}}
    for policy, report in reports.items():
        for lv in report["levels"]:
            print(f"{policy:>12} {lv['label']:>10} ({lv['offered_load']:.2f} req/s): hit rate "
                  f"{100 * (lv['prefix_cache_hit_rate'] or 0):.0f}%, TTFT p50/p99 {lv['median_ttft_ms']:.0f}/"
                  f"{lv['p99_ttft_ms']:.0f} ms, goodput {lv['request_goodput']:.2f} of "
                  f"{lv['request_throughput']:.2f} req/s")
    if args.out:
        out = Path(args.out)
        write_json(out.with_suffix(".json"), result)
        plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
