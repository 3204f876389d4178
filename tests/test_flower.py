"""Flower: the experiment's wire format (its node, `pool_nodes.pool_node`, under the real Strategy) and
app config (fast), the experiment app's failure handling and the FlowerTune-style example app on the
in-process Grid (fast), then federations through Flower: the experiment app on the simulation engine
against the in-process run and with an injected client failure (Ray, marked slow), and the
FlowerTune-style app on a real SuperLink with two SuperNodes on 127.0.0.1 driven by `flwr run`
(runs in CI, `make test`; a minute or more on 2 cores). The FedTreeLoRA strategy and the client
helpers themselves are tested in test_flower_strategy.py.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")


from fedtreelora.client.trainer import ClientState  # noqa: E402
from fedtreelora.federation.config import ExperimentConfig  # noqa: E402
from fedtreelora.flower.runtime import partition_id, resolve_dataset_fn  # noqa: E402
from fedtreelora.flower.server_app import config_from_run_config  # noqa: E402
from tiny_models import pretrain_tiny_bert, save_tiny_bert, tiny_config, tiny_dataset  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
APP = ROOT / "examples" / "flower_app"                 # FlowerTune-style: FedTreeLoRA strategy + client helpers
EXPERIMENT_APP = ROOT / "examples" / "flower_experiment"   # this project's experiment (every method)
METHOD = "fedtreelora"
BIN = Path(sys.executable).parent


def tiny_data(config):
    """dataset-fn of the tests' ClientApps ("test_flower:tiny_data"): the in-process run's data."""
    return tiny_dataset()


def tiny_prompt_data(config):
    """dataset-fn of the causal-LM app tests ("test_flower:tiny_prompt_data"): 2 groups, each its own fixed answer."""
    from tiny_causal import tiny_prompts
    return tiny_prompts(160, constant=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_causal import save_tiny_causal_lm
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny BERT with a 'pre-trained' encoder, so that accuracies move from round to round."""
    return pretrain_tiny_bert(save_tiny_bert(tmp_path_factory.mktemp("tiny_bert")), tiny_dataset())


