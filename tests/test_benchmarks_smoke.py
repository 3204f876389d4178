"""The benchmark scripts run (small sizes) and report results that agree with the plain stack.
No timing is asserted: speed is for the benchmarks' own tables."""
import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["bench_ops.py", "bench_aggregate.py"])
def test_benchmark_runs_in_quick_mode(script, tmp_path, monkeypatch):
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert done.value.code == 0
    result = json.loads(out.read_text())
    assert result["quick"] and len(result["rows"]) >= 2
    for row in result["rows"]:
        assert row["ours_s"] > 0 and "met" in row
    notes = " ".join(r["notes"] for r in result["rows"])
    assert "identical to scipy: True" in notes or "identical to the plain stack's: True" in notes
