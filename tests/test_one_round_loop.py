"""One round loop: `fedtreelora simulate` runs every method through flwr's own `Strategy.start` (the
`PersonalisedStrategy` with the method's rule, its clients as in-process nodes), and the experiment's
Flower app (its ClientApp on a Grid, node ids unrelated to the clients) gives the same record, tree and
checkpoints bit for bit, every round and every method; a Flower run resumes with the rule it decided
and refuses another config."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.serverapp.strategy import Strategy  # noqa: E402

from fedtreelora.federation.methods import METHODS  # noqa: E402
from fedtreelora.federation.schedule import CheckpointError, RunFolderError, load_checkpoint, run_experiment  # noqa: E402
from fedtreelora.flower import InProcessGrid  # noqa: E402
from fedtreelora.flower.local_grid import in_process_server  # noqa: E402
from fedtreelora.flower.strategy import PersonalisedStrategy  # noqa: E402
from tiny_models import save_tiny_bert, tiny_config, tiny_dataset  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def tiny_data(config):
    return tiny_dataset()


def flower_grid(n, silent_round=None):
    """The experiment's ClientApp on n in-process nodes whose ids run against the clients' order."""
    from fedtreelora.flower.client_app import client_app
    app = client_app(dataset_fn=tiny_data)
    nodes = {k: 10_000 - 17 * k for k in range(n)}
    return InProcessGrid({nodes[k]: app for k in range(n)},
                         node_configs={nodes[k]: {"partition-id": k, "num-partitions": n} for k in range(n)})


def _record(summary):
    return {name: {k: m[k] for k in ("history", "lam", "method_state", "accuracy", "mean_accuracy")}
            for name, m in summary["methods"].items()}


def test_simulate_runs_every_round_through_flwrs_strategy_start(model_path, tmp_path, monkeypatch):
    from fedtreelora.client.trainer import LocalTrainer
    starts, outside = [], []
    original_start, original_train = Strategy.start, LocalTrainer.train
    inside = {"now": False}

    def spy_start(self, grid, initial_arrays, num_rounds=3, *args, **kwargs):
        starts.append((type(self).__name__, getattr(self.rule, "name", None), num_rounds, type(grid).__name__))
        inside["now"] = True
        try:
            return original_start(self, grid, initial_arrays, num_rounds, *args, **kwargs)
        finally:
            inside["now"] = False

    def spy_train(self, *args, **kwargs):
        if not inside["now"]:
            outside.append(args)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(Strategy, "start", spy_start)
    monkeypatch.setattr(LocalTrainer, "train", spy_train)
    cfg = tiny_config(model_path, rounds=1)
    methods = ["fedtreelora", "local", "ablation-lam05"]
    summary = run_experiment(cfg, methods, tmp_path, dataset=tiny_dataset(), progress=False)
    w, total = cfg.warmup_rounds, cfg.warmup_rounds + cfg.rounds
    assert starts == [("PersonalisedStrategy", None, w, "PoolGrid")] + [
        ("PersonalisedStrategy", name, total, "PoolGrid") for name in methods]
    assert outside == []                                        # every local run came from a Strategy's message
    assert summary["engine"] == "in-process" and summary["failures"] == []
    assert all(len(m["history"]) == total for m in summary["methods"].values())


@pytest.mark.parametrize("changes, methods", [
    ({}, list(METHODS)),
    (dict(late_clients=1, late_round=1, rounds=3, rebuild_every=2, client_fraction=0.75),
     ["fedtreelora", "flat", "ablation-perlayer", "oracle-groups"]),
], ids=["every-method", "late-rebuild-partial"])
def test_flower_app_gives_simulates_record_tree_and_checkpoints_bit_for_bit(model_path, tmp_path, monkeypatch,
                                                                             changes, methods):
    from fedtreelora.flower.server_app import run_on_grid
    cfg = tiny_config(model_path, dataset="tiny", **changes)
    local = run_experiment(cfg, methods, tmp_path / "in_process", dataset=tiny_dataset(), progress=False)
    with in_process_server():
        flower = run_on_grid(flower_grid(cfg.num_clients), cfg, methods, tmp_path / "flower", round_timeout=None,
                             connect_timeout=1)
    assert flower["engine"] == "flower" and flower["failures"] == []
    assert (flower["weights"], flower["groups"]) == (local["weights"], local["groups"])
    assert _record(flower) == _record(local)                   # every round (the warm-up's too), every method
    assert json.loads((tmp_path / "flower" / "tree.json").read_text()) == json.loads(
        (tmp_path / "in_process" / "tree.json").read_text())
    history = local["methods"][methods[0]]["history"]
    assert [h["phase"] for h in history] == ["warmup"] * cfg.warmup_rounds + [methods[0]] * cfg.rounds
    if changes:   # the late client trains the warm-up, held back; the rule is decided without it, then places it
        assert history[cfg.warmup_rounds - 1]["accuracy"][-1] is None
        assert history[cfg.warmup_rounds]["joined"] == [cfg.num_clients - 1]
        assert [h.get("rebuilt", False) for h in history[cfg.warmup_rounds:]] == [False, True, False]
    for name in methods:
        _, a = load_checkpoint(tmp_path / "in_process" / "checkpoints" / name)
        _, b = load_checkpoint(tmp_path / "flower" / "checkpoints" / name)
        for k, (sa, sb) in enumerate(zip(a, b)):
            assert all(torch.equal(sa.adapter[key], sb.adapter[key]) for key in sa.adapter), (name, k)
            assert all(torch.equal(sa.logits[g], sb.logits[g]) for g in sa.logits), (name, k)


class DyingGrid(InProcessGrid):
    """The ServerApp process dies (an exception out of the grid) at its `die_at`-th exchange."""

    def __init__(self, grid, die_at):
        super().__init__(grid.apps, node_configs={n: c.node_config for n, c in grid.contexts.items()})
        self.calls, self.die_at = 0, die_at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.calls += bool(messages)                  # replayed rounds send nothing
        if self.calls == self.die_at:
            raise KeyboardInterrupt("the ServerApp was killed")
        return super().send_and_receive(messages, timeout=timeout)


def test_flower_resume_reloads_the_decided_rule_and_checks_the_config(model_path, tmp_path, monkeypatch):
    import fedtreelora.federation.methods as methods
    from fedtreelora.flower.server_app import run_on_grid
    cfg = tiny_config(model_path, dataset="tiny", rounds=3, client_fraction=0.5)
    names = ["fedtreelora", "flat"]
    with in_process_server():
        full = run_on_grid(flower_grid(cfg.num_clients), cfg, names, tmp_path / "full", round_timeout=None)
        # warm-up: 2 x (train, evaluate); fedtreelora: 3 x 2; flat: killed at its 2nd round's evaluation
        with pytest.raises(KeyboardInterrupt):
            run_on_grid(DyingGrid(flower_grid(cfg.num_clients), die_at=4 + 6 + 4), cfg, names, tmp_path / "cut",
                        round_timeout=None)
        info, _ = load_checkpoint(tmp_path / "cut" / "checkpoints" / "flat")
        assert info["round"] == 1 and info["method"]["labels"]
        with pytest.raises(RunFolderError, match="another config"):
            run_on_grid(flower_grid(cfg.num_clients), cfg.replace(lr=0.5), names, tmp_path / "cut", resume=True)
        with pytest.raises(RunFolderError, match="already holds a run"):
            run_on_grid(flower_grid(cfg.num_clients), cfg, names, tmp_path / "cut")

        def no_decision(*args, **kwargs):
            raise AssertionError("a resumed run must not decide the rule again")
        monkeypatch.setattr(methods, "build_tree", no_decision)
        monkeypatch.setattr(methods, "choose_cuts", no_decision)
        resumed = run_on_grid(flower_grid(cfg.num_clients), cfg, names, tmp_path / "cut", resume=True)
    assert _record(resumed) == _record(full)
    assert [h["selected"] for h in resumed["methods"]["flat"]["history"][cfg.warmup_rounds:]] == \
        [h["selected"] for h in full["methods"]["flat"]["history"][cfg.warmup_rounds:]]


def test_a_strategy_without_a_rule_runs_warm_up_rounds_only():
    with pytest.raises(ValueError, match="no server rule"):
        PersonalisedStrategy(None, warmup_rounds=1).decide()
    with pytest.raises(ValueError, match="join_rounds must lie after the warm-up"):
        PersonalisedStrategy(None, warmup_rounds=2, join_rounds={3: 2})


class VanishingGrid(InProcessGrid):
    """Node `gone` disconnects for good after the grid's `after`-th exchange: it leaves `get_node_ids`
    and its messages get no reply (a SuperNode that crashed)."""

    def __init__(self, grid, gone, after):
        super().__init__(grid.apps, node_configs={n: c.node_config for n, c in grid.contexts.items()})
        self.calls, self.gone, self.after = 0, gone, after

    def get_node_ids(self):
        ids = list(super().get_node_ids())
        return [n for n in ids if not (self.calls >= self.after and n == self.gone)]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.calls += bool(messages)
        if self.calls > self.after:
            messages = [m for m in messages if m.metadata.dst_node_id != self.gone]
        return super().send_and_receive(messages, timeout=timeout)


class MutedOnce(InProcessGrid):
    """Node `mute` gets no message in the grid's first exchange (its first warm-up reply is missing)."""

    def __init__(self, grid, mute):
        super().__init__(grid.apps, node_configs={n: c.node_config for n, c in grid.contexts.items()})
        self.mute, self.calls = mute, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.calls += bool(messages)
        if self.calls == 1:
            messages = [m for m in messages if m.metadata.dst_node_id != self.mute]
        return super().send_and_receive(messages, timeout=timeout)


