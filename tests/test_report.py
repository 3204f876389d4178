"""The federated benchmark's table (mean +- std over seeds, per-seed paired differences) and figures."""
import importlib.util
from pathlib import Path

import pytest

from fedtreelora.report import plot_per_client_against, plot_seed_means

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_federated.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_federated", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECORDS = {"fedtreelora": [{"seed": 0, "mean_accuracy": 0.90, "accuracy": [0.9, 0.9], "wall_s": 1.0},
                           {"seed": 1, "mean_accuracy": 0.80, "accuracy": [0.7, 0.9], "wall_s": 1.0}],
           "local": [{"seed": 0, "mean_accuracy": 0.85, "accuracy": [0.8, 0.9], "wall_s": 1.0},
                     {"seed": 1, "mean_accuracy": 0.82, "accuracy": [0.8, 0.84], "wall_s": 1.0}]}


def test_table_gives_mean_std_over_seeds_and_paired_differences():
    table = _bench().markdown({"hierarchical": RECORDS})
    assert "| fedtreelora | 85.0 ± 5.0 | 2 |" in table
    assert "| local | +5.0 | -2.0 | +1.5 |" in table


def test_every_setting_ships_as_a_config_file():
    bench = _bench()
    for name, path in bench.SETTINGS.items():
        assert path.is_file(), name
        assert bench.setting_config(name).num_clients >= 8


def test_figures_are_written(tmp_path):
    plot_seed_means(RECORDS, tmp_path / "m.png", title="t")
    plot_per_client_against(RECORDS, "local", tmp_path / "c.png", title="t")
    assert (tmp_path / "m.png").stat().st_size > 5000 and (tmp_path / "c.png").stat().st_size > 5000
    with pytest.raises(KeyError):
        plot_per_client_against(RECORDS, "fedit", tmp_path / "x.png")


def test_a_run_of_some_seeds_keeps_the_other_seeds(tmp_path, monkeypatch):
    # Two processes measuring two seeds of one setting: each save keeps what the other wrote.
    bench = _bench()
    path = tmp_path / "federated.json"
    one = {"hierarchical": {m: [r for r in runs if r["seed"] == 0] for m, runs in RECORDS.items()}}
    other = {"hierarchical": {m: [r for r in runs if r["seed"] == 1] for m, runs in RECORDS.items()}}
    configs = {"hierarchical": bench.setting_config("hierarchical").to_dict()}
    bench.save(path, one, configs)
    merged = bench.save(path, other, configs)
    assert merged["results"]["hierarchical"] == RECORDS
    again = {"hierarchical": {"local": [{**RECORDS["local"][1], "mean_accuracy": 0.5}]}}
    merged = bench.save(path, again, configs)    # a re-run of one seed replaces that seed only
    assert [r["mean_accuracy"] for r in merged["results"]["hierarchical"]["local"]] == [0.85, 0.5]
    assert merged["results"]["hierarchical"]["fedtreelora"] == RECORDS["fedtreelora"]
    # under another config the other seeds are stale and go; a method that does not read the change
    # (mixing_lr: local does not learn lam; tau: local searches no cuts) keeps them, one that does
    # (fedtreelora) loses them
    for change, local_seeds, tree_seeds in ((dict(lr=1e-2), [1], []), (dict(mixing_lr=0.5), [0, 1], []),
                                            (dict(tau=0.03), [0, 1], [])):
        bench.save(path, {"hierarchical": RECORDS}, configs)
        changed = {"hierarchical": {**configs["hierarchical"], **change}}
        merged = bench.save(path, {"hierarchical": {"local": [RECORDS["local"][1]]}}, changed)["results"]["hierarchical"]
        assert [r["seed"] for r in merged["local"]] == local_seeds, change
        assert [r["seed"] for r in merged.get("fedtreelora", [])] == tree_seeds, change


def test_a_seed_a_method_did_not_run_shows_as_a_dash():
    records = {**RECORDS, "flat": [{"seed": 1, "mean_accuracy": 0.75, "accuracy": [0.7, 0.8], "wall_s": 1.0}]}
    assert "| flat | - | +5.0 | +5.0 |" in _bench().markdown({"hierarchical": records})