@pytest.fixture
def child_env(monkeypatch):
    """Ray workers and Flower subprocesses import this checkout and this test module."""
    paths = [str(ROOT), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


# -- fast: the wire format and the app config ------------------------------------------------------
class FakePool:
    """What `pool_node` uses of a ClientPool. Client k 'trains' halfway from what it starts from towards
    its own planted adapter and adds 0.25 to each mixing logit (`step`); every call is recorded."""

    def __init__(self, config):
        from types import SimpleNamespace
        from fedtreelora.core.synthetic import planted_states
        self.config = config
        self.targets, _ = planted_states(n_layers=2, groups=(1, 2), n_clients=config.num_clients, seed=0)
        self.initial = ClientState({k: torch.zeros_like(v) for k, v in self.targets[0].items()},
                                   {"layer_0": torch.tensor(1.3), "layer_1": torch.tensor(-0.7)})
        self.clients = [SimpleNamespace(num_train=10 + k, group=k % 2, test_idx=list(range(5)))
                        for k in range(config.num_clients)]
        self.calls = []

    def step(self, k, start):
        return ClientState({key: (v + self.targets[k][key]) / 2 for key, v in start.adapter.items()},
                           {g: v + 0.25 for g, v in start.logits.items()})

    def client(self, k):
        return self.clients[k]

    def train(self, k, start, external, round_, fixed_lam=None):
        self.calls.append(("train", k, round_, start, external, fixed_lam))
        return self.step(k, start), {"train_loss": 0.5}

    def evaluate(self, k, state, external):
        self.calls.append(("evaluate", k, None, state, external, None))
        return {"accuracy": 0.5 + k / 100, "loss": 1.0}


def _same(a: dict, b: dict):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_experiment_messages_carry_each_clients_state_exactly(tmp_path):
    """The experiment's node under the real Strategy (node ids in the reverse order of the clients): each
    client starts round 1 from its own initial adapter, then from exactly what the server holds for it,
    with exactly the mixing logits it uploaded last (or held at the fixed lam of the lam ablation)."""
    from fedtreelora import aggregate
    from fedtreelora.flower import InProcessGrid
    from fedtreelora.flower.experiment import Experiment
    from fedtreelora.flower.local_grid import in_process_server
    from fedtreelora.flower.pool_nodes import pool_node
    cfg = ExperimentConfig().replace(num_clients=4, num_groups=1, super_groups=0, warmup_rounds=2, rounds=2)
    pool = FakePool(cfg)
    node_of = {k: 90 - 7 * k for k in range(4)}
    grid = InProcessGrid({node_of[k]: pool_node(pool) for k in range(4)},
                         node_configs={node_of[k]: {"partition-id": k, "num-partitions": 4} for k in range(4)})
    experiment = Experiment(grid, cfg, tmp_path)
    with in_process_server():
        experiment.warmup()
        results = {name: experiment.run_method(name) for name in ("fedtreelora", "ablation-lam05")}
    tree = experiment.rules["fedtreelora"].tree
    assert tree.client_names == ["0", "1", "2", "3"]                  # clients by partition-id, not node id
    trains = {k: [c for c in pool.calls if c[:2] == ("train", k)] for k in range(4)}
    warm = {}
    for k in range(4):
        assert [c[2] for c in trains[k]] == [0, 1, 2, 3, 2, 3]       # warm-up once, then each method's rounds
        _same(trains[k][0][3].adapter, pool.initial.adapter)         # round 1: its own initial adapter and lam
        _same(trains[k][0][3].logits, pool.initial.logits)
        first = pool.step(k, trains[k][0][3])
        _same(trains[k][1][3].adapter, first.adapter)                # round 2: its own upload and logits, exactly
        _same(trains[k][1][3].logits, first.logits)
        warm[k] = pool.step(k, trains[k][1][3])
        assert trains[k][2][5] is None and trains[k][4][5] == 0.5    # fedtreelora learns lam, lam05 holds it
    expected = aggregate([warm[k].adapter for k in range(4)], weights=[10.0 + k for k in range(4)], tree=tree)
    for k in range(4):                                                # round 3: the tree's experts, its own lam
        _, _, _, start, external, _ = trains[k][2]
        _same(start.adapter, expected.cluster_states[k])
        _same(start.logits, warm[k].logits)
        assert (external is None) == (expected.external_states[k] is None)
        evaluations = [c for c in pool.calls if c[:2] == ("evaluate", k)]
        assert len(evaluations) == 6 and all(float(torch.sigmoid(v)) == pytest.approx(0.5)
                                             for c in evaluations[4:] for v in c[3].logits.values())
        final = pool.step(k, trains[k][3][3]).logits                 # the record's lam: its last upload's, exactly
        if expected.external_states[k] is not None:
            assert results["fedtreelora"]["lam"][str(k)] == {g: float(torch.sigmoid(v)) for g, v in final.items()}
    summary = experiment.summary(results)
    assert summary["groups"] == [0, 1, 0, 1] and summary["weights"] == [10.0, 11.0, 12.0, 13.0]


def test_example_app_config_is_the_calibrated_experiment():
    import tomllib
    app_config = tomllib.loads((EXPERIMENT_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config["method"] == "fedtreelora"
    assert config_from_run_config(app_config) == ExperimentConfig()


def test_run_config_keys_and_errors(tmp_path):
    cfg = config_from_run_config({"num-clients": 4, "lora_r": 8, "target-modules": "query, key,value", "method": "fedit"})
    assert (cfg.num_clients, cfg.lora_r, cfg.target_modules) == (4, 8, ["query", "key", "value"])
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"num_clients": 6, "rounds": 7}))
    cfg = config_from_run_config({"config-file": str(path), "rounds": 2})
    assert (cfg.num_clients, cfg.rounds) == (6, 2)
    with pytest.raises(ValueError, match="num-clientz"):
        config_from_run_config({"num-clientz": 4})
    with pytest.raises(ValueError, match="num_groups"):
        config_from_run_config({"num-clients": 2, "num-groups": 3})


