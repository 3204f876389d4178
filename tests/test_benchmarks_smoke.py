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


def test_scale_benchmark_runs_in_quick_mode(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    monkeypatch.setattr(sys, "argv", ["bench_scale.py", "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / "bench_scale.py"), run_name="__main__")
    assert done.value.code == 0
    result = json.loads(out.read_text())
    assert result["quick"] and len(result["rows"]) >= 2 and (tmp_path / "scale.png").stat().st_size > 10_000
    for row in result["rows"]:
        assert row["build_s"] > 0 and row["gemm_s"] > 0 and row["extend_s"] > 0 and row["aggregate_s"] > 0
        assert row["same_as_in_memory"] is True          # streaming and in-memory trees identical
        assert row["placed_correct"] == 1.0               # every late client in its planted group
        assert row["min_ari_vs_planted"] > 0.5 and row["n_clusters"][0] == 1
