"""Open membership in the federation: late clients, periodic rebuilds, partial participation, resume."""
import json

import numpy as np
import pytest
import torch

from fedtreelora.client.trainer import LocalTrainer
from fedtreelora.federation.methods import nearest_clusters
from fedtreelora.federation.schedule import load_checkpoint, run_experiment
from tiny_models import save_tiny_bert, tiny_config, tiny_dataset

METHODS = ["fedtreelora", "flat", "ablation-perlayer"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _config(model_path, **changes):
    return tiny_config(model_path, num_clients=6, late_clients=2, late_round=2, rounds=3, rebuild_every=2,
                       client_fraction=0.75, **changes)


def test_late_clients_join_train_and_are_evaluated_from_their_round(model_path, tmp_path):
    cfg = _config(model_path)
    summary = run_experiment(cfg, METHODS, tmp_path / "run", dataset=tiny_dataset(), progress=False)
    for name in METHODS:
        history = summary["methods"][name]["history"]
        warm, fed = history[:cfg.warmup_rounds], history[cfg.warmup_rounds:]
        assert all(h["accuracy"][4:] == [None, None] for h in warm + fed[:1]), name   # absent before round 2
        assert all(max(h["selected"]) < 4 for h in fed[:1]), name
        assert fed[1]["joined"] == [4, 5] and all(a is not None for a in fed[1]["accuracy"]), name
        assert [h.get("rebuilt", False) for h in fed] == [False, True, False], name
        assert len(summary["methods"][name]["method_state"]["labels"][-1]) == 6, name
        assert all(len(h["selected"]) == max(1, round(0.75 * (4 if i == 0 else 6))) for i, h in enumerate(fed)), name


def test_a_killed_run_with_late_clients_and_rebuilds_resumes_exactly(model_path, tmp_path, monkeypatch):
    cfg = _config(model_path)
    full = run_experiment(cfg, METHODS, tmp_path / "full", dataset=tiny_dataset(), progress=False)
    calls, original = {"n": 0}, LocalTrainer.train

    def dying_train(self, *args, **kwargs):
        calls["n"] += 1
        # warm-up 2 x 4, fedtreelora round 1 (3), join (2 x 2), round 2 (5 of 6) -> die inside round 3
        if calls["n"] == 8 + 3 + 4 + 5 + 2:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "train", dying_train)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, METHODS, tmp_path / "killed", dataset=tiny_dataset(), progress=False)
    monkeypatch.setattr(LocalTrainer, "train", original)
    info, states = load_checkpoint(tmp_path / "killed" / "checkpoints" / "fedtreelora")
    assert info["round"] == 2 and all(s is not None for s in states) and len(info["method"]["tree"]["labels"][0]) == 6
    resumed = run_experiment(cfg, METHODS, tmp_path / "killed", dataset=tiny_dataset(), progress=False, resume=True)
    for name in METHODS:
        a, b = full["methods"][name], resumed["methods"][name]
        assert a["accuracy"] == b["accuracy"] and a["lam"] == b["lam"], name
        assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]], name
        assert a["method_state"] == b["method_state"], name


def test_nearest_cluster_is_the_average_linkage_rule():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (4, 2)), rng.normal(5, 0.1, (4, 2)), [[0.2, 0.1], [4.8, 5.1]]])
    d = torch.cdist(torch.tensor(points), torch.tensor(points))
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert nearest_clusters(d, labels).tolist() == [0, 1]
    by_hand = [int(np.argmin([d[8 + i, :8][torch.as_tensor(labels == c)].mean() for c in (0, 1)])) for i in range(2)]
    assert by_hand == [0, 1]


@pytest.mark.parametrize("changes, message", [
    (dict(late_clients=6), "late_clients must lie in"), (dict(late_clients=1, late_round=5, rounds=2), "late_round"),
    (dict(rebuild_every=-1), "rebuild_every")])
def test_bad_membership_settings_fail_on_construction(model_path, changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(model_path, num_clients=6, **changes)