def test_a_node_that_fails_before_it_ever_replied_is_named_by_its_node_only(model_path, tmp_path, caplog):
    """On Flower a node says which client it serves in its replies: one that fails the very first round
    is not known as any client yet, so it is logged and recorded by node id, never as client <node id>."""
    import logging

    from fedtreelora.flower.server_app import run_on_grid
    cfg = tiny_config(model_path, dataset="tiny", rounds=1)
    with in_process_server():
        grid = flower_grid(cfg.num_clients)
        mute = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 1)
        with caplog.at_level(logging.WARNING):
            out = run_on_grid(MutedOnce(grid, mute), cfg, ["fedtreelora"], tmp_path / "r", round_timeout=None)
    assert out["failures"] == [{"round": 1, "node": mute, "kind": "train", "reason": "no reply", "client": None,
                                "phase": "warmup"}]
    warned = [r.getMessage() for r in caplog.records if "failed to train" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"node {mute} (its client is not known yet")
    history = out["methods"]["fedtreelora"]["history"]
    assert "failed" not in history[0] and all(a is not None for a in history[-1]["accuracy"])


@pytest.mark.timeout(300)
def test_a_supernode_that_goes_away_fails_its_rounds_and_nobody_waits_for_it(model_path, tmp_path):
    """On Flower the experiment draws over every client that took part, online or not: a node that
    disconnects after the warm-up is sent its messages, recorded as failed, and the run finishes with
    the same draws as a run where it stayed (a wait for all num_clients nodes would hang here)."""
    from fedtreelora.flower.server_app import run_on_grid
    cfg = tiny_config(model_path, dataset="tiny", rounds=2, client_fraction=0.75)
    gone_client = 1
    with in_process_server():
        full = run_on_grid(flower_grid(cfg.num_clients), cfg, ["fedtreelora"], tmp_path / "full", round_timeout=None)
        grid = flower_grid(cfg.num_clients)
        gone = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == gone_client)
        cut = run_on_grid(VanishingGrid(grid, gone, after=2 * cfg.warmup_rounds), cfg, ["fedtreelora"],
                          tmp_path / "cut", round_timeout=None)
    w = cfg.warmup_rounds
    history, reference = cut["methods"]["fedtreelora"]["history"], full["methods"]["fedtreelora"]["history"]
    assert [h["selected"] for h in history[w:]] == [h["selected"] for h in reference[w:]]
    for h in history[w:]:
        assert h["accuracy"][gone_client] is None                       # not evaluated: its node is gone
        assert gone_client in h["failed"]["evaluate"]
        assert h["failed"]["train"] == ([gone_client] if gone_client in h["selected"] else [])
        assert all(a is not None for k, a in enumerate(h["accuracy"]) if k != gone_client)
    assert {f["client"] for f in cut["failures"]} == {gone_client}


