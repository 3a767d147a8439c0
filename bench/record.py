"""What every benchmark's JSON records about how and where it ran (command, commit, hardware, date), and its writing."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
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


def provenance(module: str, argv: list[str] | None = None, **hardware_extra: str) -> dict:
    """The fields every result JSON starts with: the command that made it, commit, hardware and date."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python -m", module, *args]),
        "commit": commit(),
        "hardware": hardware(**hardware_extra),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, result: object) -> None:
    """Writes `result` as indented JSON, creating the folder; says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