def test_client_identity_and_dataset_fn_errors():
    assert partition_id({"partition-id": 3, "num-partitions": 4}) == 3
    with pytest.raises(KeyError, match="partition-id"):
        partition_id({})
    assert resolve_dataset_fn("test_flower:tiny_data") is tiny_data
    with pytest.raises(ValueError, match="module:function"):
        resolve_dataset_fn("test_flower.tiny_data")
    with pytest.raises(ImportError, match="no_such_fn"):
        resolve_dataset_fn("test_flower:no_such_fn")


def test_unknown_method_fails_before_any_node_is_contacted(tmp_path):
    from fedtreelora.flower.server_app import run_on_grid

    class Untouchable:
        def get_node_ids(self):
            raise AssertionError("a node was contacted")

    with pytest.raises(ValueError, match="fedtreelorra"):
        run_on_grid(Untouchable(), ExperimentConfig(), ["fedtreelorra"], tmp_path)
    assert not (tmp_path / "config.json").exists()


class DirectGrid:
    """The part of Flower's Grid the strategy uses, calling a ClientApp in this process (no Ray, no
    network): fast enough for every test run. Nodes listed in `silent` never reply in federated rounds."""

    def __init__(self, app, num_nodes: int, silent=()):
        from flwr.app import Context, RecordDict
        self.app, self.silent = app, set(silent)
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, node_config={"partition-id": k, "num-partitions": num_nodes},
                                          state=RecordDict(), run_config={}) for k in range(num_nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            phase = str(message.content.config_records["config"]["phase"])
            if node - 100 in self.silent and phase not in ("warmup", "query"):
                continue                                     # dropped out: no reply at all
            replies.append(self.app(message, self.contexts[node]))
        return replies


@pytest.fixture(scope="module")
def plain_tiny_model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("plain_bert"))


def test_dropped_client_is_logged_and_keeps_its_upload(plain_tiny_model, tmp_path, monkeypatch):
    """A client that stops answering (no reply before the round timeout) after warm-up: every round
    still runs, aggregates the others and keeps its warm-up upload; it has no accuracy while silent."""
    from fedtreelora.federation.schedule import load_checkpoint
    from fedtreelora.flower.client_app import client_app
    from fedtreelora.flower.server_app import run_on_grid
    from fedtreelora.flower.strategy import logger
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):   # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = tiny_config(plain_tiny_model, dataset="tiny", warmup_rounds=1, rounds=2, local_steps=2)
    records = _Records()
    logger.addHandler(records)
    try:
        summary = run_on_grid(DirectGrid(client_app(dataset_fn=tiny_data), cfg.num_clients, silent={2}), cfg, [METHOD],
                              tmp_path, round_timeout=1.0)
    finally:
        logger.removeHandler(records)
    history = summary["methods"][METHOD]["history"]
    assert [h["phase"] for h in history] == ["warmup", METHOD, METHOD]
    for h in history[1:]:
        assert h["failed"] == {"train": [2], "evaluate": [2]}
        assert h["accuracy"][2] is None and all(h["accuracy"][k] is not None for k in (0, 1, 3))
        assert h["mean_accuracy"] == pytest.approx(np.mean([h["accuracy"][k] for k in (0, 1, 3)]))
    assert [(f["client"], f["kind"]) for f in summary["failures"]] == [(2, "train"), (2, "evaluate")] * 2
    assert sum("client 2 " in m and "no reply within 1.0 s" in m for m in records.messages) == 4
    _, warm = load_checkpoint(tmp_path / "checkpoints" / "warmup")
    _, last = load_checkpoint(tmp_path / "checkpoints" / METHOD)
    for k in range(cfg.num_clients):
        same = all(torch.equal(warm[k].adapter[key], last[k].adapter[key]) for key in warm[k].adapter)
        assert same == (k == 2), f"client {k}"


