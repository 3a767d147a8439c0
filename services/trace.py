"""Opt-in timestamps along a request's path, for finding where a first token's time goes.

Once `enable()` has run (a service's `--trace`, or LLMRPC_TRACE=1: services/cli.py), each
`point(name)` prints one line to stderr, `TRACE <unix time, µs> <name>`; otherwise it returns at
once. The services on one host share the clock, so bench/trace_ttft.py lines their logs up with
the client's and prints each hop's median.
"""
from __future__ import annotations

import sys
import time

ENABLED = False


def enable() -> None:
    global ENABLED
    ENABLED = True


def point(name: str) -> None:
    if ENABLED:
        print(f"TRACE {time.time():.6f} {name}", file=sys.stderr, flush=True)
