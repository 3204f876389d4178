"""The benchmarks' tools that read a run folder's warm-up: tau calibration and the tree diagnostics."""
import json
import sys
from pathlib import Path

import pytest

from fedtreelora.core.synthetic import planted_states
from fedtreelora.federation.checkpoints import commit_tensors

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def warmup_run(tmp_path):
    """A run folder whose warm-up holds 8 clients in 4 planted groups at the deepest layers (2 at the
    middle ones, 1 at the shallow ones), numbered like the partitioner's groups (client k in k % 4)."""
    states, truth = planted_states(n_clients=8, groups=(1, 1, 2, 2, 4, 4), separation=5.0, noise=0.5)
    order = [2 * (j % 4) + j // 4 for j in range(8)]             # client j: a member of planted group j % 4
    assert [int(truth[-1, k]) for k in order] == [j % 4 for j in range(8)]
    tensors = {f"{j}/adapter/{key}": v for j, k in enumerate(order) for key, v in states[k].items()}
    commit_tensors(tmp_path / "checkpoints" / "warmup", 2, tensors, {})
    config = dict(num_clients=8, num_groups=4, super_groups=2, linkage="average", metric="frobenius", window=3, tau=0.1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))   # the scripts import each other, as when run from benchmarks/
    import calibrate_tau
    import tree_diagnostics
    yield calibrate_tau, tree_diagnostics
    for name in ("calibrate_tau", "tree_diagnostics"):
        sys.modules.pop(name, None)


def test_calibrated_tau_is_the_largest_that_finds_the_groups(warmup_run, tools, capsys):
    calibrate_tau, _ = tools
    assert calibrate_tau.main([str(warmup_run), "--taus", "0.0", "0.5", "1.0", "--null", "3"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()[:4] in ("0.00", "0.50", "1.00")}
    assert "1.00 (1,1,2,2,4,4)" in rows["0.50"]            # the planted tree, cut where the groups are
    assert "0.00 (1,1,1,1,1,1) mixed" in rows["1.00"]      # no silhouette beats tau = 1: one cluster, ARI 0
    assert "mixed" not in rows["0.00"]                     # tau = 0 may split more, never mixes
    assert "calibrated tau: 0.50" in out
    null = float(out.split("columns shuffled): ")[1].split()[1].rstrip(","))
    assert 0.0 <= null < 0.5                               # shuffled B factors have no groups to find


def test_no_tau_finds_groups_that_are_not_there(warmup_run, tools, capsys):
    calibrate_tau, _ = tools
    assert calibrate_tau.main([str(warmup_run), "--taus", "1.0", "--null", "0"]) == 0
    out = capsys.readouterr().out
    assert "no tau of the grid keeps the planted groups apart" in out and "no-structure" not in out


def test_tree_diagnostics_reads_the_same_folder(warmup_run, tools, capsys):
    _, tree_diagnostics = tools
    config, adapters, groups = tree_diagnostics.load_warmup(warmup_run)
    assert len(adapters) == 8 and groups.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and config["tau"] == 0.1
    assert tree_diagnostics.main([str(warmup_run)]) == 0
    out = capsys.readouterr().out
    assert "8 clients" in out and "head" in out and "flat (mean distance)" in out
