"""llmrpc beside the seed: mini-sglang's figures from the same GPU run in the same result files, with ratios.

Reads the rows bench/offline.py and bench/latency.py wrote, the last line `RESULT {json}` of
`.anchors/run_minisglang.py`'s output, and bench/startup.py's row if there is one. Writes one file
per benchmark into --out-dir (offline-MODEL.json, latency-MODEL.json: llmrpc's rows, then the seed's
as `"system": "mini-sglang"`), each llmrpc row carrying `vs_seed` (the seed's value, the ratio, and
which direction is better), and prints the table the issue asks for.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from llmrpc.bench.record import write_json

SEED = "mini-sglang"
SEED_COMMIT = "mini-sglang 20fcd7f (shared/anchors)"


def seed_result(log: Path) -> dict:
    """Every `RESULT {json}` line of the log merged, a later line's keys winning (one run per workload may
    write each)."""
    merged: dict = {}
    for line in log.read_text().splitlines():
        if line.startswith("RESULT "):
            merged.update(json.loads(line[len("RESULT "):]))
    return merged


def _load(path: Path | None) -> list[dict]:
    return json.loads(path.read_text()) if path and path.exists() else []


def _seed_row(like: dict, command: str, **values: object) -> dict:
    """The seed's row in llmrpc's layout: same benchmark, model and machine as `like`."""
    keep = ("benchmark", "metric", "model", "tp", "gpu", "hardware", "date")
    return {**{k: like[k] for k in keep if k in like}, "system": SEED, "output_tokens_per_s": None,
            **values, "command": command, "commit": SEED_COMMIT}


def _compare(row: dict, seed: float | None, key: str, better: str) -> None:
    if seed and row.get(key):
        row["vs_seed"] = {"seed": round(seed, 2), "ratio": round(row[key] / seed, 3), "better": better}


def _pick(rows: list[dict], system: str, **match: object) -> dict | None:
    for r in rows:
        if r.get("system") == system and all(r.get(k) == v for k, v in match.items()) and not r.get("error"):
            return r
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the model name the rows carry, e.g. qwen3-0.6b")
    ap.add_argument("--offline", type=Path)
    ap.add_argument("--latency", type=Path)
    ap.add_argument("--startup", type=Path)
    ap.add_argument("--seed-log", type=Path, required=True)
    ap.add_argument("--seed-command", default="python3 .anchors/run_minisglang.py bench/configs/MODEL offline,decode,ttft")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args()
    seed = seed_result(args.seed_log) if args.seed_log.exists() else {}
    command = args.seed_command.replace("MODEL", args.model)
    offline, latency, startup = _load(args.offline), _load(args.latency), _load(args.startup)

    seed_offline = seed.get("offline_tok_s")
    seed_decode = statistics.median(seed["decode_tok_s"]) if seed.get("decode_tok_s") else None
    seed_ttft = statistics.median(seed["ttft_2048_ms"]) if seed.get("ttft_2048_ms") else None
    for r in offline:
        if r.get("system", "").startswith("llmrpc"):
            _compare(r, seed_offline, "output_tokens_per_s", "higher")
    for r in latency:
        if r.get("metric") == "single_stream_decode":
            _compare(r, seed_decode, "output_tokens_per_s", "higher")
        elif r.get("metric") == "ttft_2048":
            _compare(r, seed_ttft, "ttft_ms", "lower")
    if offline and seed_offline:
        offline.append(_seed_row(offline[0], command, output_tokens_per_s=round(seed_offline, 1),
                                 radix_hit_tokens_per_s=round(seed.get("offline_tok_s_radix_hit") or 0, 1)))
    decode_like = next((r for r in latency if r.get("metric") == "single_stream_decode"), None)
    ttft_like = next((r for r in latency if r.get("metric") == "ttft_2048"), None)
    if decode_like and seed_decode:
        latency.append(_seed_row(decode_like, command, output_tokens_per_s=round(seed_decode, 1),
                                 decode_tok_s_all=seed["decode_tok_s"]))
    if ttft_like and seed_ttft:
        latency.append(_seed_row(ttft_like, command, ttft_ms=round(seed_ttft, 2), ttft_all_ms=seed["ttft_2048_ms"]))
    if offline:
        write_json(args.out_dir / f"offline-{args.model}.json", offline)
    if latency:
        write_json(args.out_dir / f"latency-{args.model}.json", latency)

    def cell(row: dict | None, key: str) -> str:
        return "-" if row is None or row.get(key) is None else f"{row[key]:,.1f}"

    def ratio(row: dict | None) -> str:
        return "-" if row is None or "vs_seed" not in row else f"{row['vs_seed']['ratio']:.2f}"

    figures = [
        ("offline (tok/s)", _pick(offline, "llmrpc-stack"), _pick(offline, "llmrpc-engine", overlap=True),
         seed_offline, "output_tokens_per_s"),
        ("single stream (tok/s)", _pick(latency, "llmrpc-stack", metric="single_stream_decode"),
         _pick(latency, "llmrpc-engine", metric="single_stream_decode"), seed_decode, "output_tokens_per_s"),
        ("TTFT 2048 (ms)", _pick(latency, "llmrpc-stack", metric="ttft_2048"),
         _pick(latency, "llmrpc-engine", metric="ttft_2048"), seed_ttft, "ttft_ms"),
    ]
    print(f"\n{args.model:<24}{'stack':>10}{'engine':>10}{'seed':>10}{'stack/seed':>12}{'engine/seed':>12}")
    for name, stack, engine, seed_value, key in figures:
        seed_cell = "-" if seed_value is None else f"{seed_value:,.1f}"
        print(f"{name:<24}{cell(stack, key):>10}{cell(engine, key):>10}{seed_cell:>10}{ratio(stack):>12}"
              f"{ratio(engine):>12}")
    print(f"\nevery row ({'system':<14}{'metric':<22}{'depth':>6}{'k':>4}{'value':>10}{'/seed':>7})")
    for r in offline + latency:
        if "vs_seed" in r:
            key = "ttft_ms" if r.get("metric") == "ttft_2048" else "output_tokens_per_s"
            print(f"          {r['system']:<14}{r.get('metric', 'offline'):<22}{str(r.get('overlap_depth', '')):>6}"
                  f"{str(r.get('decode_steps', 1)):>4}{r[key]:>10,.1f}{r['vs_seed']['ratio']:>7.2f}")
    if startup:
        print(f"{'ready after start (s)':<24}{cell(startup[0], 'ready_s'):>10}{'':>10}{'~25':>10}  (seed: issue 13)")


if __name__ == "__main__":
    main()