def _flowertune_run_config(model_path, save_path, **changes):
    """The example app's run config ([tool.flwr.app.config], flattened as Flower does) with the tiny model and data."""
    import tomllib
    from flwr.common.config import flatten_dict
    config = flatten_dict(tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    config.update({"model.name": str(model_path), "data.dataset-fn": "test_flower:tiny_data", "data.max-length": 12,
                   "data.samples-per-node": 60, "model.lora.r": 2, "model.lora.alpha": 4.0, "train.local-steps": 3,
                   "train.batch-size": 8, "train.learning-rate": 0.01, "save-path": str(save_path), **changes})
    return config


def test_flowertune_example_app_runs_in_process(tiny_model, tmp_path, monkeypatch):
    """examples/flower_app's own ServerApp main and ClientApp, over the in-process Grid with 4 nodes in 2 planted
    groups: it finishes, saves every node's experts and the tree, and personalised accuracy beats chance."""
    from flwr.supercore.task_identity import TaskIdentity
    from fedtreelora.flower import InProcessGrid
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.syspath_prepend(str(APP))
    from flower_app import client_app, server_app
    from flwr.app import Context, RecordDict
    assert "FedTreeLoRA(" in (APP / "flower_app" / "server_app.py").read_text()
    save = tmp_path / "out"
    rc = _flowertune_run_config(tiny_model, save, **{"num-server-rounds": 3, "warmup-rounds": 2})
    grid = InProcessGrid({n: client_app.app for n in range(4)}, run_config=rc,
                         node_configs={n: {"partition-id": n, "num-partitions": 4} for n in range(4)})
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    summary = json.loads((save / "summary.json").read_text())
    assert summary["failures"] == []
    assert sorted(summary["evaluate"]) == ["1", "2", "3"]
    tree = json.loads((save / "tree.json").read_text())
    assert tree["client_names"] == ["0", "1", "2", "3"]
    for node in range(4):
        assert (save / f"node_{node}" / "cluster.safetensors").is_file()
    assert summary["evaluate"]["3"]["accuracy"] > 1 / 3 + 0.1        # 5 topics, 3 per group: chance is 1/3
    # lam trains at the app's train.mixing-learning-rate (0.2), not at the LoRA rate (0.01): in the one federated
    # round of 3 Adam steps a logit can move by ~0.6, at the LoRA rate by ~0.03 at most
    from fedtreelora.flower import from_arrayrecord
    from fedtreelora.flower.peft_client import MIXING_STATE
    start = torch.logit(torch.tensor(0.8))
    moved = max(float((v.float() - start).abs().max()) for n in range(4)
                for v in from_arrayrecord(grid.contexts[n].state.array_records[MIXING_STATE]).values())
    assert moved > 0.1, moved


def _causal_run_config(model_path, save_path, **changes):
    """The app's causal-LM preset (causal_lm.toml over pyproject.toml) with the tiny LLaMA and prompts."""
    import tomllib
    from flwr.common.config import flatten_dict
    preset = flatten_dict(tomllib.loads((APP / "causal_lm.toml").read_text()))
    return _flowertune_run_config(model_path, save_path, **{
        **preset, "model.name": str(model_path), "data.dataset-fn": "test_flower:tiny_prompt_data", "data.max-length": 24,
        "data.samples-per-node": 30, "model.lora.r": 2, "model.lora.alpha": 4.0, "train.local-steps": 3,
        "train.batch-size": 8, "train.learning-rate": 0.03, "eval.max-examples": 6, "eval.max-new-tokens": 4,
        "save-path": str(save_path), **changes})


def test_causal_lm_preset_is_the_calibrated_nlg_run():
    """causal_lm.toml overrides only keys of [tool.flwr.app.config] (flwr refuses others) and picks the LLM presets."""
    import tomllib
    from flwr.common.config import flatten_dict
    base = flatten_dict(tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    preset = flatten_dict(tomllib.loads((APP / "causal_lm.toml").read_text()))
    assert set(preset) <= set(base), sorted(set(preset) - set(base))
    assert (preset["task"], preset["model.name"], preset["data.name"]) == ("causal_lm", "smollm2", "aclsum")
    assert base["task"] == "classification"


def test_flowertune_example_app_trains_a_causal_lm_in_process(tiny_llama, tmp_path, monkeypatch):
    """examples/flower_app with task causal_lm: its ClientApp's train function (a plain PEFT loop on the
    response tokens between load_experts and make_reply) and evaluate (ROUGE-1 of greedy generations),
    driven by its own ServerApp over the in-process Grid, 4 nodes in 2 groups of instructions."""
    from flwr.supercore.task_identity import TaskIdentity
    from fedtreelora.flower import InProcessGrid, from_arrayrecord
    from fedtreelora.flower.peft_client import MIXING_STATE
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.syspath_prepend(str(APP))
    from flower_app import client_app, server_app
    from flwr.app import Context, RecordDict
    save = tmp_path / "out"
    rc = _causal_run_config(tiny_llama, save, **{"num-server-rounds": 3, "warmup-rounds": 1})
    exchanged = []

    def traced(msg, context):                         # the app itself, recording what travels
        reply = client_app.app(msg, context)
        exchanged.append((msg, reply))
        return reply

    grid = InProcessGrid({n: traced for n in range(4)}, run_config=rc,
                         node_configs={n: {"partition-id": n, "num-partitions": 4} for n in range(4)})
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    summary = json.loads((save / "summary.json").read_text())
    assert summary["failures"] == []
    assert sorted(summary["evaluate"]) == ["1", "2", "3"]
    assert all(0.0 <= m["rouge1"] <= 1.0 and m["loss"] > 0 for m in summary["evaluate"].values())
    assert all(len(per) == 4 for per in summary["evaluate_per_node"].values())
    assert json.loads((save / "tree.json").read_text())["client_names"] == ["0", "1", "2", "3"]
    trains = [(m, r) for m, r in exchanged if m.metadata.message_type == "train"]
    assert len(trains) == 12 and all(not r.has_error() for _, r in trains)
    for msg, reply in trains:
        sent, got = from_arrayrecord(msg.content["arrays"]), from_arrayrecord(reply.content["arrays"])
        assert set(got) == set(sent) and all("lora_" in k and ("q_proj" in k or "v_proj" in k) for k in got)
        assert any(not torch.equal(sent[k], got[k]) for k in got)          # it trained
        assert reply.content["metrics"]["num-examples"] == 20 and reply.content["metrics"]["train-loss"] > 0
    federated = [m for m, _ in trains if m.content["config"]["phase"] == "federated"]
    assert len(federated) == 8
    assert all(MIXING_STATE in grid.contexts[n].state.array_records for n in range(4))   # lam stays on the node
    for node in range(4):
        assert (save / f"node_{node}" / "cluster.safetensors").is_file()
    # the loss on the response tokens falls: each group's fixed answer is learnt
    assert summary["evaluate"]["3"]["loss"] < summary["evaluate"]["1"]["loss"]


# -- slow: real federations through Flower ---------------------------------------------------------
def _simulate(config, run_dir, mods=None, num_supernodes=4, methods=METHOD):
    from flwr.simulation import run_simulation
    from fedtreelora.flower.client_app import client_app
    from fedtreelora.flower.server_app import server_app
    run_simulation(server_app(config, methods, str(run_dir), round_timeout=300, connect_timeout=60),
                   client_app(dataset_fn="test_flower:tiny_data", mods=mods), num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0}})
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulation_engine_matches_in_process_run(tiny_model, tmp_path, child_env):
    from fedtreelora.federation.schedule import run_experiment
    cfg = tiny_config(tiny_model, dataset="tiny")        # 4 clients in 2 groups, full participation
    methods = [METHOD, "fedalt", "ablation-lam05"]       # the tree, a baseline, lam held fixed
    local = run_experiment(cfg, methods, tmp_path / "in_process", dataset=tiny_dataset(), progress=False)
    flower = _simulate(cfg, tmp_path / "flower", methods=",".join(methods))
    assert flower["weights"] == local["weights"] and flower["groups"] == local["groups"]
    if (tmp_path / "in_process" / "tree.json").exists():
        assert json.loads((tmp_path / "flower" / "tree.json").read_text()) == json.loads(
            (tmp_path / "in_process" / "tree.json").read_text())     # same uploads (1 thread each): same bits
    assert flower["failures"] == [] and list(flower["methods"]) == methods
    for name in methods:
        a, b = local["methods"][name], flower["methods"][name]
        assert b["method_state"] == a["method_state"], name              # the same tree and cuts
        assert len(b["history"]) == len(a["history"]) == cfg.warmup_rounds + cfg.rounds
        for ha, hb in zip(a["history"], b["history"]):                 # every round, not just the last
            assert hb["round"] == ha["round"] and hb["phase"] == ha["phase"]
            np.testing.assert_allclose(hb["loss"], ha["loss"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(hb["accuracy"], ha["accuracy"], atol=0.026)   # at most one test document
        assert b["mean_accuracy"] == pytest.approx(a["mean_accuracy"], abs=0.01)
        for k, lams in a["lam"].items():
            assert b["lam"][k] == pytest.approx(lams, abs=1e-3)


def test_drop_in_strategy_on_the_experiments_clients_matches_fedtreelora_simulate(tiny_model, tmp_path, monkeypatch):
    # One set of rounds: flwr's Strategy.start driving the drop-in FedTreeLoRA over the experiment's
    # clients (pool_grid) gives `fedtreelora simulate`'s tree and, in every round (the warm-up's too),
    # its per-client metrics and lam.
    from flwr.serverapp.strategy import Result
    from flwr.supercore.task_identity import TaskIdentity
    from fedtreelora.federation.pool import ClientPool
    from fedtreelora.federation.schedule import run_experiment
    from fedtreelora.flower import FedTreeLoRA, to_arrayrecord
    from fedtreelora.flower.peft_client import MIXING_STATE
    from fedtreelora.flower.pool_nodes import pool_grid
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = tiny_config(tiny_model, dataset="tiny")        # 4 clients in 2 groups, full participation
    local = run_experiment(cfg, [METHOD], tmp_path / "in_process", dataset=tiny_dataset(), progress=False)
    pool = ClientPool(cfg, tiny_dataset())
    grid = pool_grid(pool)
    n = cfg.num_clients
    strategy = FedTreeLoRA(tree_config=cfg.tree_config(), warmup_rounds=cfg.warmup_rounds, min_train_nodes=n,
                           min_evaluate_nodes=n, min_available_nodes=n, seed=cfg.seed)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(pool.initial.adapter),
                            num_rounds=cfg.warmup_rounds + cfg.rounds)
    assert isinstance(result, Result) and strategy.failures == []
    decided = local["methods"][METHOD]["method_state"]
    assert np.asarray(strategy.tree.labels).tolist() == decided["labels"]
    assert [int(c) for c in np.asarray(strategy.tree.n_clusters)] == decided["n_clusters"]
    history = {h["round"]: h for h in local["methods"][METHOD]["history"]}
    for rnd in range(1, cfg.warmup_rounds + cfg.rounds + 1):
        per_node = strategy.evaluate_metrics[rnd]
        np.testing.assert_allclose([per_node[k]["accuracy"] for k in range(n)], history[rnd]["accuracy"], atol=1e-6)
        np.testing.assert_allclose([per_node[k]["loss"] for k in range(n)], history[rnd]["loss"], rtol=1e-4, atol=1e-5)
    for k, lams in local["methods"][METHOD]["lam"].items():   # lam learnt on the node, kept in its context.state
        logits = grid.contexts[int(k)].state.array_records[MIXING_STATE].to_torch_state_dict()
        assert {g: float(torch.sigmoid(v)) for g, v in logits.items()} == pytest.approx(lams, abs=1e-5)


FAILING_CLIENT = 1


def fail_in_federated_rounds(message, context, call_next):
    """Client mod: client 1 raises in every federated training round (after warm-up)."""
    content = message.content
    if message.metadata.message_type == "train" and int(context.node_config["partition-id"]) == FAILING_CLIENT:
        if str(content.config_records["config"]["phase"]) != "warmup":
            raise RuntimeError("injected failure: this client crashed")
    return call_next(message, context)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failed_client_does_not_stop_the_federation(tiny_model, tmp_path, child_env):
    from fedtreelora.federation.schedule import load_checkpoint
    from fedtreelora.flower.strategy import logger
    cfg = tiny_config(tiny_model, dataset="tiny")
    records = _Records()
    logger.addHandler(records)
    try:
        summary = _simulate(cfg, tmp_path, mods=[fail_in_federated_rounds])
    finally:
        logger.removeHandler(records)
    federated = [h for h in summary["methods"][METHOD]["history"] if h["phase"] != "warmup"]
    assert len(federated) == cfg.rounds                           # every round ran
    for h in federated:
        assert h["failed"]["train"] == [FAILING_CLIENT] and h["failed"]["evaluate"] == []
        assert all(a is not None for a in h["accuracy"])          # it is still evaluated, on what it holds
    assert [(f["client"], f["kind"]) for f in summary["failures"]] == [(FAILING_CLIENT, "train")] * cfg.rounds
    assert all("injected failure" in f["reason"] for f in summary["failures"])
    failure_logs = [m for m in records.messages if f"client {FAILING_CLIENT} " in m and "failed to train" in m]
    assert len(failure_logs) == cfg.rounds and "injected failure" in failure_logs[0]
    # the server kept the failed client's warm-up upload; the others' uploads moved on
    _, warm = load_checkpoint(tmp_path / "checkpoints" / "warmup")
    _, last = load_checkpoint(tmp_path / "checkpoints" / METHOD)
    for k in range(cfg.num_clients):
        same = all(torch.equal(warm[k].adapter[key], last[k].adapter[key]) for key in warm[k].adapter)
        assert same == (k == FAILING_CLIENT), f"client {k}"


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _stop(processes):
    """Terminate each started process group and every process they spawned (Flower detaches SuperExec)."""
    import psutil
    victims = []
    for proc in processes:
        try:
            victims += [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in processes:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
    alive = []
    for pid in victims:
        try:
            alive.append(psutil.Process(pid))
            alive[-1].terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def _toml_value(v):
    return json.dumps(v) if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))


