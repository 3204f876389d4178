"""Same seed, same metrics: every method on a tiny federation against figures recorded before a refactor.

tests/data/tiny_federation_metrics.json was written by the code before the package was split into
core/client/federation/cli (and is rewritten only when a change is *meant* to alter results): the
per-client accuracy, losses, learnt lam and decided partitions of all nine methods must come out equal.
tests/data/tiny_open_federation_metrics.json was written by the round schedule that ran before every
round went through one Flower Strategy, on an open federation (a late client, a rebuild, partial
participation), with the clients selected each round as well.
"""
import json
from pathlib import Path

import pytest
import torch

from fedtreelora.federation.schedule import run_experiment
from tiny_models import pretrain_tiny_bert, save_tiny_bert, tiny_config, tiny_dataset

RECORDED = Path(__file__).parent / "data" / "tiny_federation_metrics.json"


OPEN = Path(__file__).parent / "data" / "tiny_open_federation_metrics.json"
OPEN_SETTINGS = dict(late_clients=1, late_round=1, rounds=3, rebuild_every=2, client_fraction=0.75)


@pytest.mark.parametrize("recorded, changes", [(RECORDED, {}), (OPEN, OPEN_SETTINGS)], ids=["closed", "open"])
def test_all_methods_reproduce_the_recorded_metrics(tmp_path, recorded, changes):
    threads = torch.get_num_threads()   # the figures were recorded on one thread
    torch.set_num_threads(1)
    try:
        ds = tiny_dataset(400)
        path = pretrain_tiny_bert(save_tiny_bert(tmp_path / "m"), ds, steps=30)
        cfg = tiny_config(path, num_clients=6, num_groups=2, classes_per_group=2, **changes)
        want = json.loads(recorded.read_text())
        summary = run_experiment(cfg, list(want), tmp_path / "run", dataset=ds, progress=False)
    finally:
        torch.set_num_threads(threads)
    for name, rec in want.items():
        got = summary["methods"][name]
        assert got["accuracy"] == rec["accuracy"], name
        assert [h["mean_accuracy"] for h in got["history"]] == pytest.approx(rec["history"], abs=1e-12), name
        assert got["history"][-1]["loss"] == pytest.approx(rec["loss"], rel=1e-5), name
        assert got["method_state"] == rec["state"], name
        assert got["lam"].keys() == rec["lam"].keys(), name
        for k, lams in rec["lam"].items():
            assert got["lam"][k] == pytest.approx(lams, rel=1e-5), (name, k)
        if "selected" in rec:
            assert [h.get("selected") for h in got["history"]] == rec["selected"], name
