"""bench/scheduler_overhead.py --quick: runs, prints its table and writes the JSON record."""
from __future__ import annotations

import json

from llmrpc.bench import scheduler_overhead


def test_quick_run_writes_a_complete_record(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    result = scheduler_overhead.main(["--quick", "--steps", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result) >= {"command", "commit", "hardware", "date", "results"}
    assert result["command"].endswith("--quick --steps 5 --out " + str(out))
    assert [(r["batch"], r["cache"], r["steps"]) for r in result["results"]] == [
        (1, "empty", 5), (256, "empty", 5), (256, "full", 5)]
    assert result["results"][2]["evicted_pages"] > 0
    assert all(r["scheduler_us"] > 0 for r in result["results"])
    assert "next_step" in capsys.readouterr().out
