"""docker/worker-group.sh: a replica's tensor-parallel ranks as one container, which lives and dies as one.

Two real CPU ranks (gloo) of a tiny model: both serve; killing one ends the other and the
group exits with the dead rank's status (so the kubelet restarts the ranks together);
SIGTERM (a pod's deletion) stops both and exits 143.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from llmrpc.bench.tiny_model import build_tiny_llama
from llmrpc.services.client import check_health
from llmrpc.services.rpc import free_port
from tests.docker.topology import PROGRAMS, local_env


def _two_free_ports() -> int:
    while True:
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
                return base
            except OSError:
                continue


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture
def group(tmp_path: Path, default_model_dir: Path):
    """The group of 2 ranks, serving; yields (process, base port, rank pids)."""
    model = build_tiny_llama(tmp_path / "tiny", default_model_dir, 512)
    base = _two_free_ports()
    argv = [*PROGRAMS["llmrpc-worker-group"], "2", str(base), str(tmp_path), "--host", "127.0.0.1",
            "--model", str(model), "--device", "cpu", "--max-total-tokens", "2048",
            "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    log = open(tmp_path / "group.log", "wb")
    process = subprocess.Popen(argv, env=local_env({}, {}), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not all(check_health(f"127.0.0.1:{base + r}", timeout=1.0) for r in (0, 1)):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "group.log").read_text()
            time.sleep(0.5)
        assert sorted(p.name for p in tmp_path.glob("worker-*.sock")) == ["worker-0.sock", "worker-1.sock"]
        yield process, base, _children(process.pid)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_a_dead_rank_takes_the_group_down(group) -> None:
    process, base, ranks = group
    assert len(ranks) == 2
    rank1 = next(pid for pid in ranks if f"--port\x00{base + 1}\x00" in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(rank1, signal.SIGKILL)
    assert process.wait(30) == 128 + signal.SIGKILL
    assert all(_gone(pid) for pid in ranks)
    assert not check_health(f"127.0.0.1:{base}", timeout=1.0)


def test_sigterm_stops_every_rank(group) -> None:
    process, base, ranks = group
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 143
    assert all(_gone(pid) for pid in ranks)
