"""The benchmarks' tools that read a run folder's warm-up: tau calibration and the tree diagnostics."""
import json
import sys
from pathlib import Path

import pytest

from fedtreelora.core.synthetic import planted_states
from fedtreelora.federation.checkpoints import commit_tensors

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def write_warmup_run(folder: Path, separation: float = 5.0, num_groups: int = 4) -> Path:
    """A run folder whose warm-up holds 8 clients in 4 planted groups at the deepest layers (2 at the
    middle ones, 1 at the shallow ones), numbered like the partitioner's groups (client k in k % 4)."""
    states, truth = planted_states(n_clients=8, groups=(1, 1, 2, 2, 4, 4), separation=separation, noise=0.5)
    order = [2 * (j % 4) + j // 4 for j in range(8)]             # client j: a member of planted group j % 4
    assert [int(truth[-1, k]) for k in order] == [j % 4 for j in range(8)]
    tensors = {f"{j}/adapter/{key}": v for j, k in enumerate(order) for key, v in states[k].items()}
    commit_tensors(folder / "checkpoints" / "warmup", 2, tensors, {})
    config = dict(num_clients=8, num_groups=num_groups, super_groups=2, linkage="average", metric="frobenius",
                  window=3, tau=0.1)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def warmup_run(tmp_path):
    return write_warmup_run(tmp_path)


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


def test_the_calibrated_tau_keeps_the_groups_apart_on_every_run(tmp_path, tools, capsys):
    # far-apart groups stay apart up to tau 0.5; groups closer together (deepest silhouette ~0.2)
    # merge at 0.5 but not at 0.3: the calibrated tau is the one that suits both
    calibrate_tau, _ = tools
    far, near = write_warmup_run(tmp_path / "far"), write_warmup_run(tmp_path / "near", separation=2.0)
    assert calibrate_tau.main([str(far), "--taus", "0.3", "0.5", "--null", "0"]) == 0
    assert "calibrated tau: 0.50 (" in capsys.readouterr().out   # the grid's largest: a lower bound, said so
    assert calibrate_tau.main([str(far), str(near), "--taus", "0.3", "0.5", "--null", "0"]) == 0
    out = capsys.readouterr().out
    assert "calibrated tau: 0.30 (" in out and "lower bound" not in out
    assert out.splitlines()[3].split()[-1] == "mixed"          # tau 0.5: the near groups merge


def test_bad_inputs_are_refused_with_the_folder_named(tmp_path, tools, capsys):
    calibrate_tau, tree_diagnostics = tools
    with pytest.raises(SystemExit, match="no config.json"):
        tree_diagnostics.load_warmup(tmp_path / "nothing")
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="killed: no committed warm-up"):
        tree_diagnostics.load_warmup(tmp_path / "killed")
    one_group = write_warmup_run(tmp_path / "one", num_groups=1)
    for args, message in (([str(one_group)], "has 1 planted group"), ([str(one_group), "--null", "-1"], "--null must be"),
                          ([str(one_group), "--taus", "2"], "--taus must lie in")):
        with pytest.raises(SystemExit):
            calibrate_tau.main(args)
        assert message in capsys.readouterr().err


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
