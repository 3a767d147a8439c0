"""Start-up time of the stack: `llmrpc worker` and `llmrpc scheduler` started together by the launcher
(services/launcher.py, as bench/offline.py's Stack starts them, dummy weights), seconds until every
child serves, with the worker's progress line for each phase (weights, KV pool, kernels, graph capture).

Run it on a warm JIT cache to measure the issue-13 goal (ready <= 30 s for Qwen3-0.6B); the row goes
to --out as JSON (a list of one).
"""
from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from llmrpc.bench.offline import add_engine_args
from llmrpc.bench.record import provenance, write_json

# The engine's phase lines ("weights: ... (1.2 s)") and the worker's ready line.
_PHASE = re.compile(r"llmrpc\.(engine|worker): (.*)$")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    args = ap.parse_args()
    from llmrpc.services.cli import stack_config
    from llmrpc.services.launcher import Launcher
    from llmrpc.services.rpc import free_port

    log_dir = Path(args.log_dir) / "startup"
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmrpc-startup-") as sockets:
        config = stack_config(args, args.model, sockets, scheduler_port=free_port(), worker_port=free_port(),
                              log_level="info")
        launcher = Launcher(config, log_dir=log_dir)
        t0 = time.perf_counter()
        launcher.start()
        ready_s = time.perf_counter() - t0
        launcher.stop()
    worker_log = launcher.child("worker rank 0").log_path
    phases = [m.group(2) for line in worker_log.read_text().splitlines() if (m := _PHASE.search(line))]
    print(f"stack (worker + scheduler, {Path(args.model).name}) ready in {ready_s:.1f} s; the worker's lines:")
    for p in phases:
        print(f"  {p}")
    if args.out:
        write_json(Path(args.out), [{"benchmark": "startup", "model": Path(args.model).name, "system": "llmrpc-stack",
                                     "ready_s": round(ready_s, 2), "phases": phases,
                                     **provenance("llmrpc.bench.startup")}])


if __name__ == "__main__":
    main()