def _toml_overrides(path, run_config):
    """A --run-config TOML file of flat (dotted) keys."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flwr_run_causal_lm_app_on_the_simulation_engine(tiny_llama, tmp_path, child_env):
    """`flwr run examples/flower_app` with the causal-LM preset (a --run-config TOML file) on a SuperLink in
    simulation mode (Ray, 4 simulated SuperNodes); this test starts and stops that SuperLink itself."""
    link_port, control_port = _free_ports(2)
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home)}
    save = tmp_path / "run"
    overrides = _toml_overrides(tmp_path / "overrides.toml", _causal_run_config(
        tiny_llama, save, **{"num-server-rounds": 2, "warmup-rounds": 1, "round-timeout": 300}))
    log = open(tmp_path / "superlink.log", "w")
    link = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                             "--host", "127.0.0.1", "--port", str(link_port), "--control-api-address",
                             f"127.0.0.1:{control_port}", "--database", str(tmp_path / "state.db"),
                             "--disable-runtime-dependency-installation"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline, run = time.monotonic() + 120, None
        while time.monotonic() < deadline:        # the SuperLink may still be starting: retry the submission
            run = subprocess.run([str(BIN / "flwr"), "run", str(APP), "sim", "--stream", "--run-config", str(overrides),
                                  "--federation-config", "num-supernodes=4 client-resources-num-cpus=1 "
                                  "init-args-num-cpus=2"], capture_output=True, text=True, env=env, timeout=480)
            if "Successfully started run" in run.stdout:
                break
            time.sleep(2)
        assert run is not None and "Successfully started run" in run.stdout, run.stdout + run.stderr
        assert (save / "summary.json").is_file(), "the run did not finish:\n" + run.stdout[-6000:] + run.stderr
    finally:
        _stop([link])
        log.close()
    summary = json.loads((save / "summary.json").read_text())
    assert summary["failures"] == [] and sorted(summary["evaluate"]) == ["1", "2"]
    assert all("rouge1" in m for m in summary["evaluate"].values())
    assert len(summary["evaluate_per_node"]["2"]) == 4
    assert len(json.loads((save / "tree.json").read_text())["client_names"]) == 4
    assert "configure_train: round 2 (federated), 4 node(s)" in run.stdout
    assert link.poll() is not None


# ~3 minutes on 2 cores (a SuperLink and two SuperNodes as processes): `make test-all` runs it; in
# `make test` the same ServerApp/ClientApp run in process (test_flowertune_example_app_runs_in_process
# and the strategy tests).
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployment_superlink_and_two_supernodes(tiny_model, tmp_path, child_env):
    link_port, *node_ports = _free_ports(3)
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home)}
    processes, logs = [], []

    def start(name, *args):
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen([str(BIN / args[0]), *args[1:]],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    save = tmp_path / "run"
    rc = _flowertune_run_config(tiny_model, save, **{"num-server-rounds": 2, "warmup-rounds": 1, "data.num-groups": 1,
                                                     "data.samples-per-node": 40, "train.local-steps": 2,
                                                     "round-timeout": 240})
    overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in rc.items())
    try:
        start("superlink", "flower-superlink", "--insecure", "--port", str(link_port),
              "--disable-runtime-dependency-installation")
        for k, port in enumerate(node_ports):
            start(f"supernode{k}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(port), "--node-config", f"partition-id={k} num-partitions=2")
        deadline = time.monotonic() + 120
        run = None
        while time.monotonic() < deadline:        # the SuperLink may still be starting: retry the submission
            run = subprocess.run([str(BIN / "flwr"), "run", str(APP), "test", "--stream", "--run-config", overrides],
                                 capture_output=True, text=True, env=env, timeout=420)
            if "Successfully started run" in run.stdout:
                break
            time.sleep(2)
        assert run is not None and "Successfully started run" in run.stdout, run.stdout + run.stderr
        assert (save / "summary.json").is_file(), "the run did not finish:\n" + run.stdout[-6000:] + run.stderr
        summary = json.loads((save / "summary.json").read_text())
        assert summary["failures"] == [] and sorted(summary["evaluate"]) == ["1", "2"]
        assert len(summary["evaluate_per_node"]["2"]) == 2            # both SuperNodes evaluated personalised
        tree = json.loads((save / "tree.json").read_text())
        assert len(tree["client_names"]) == 2
        for node in tree["client_names"]:
            assert (save / f"node_{node}" / "cluster.safetensors").is_file()
        assert "configure_train: round 2 (federated), 2 node(s)" in run.stdout
    finally:
        _stop(processes)
        for log in logs:
            log.close()
    for name in ("superlink", "supernode0", "supernode1"):
        assert (tmp_path / f"{name}.log").read_text()      # they did run and log
    assert all(proc.poll() is not None for proc in processes)
