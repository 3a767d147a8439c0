"""What every benchmark's JSON records about where it ran: the hardware and the commit."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def hardware(**extra: str) -> dict:
    """This machine's CPU model, core count, Python and platform (plus any `extra` fields)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), **extra,
            "platform": platform.platform()}


def commit() -> str:
    """The checked-out commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