def test_run_folders_of_the_earlier_layout_are_refused_with_a_clear_message(model_path, tmp_path):
    """A run folder whose commits predate the one round loop (no "format" in state.json) is refused on
    resume before any model or data is loaded, saying what to do; load_checkpoint still reads it (the
    diagnostics do), and refuses a drop-in run's checkpoint, whose clients are Flower node ids."""
    from fedtreelora.federation.checkpoints import commit_tensors
    from fedtreelora.federation.schedule import check_run_folder
    cfg = tiny_config(model_path, dataset="tiny")
    check_run_folder(tmp_path / "old", cfg)
    commit_tensors(tmp_path / "old" / "checkpoints" / "warmup", 2, {"0/adapter/k": torch.ones(2)},
                   {"round": 2, "history": [], "num_clients": 1})
    with pytest.raises(RunFolderError, match="earlier fedtreelora.*cannot be resumed.*--overwrite"):
        run_experiment(cfg, ["local"], tmp_path / "old", dataset=None, resume=True, progress=False)
    info, states = load_checkpoint(tmp_path / "old" / "checkpoints" / "warmup")
    assert info["round"] == 2 and torch.equal(states[0].adapter["k"], torch.ones(2))
    node = 6392048271935301217
    commit_tensors(tmp_path / "dropin", 3, {f"{node}/adapter/k": torch.ones(2)},
                   {"format": "fedtreelora.flower.PersonalisedStrategy/2", "clients": [node], "nodes": {}})
    with pytest.raises(CheckpointError, match="Flower node id"):
        load_checkpoint(tmp_path / "dropin")


def test_nothing_left_to_train_is_said_only_when_it_is_a_mistake(model_path, tmp_path):
    """rounds=0 (the warm-up and the decided rule only) continues the warm-up's commit with no round of
    its own: no warning. Resuming that finished run asks for nothing new: the warning says so."""
    import logging

    from fedtreelora.flower import strategy as strategy_module

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    strategy_module.logger.addHandler(handler)
    try:
        cfg = tiny_config(model_path, warmup_rounds=1, rounds=0)
        run_experiment(cfg, ["fedtreelora"], tmp_path, dataset=tiny_dataset(), progress=False)
        assert not [m for m in seen if "nothing left to train" in m], seen
        run_experiment(cfg.replace(rounds=1), ["fedtreelora"], tmp_path / "one", dataset=tiny_dataset(), progress=False)
        run_experiment(cfg.replace(rounds=1), ["fedtreelora"], tmp_path / "one", dataset=tiny_dataset(), progress=False,
                       resume=True)
        assert [m for m in seen if "nothing left to train" in m], seen
    finally:
        strategy_module.logger.removeHandler(handler)
