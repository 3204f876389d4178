"""`fedtreelora.flower.FedTreeLoRA` under flwr's own `Strategy.start`, on an in-process Grid, and the
client helpers `load_experts` / `make_reply` on tiny PEFT models. Fast except the one
`run_simulation` test (marked slow).

The synthetic nodes "train" by moving halfway from what they were sent towards their own target
adapter (`planted_states`: 2 groups that differ at the deepest layer and agree at the shallow
ones), so every upload, tree and expert can be recomputed here exactly.
"""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch

pytest.importorskip("flwr")

import fedtreelora  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import Result, Strategy  # noqa: E402

from fedtreelora import TreeConfig, aggregate, build_tree  # noqa: E402
from fedtreelora.core.synthetic import planted_states  # noqa: E402
from fedtreelora.flower import FedTreeLoRA, InProcessGrid, from_arrayrecord, load_experts, make_reply, to_arrayrecord  # noqa: E402
from fedtreelora.flower.arrays import DTYPE_RECORD, dtype_record  # noqa: E402
from fedtreelora.flower.peft_client import MIXING_STATE  # noqa: E402
from fedtreelora.flower.tree_strategy import logger  # noqa: E402
from peft_fixtures import tiny_peft_model  # noqa: E402

N_LAYERS, GROUPS = 3, (1, 1, 2)          # layers 0-1 shared by everyone, layer 2 split in 2 groups


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """What a ServerApp process has set before a strategy builds Messages."""
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    random.seed(0)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))

    def warnings(self):
        return [m for level, m in self.messages if level >= logging.WARNING]


@pytest.fixture
def records():
    handler = Records()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class SyntheticNode:
    """A ClientApp-like function: upload = (sent + target) / 2; logs what it received."""

    def __init__(self, target, weight, dtype=None, fail_rounds=(), silent_rounds=()):
        self.target = target
        self.weight = weight
        self.dtype = dtype
        self.fail_rounds, self.silent_rounds = set(fail_rounds), set(silent_rounds)
        self.received = []                       # (message type, round, phase, arrays, external or None)

    def __call__(self, msg: Message, context):
        content = msg.content
        config = content.config_records["config"]
        rnd, kind = int(config["server-round"]), msg.metadata.message_type
        sent = from_arrayrecord(content.array_records["arrays"])
        external = from_arrayrecord(content.array_records["external"]) if "external" in content.array_records else None
        self.received.append((kind, rnd, str(config["phase"]), sent, external, dict(config)))
        if kind == "train" and rnd in self.fail_rounds:
            raise RuntimeError(f"injected failure in round {rnd}")
        if kind == "train" and rnd in self.silent_rounds:
            return None                          # the grid sends nothing back: a timeout
        if kind == "evaluate":
            return Message(RecordDict({"metrics": MetricRecord({"accuracy": float(context.node_id % 7) / 10,
                                                                "num-examples": self.weight})}), reply_to=msg)
        upload = {k: (sent[k].double() + self.target[k].double()).div(2).to(self.dtype or self.target[k].dtype)
                  for k in self.target}
        reply = RecordDict({"arrays": to_arrayrecord(upload),
                            "metrics": MetricRecord({"train-loss": float(context.node_id), "num-examples": self.weight})})
        cast = dtype_record(upload)
        if cast is not None:
            reply[DTYPE_RECORD] = cast
        return Message(reply, reply_to=msg)

    def uploads(self):
        """What this node uploaded, per round (recomputed from what it received)."""
        out = {}
        for kind, rnd, _, sent, _, _ in self.received:
            if kind == "train" and rnd not in self.fail_rounds | self.silent_rounds:
                out[rnd] = {k: (sent[k].double() + self.target[k].double()).div(2).to(self.dtype or self.target[k].dtype)
                            for k in self.target}
        return out

    def got(self, kind, rnd):
        hits = [r for r in self.received if r[0] == kind and r[1] == rnd]
        assert len(hits) == 1, f"{kind} messages in round {rnd}: {len(hits)}"
        return hits[0]


class LateGrid(InProcessGrid):
    """Nodes in `joins` connect only from that round on (the round is counted from the strategy's calls)."""

    def __init__(self, apps, joins):
        self.pending = {node: (apps[node], rnd) for node, rnd in joins.items()}
        super().__init__({n: a for n, a in apps.items() if n not in joins})
        self.calls = 0

    def get_node_ids(self):
        rnd = self.calls // 2 + 1
        for node, (app, join) in list(self.pending.items()):
            if join <= rnd:
                self.add_node(node, app)
                del self.pending[node]
        return super().get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        return super().send_and_receive(messages, timeout=timeout)


def _federation(n=6, dtype=torch.float32, weights=None, node_options=None):
    states, truth = planted_states(n_layers=N_LAYERS, groups=GROUPS, n_clients=n, separation=5.0, noise=0.05,
                                   seed=1, dtype=dtype)
    initial = {k: torch.zeros_like(v) for k, v in states[0].items()}
    weights = weights or [10 + 5 * k for k in range(n)]
    nodes = {100 + k: SyntheticNode(states[k], weights[k], dtype=dtype, **(node_options or {}).get(100 + k, {}))
             for k in range(n)}
    return nodes, initial, truth


def _expected_experts(strategy, uploads, weights, nodes):
    names = {str(n): uploads[n] for n in nodes}
    return aggregate(names, weights={str(n): weights[n] for n in nodes}, tree=strategy.tree)


def _close(a, b, **kw):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), **kw)


def test_strategy_is_a_flower_strategy_with_fedavgs_argument_names():
    import inspect
    from flwr.serverapp.strategy import FedAvg
    assert issubclass(FedTreeLoRA, Strategy)
    params = list(inspect.signature(FedTreeLoRA).parameters)
    assert params[:14] == ["tree_config", "warmup_rounds", "fraction_train", "fraction_evaluate", "min_train_nodes",
                           "min_evaluate_nodes", "min_available_nodes", "weighted_by_key", "arrayrecord_key",
                           "external_key", "configrecord_key", "clip_norm", "robust", "trim_ratio"]
    fedavg = inspect.signature(FedAvg).parameters
    for name in ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
                 "weighted_by_key", "arrayrecord_key", "configrecord_key"):
        assert inspect.signature(FedTreeLoRA).parameters[name].default == fedavg[name].default, name
    assert inspect.signature(FedTreeLoRA).parameters["tree_config"].default == TreeConfig()
    for bad, match in ((dict(warmup_rounds=0), "warmup_rounds"), (dict(fraction_train=1.5), "fraction_train"),
                       (dict(robust="median"), "robust"), (dict(trim_ratio=0.5), "trim_ratio"),
                       (dict(min_train_nodes=-1), "min_train_nodes"), (dict(external_key="arrays"), "external_key"),
                       (dict(clip_norm=-1.0), "clip_norm")):
        with pytest.raises(ValueError, match=match):
            FedTreeLoRA(**bad)


def test_two_planted_groups_warmup_tree_and_personalised_rounds(records):
    nodes, initial, truth = _federation()
    grid = InProcessGrid(nodes)
    saved = {}
    strategy = FedTreeLoRA(warmup_rounds=2, experts_fn=lambda rnd, experts: saved.__setitem__(rnd, experts))
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=4,
                            train_config=ConfigRecord({"lr": 0.01}))
    assert isinstance(result, Result)
    ids = sorted(nodes)
    weights = {n: float(nodes[n].weight) for n in ids}

    # warm-up: every node trains from its own last upload (round 1: initial_arrays), nothing else travels
    for n in ids:
        kind, _, phase, sent, external, config = nodes[n].got("train", 1)
        assert phase == "warmup" and external is None and config["server-round"] == 1 and config["lr"] == 0.01
        _close(sent, initial)
        _, _, phase, sent, external, _ = nodes[n].got("train", 2)
        assert phase == "warmup" and external is None
        _close(sent, nodes[n].uploads()[1])

    # the tree: built once, at the end of warm-up, over the round-2 uploads, named by node id
    tree = strategy.tree
    assert tree.client_names == [str(n) for n in ids]
    assert tree.n_clusters.tolist() == [1, 1, 2]
    assert tree.labels.tolist() == truth.tolist()
    reference = build_tree({str(n): nodes[n].uploads()[2] for n in ids})
    assert tree.labels.tolist() == reference.labels.tolist()

    # federated rounds: each node its own cluster expert under "arrays" and external under "external"
    for rnd in (3, 4):
        latest = {n: nodes[n].uploads()[rnd - 1] for n in ids}
        expected = _expected_experts(strategy, latest, weights, ids)
        for n in ids:
            _, _, phase, sent, external, config = nodes[n].got("train", rnd)
            assert phase == "federated" and config["server-round"] == rnd
            _close(sent, expected.cluster_states[str(n)])
            _close(external, expected.external_states[str(n)])
    group0 = [n for k, n in enumerate(ids) if truth[-1, k] == 0]
    key = "base_model.model.bert.encoder.layer.2.attention.self.query.lora_B.weight"
    got = {n: nodes[n].got("train", 4)[3][key] for n in ids}
    assert all(torch.equal(got[group0[0]], got[n]) for n in group0)            # one cluster, one expert
    assert not torch.equal(got[group0[0]], got[ids[-1]])                        # the other group's differs
    shallow = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert all(torch.equal(nodes[ids[0]].got("train", 4)[3][shallow], nodes[n].got("train", 4)[3][shallow]) for n in ids)

    # evaluation: every node evaluated on the experts it holds after aggregation
    last = {n: nodes[n].uploads()[4] for n in ids}
    final = _expected_experts(strategy, last, weights, ids)
    for n in ids:
        _close(nodes[n].got("evaluate", 4)[3], final.cluster_states[str(n)])
        cluster, external = strategy.experts(n)
        _close(cluster, final.cluster_states[str(n)])
        _close(external, final.external_states[str(n)])
        _close(saved[4][n][0], cluster)
    assert sorted(saved) == [1, 2, 3, 4] and sorted(saved[1]) == ids

    # Result: the weighted global mean of the latest uploads, the weighted metrics
    total = sum(weights.values())
    mean = {k: sum(last[n][k].double() * weights[n] / total for n in ids) for k in last[ids[0]]}
    _close(from_arrayrecord(result.arrays), mean)
    assert result.train_metrics_clientapp[4]["train-loss"] == pytest.approx(sum(n * weights[n] for n in ids) / total)
    assert result.evaluate_metrics_clientapp[4]["accuracy"] == pytest.approx(
        sum((n % 7) / 10 * weights[n] for n in ids) / total)
    assert sorted(strategy.evaluate_metrics[4]) == ids
    assert strategy.failures == [] and records.warnings() == []
    with pytest.raises(KeyError, match="node 999"):
        strategy.experts(999)


def test_external_absent_where_the_cluster_is_everyone():
    nodes, initial, _ = _federation(n=4)
    strategy = FedTreeLoRA(tree_config=TreeConfig(tau=1.0), warmup_rounds=1)   # no split can beat tau = 1
    strategy.start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial), num_rounds=2)
    assert strategy.tree.n_clusters.tolist() == [1, 1, 1]
    for node in nodes.values():
        _, _, phase, sent, external, _ = node.got("train", 2)
        assert phase == "federated" and external is None
    assert strategy.experts(100)[1] is None


def test_failing_and_silent_nodes_keep_their_experts(records):
    nodes, initial, _ = _federation(node_options={101: dict(fail_rounds={3}), 104: dict(silent_rounds={3, 4})})
    ids = sorted(nodes)
    weights = {n: float(nodes[n].weight) for n in ids}
    snapshots = {}
    strategy = FedTreeLoRA(warmup_rounds=2, experts_fn=lambda rnd, experts: snapshots.__setitem__(rnd, experts))
    result = strategy.start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial), num_rounds=4)
    assert [(f["round"], f["node"], f["kind"]) for f in strategy.failures] == [(3, 101, "train"), (3, 104, "train"),
                                                                               (4, 104, "train")]
    assert "injected failure in round 3" in strategy.failures[0]["reason"]
    warned = records.warnings()
    assert any("node 101 failed to train in round 3" in m and "injected failure" in m for m in warned)
    assert sum("node 104 failed to train" in m and "no reply" in m for m in warned) == 2
    # round 3: 101 and 104 keep their round-2 experts; the others get experts over everyone's latest upload,
    # in which 101 and 104 are represented by their round-2 uploads
    latest = {n: nodes[n].uploads()[3] if 3 in nodes[n].uploads() else nodes[n].uploads()[2] for n in ids}
    expected = _expected_experts(strategy, latest, weights, ids)
    for n in ids:
        if n in (101, 104):
            _close(snapshots[3][n][0], snapshots[2][n][0])
        else:
            _close(snapshots[3][n][0], expected.cluster_states[str(n)])
    # a failed node is sent its kept experts in the next round, and 101 trains again from them
    _close(nodes[101].got("train", 4)[3], snapshots[2][101][0])
    assert 4 in nodes[101].uploads() and 4 not in nodes[104].uploads()
    assert 104 not in result.train_metrics_clientapp.get(4, {}) and sorted(strategy.train_metrics[4]) == \
        [n for n in ids if n != 104]


def test_node_silent_in_the_tree_round_is_in_the_tree_by_its_last_upload(records):
    nodes, initial, truth = _federation(node_options={102: dict(silent_rounds={2})})
    ids = sorted(nodes)
    strategy = FedTreeLoRA(warmup_rounds=2)
    strategy.start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial), num_rounds=3)
    latest = {n: nodes[n].uploads()[1 if n == 102 else 2] for n in ids}
    assert strategy.tree.labels.tolist() == build_tree({str(n): latest[n] for n in ids}).labels.tolist()
    expected = _expected_experts(strategy, latest, {n: float(nodes[n].weight) for n in ids}, ids)
    _, _, phase, sent, external, _ = nodes[102].got("train", 3)     # its tree experts, not its local adapter
    assert phase == "federated"
    _close(sent, expected.cluster_states["102"])
    _close(external, expected.external_states["102"])
    assert any("node 102 failed to train in round 2" in m for m in records.warnings())


def test_nodes_not_sampled_are_represented_by_their_last_upload():
    nodes, initial, _ = _federation()
    ids = sorted(nodes)
    weights = {n: float(nodes[n].weight) for n in ids}
    strategy = FedTreeLoRA(warmup_rounds=1, fraction_train=0.5, min_train_nodes=2)
    strategy.start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial), num_rounds=4)
    trained = {rnd: [n for n in ids if rnd in nodes[n].uploads()] for rnd in (1, 2, 3, 4)}
    assert trained[1] == ids                                   # warm-up: every node, whatever fraction_train is
    assert all(len(trained[r]) == 3 for r in (2, 3, 4))       # then half of them
    latest = {n: nodes[n].uploads()[1] for n in ids}
    for rnd in (2, 3):
        latest.update({n: nodes[n].uploads()[rnd] for n in trained[rnd]})
        expected = _expected_experts(strategy, latest, weights, ids)
        for n in trained[rnd + 1]:                             # what the next round's sampled nodes receive
            _close(nodes[n].got("train", rnd + 1)[3], expected.cluster_states[str(n)])
    not_sampled = [n for n in ids if n not in trained[4]]
    assert all(not any(r[0] == "train" and r[1] == 4 for r in nodes[n].received) for n in not_sampled)


def test_sampling_is_the_in_process_runs_draw_and_repeats_with_the_seed():
    from fedtreelora.federation.config import ExperimentConfig
    from fedtreelora.federation.draws import EVALUATE_DRAW, draw_clients
    from fedtreelora.federation.schedule import select_clients
    nodes, initial, _ = _federation()
    ids = sorted(nodes)
    runs = {}
    for seed in (3, 3, 4):
        for n in nodes.values():
            n.received.clear()
        strategy = FedTreeLoRA(warmup_rounds=1, fraction_train=0.5, fraction_evaluate=0.5, min_train_nodes=2,
                               min_evaluate_nodes=2, seed=seed)
        strategy.start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial), num_rounds=4)
        trained = {rnd: [n for n in ids if any(r[:2] == ("train", rnd) for r in nodes[n].received)] for rnd in (2, 3, 4)}
        evaluated = {rnd: sorted(strategy.evaluate_metrics[rnd]) for rnd in (2, 3, 4)}
        runs.setdefault(seed, []).append((trained, evaluated))
        config = ExperimentConfig(seed=seed, num_clients=len(ids), client_fraction=0.5)
        for rnd in (2, 3, 4):   # `fedtreelora simulate`'s clients 0..N-1 are the sorted node ids here
            assert trained[rnd] == [ids[k] for k in select_clients(config, rnd - 1, len(ids))]
            assert evaluated[rnd] == draw_clients(seed, rnd - 1, ids, len(ids) // 2, EVALUATE_DRAW)
            assert all(nodes[n].got("train", rnd)[5]["run-seed"] == seed for n in trained[rnd])
    assert runs[3][0] == runs[3][1] and runs[3][0] != runs[4][0]
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        FedTreeLoRA(seed=-1)


def test_training_seed_is_the_in_process_clients_seed(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    from fedtreelora.federation.draws import derived_seed
    from fedtreelora.flower import training_seed
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 3, "run-seed": 7})}), dst_node_id=5,
                  message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    # the ClientPool seeds client 2's local run of 0-based round 2 with derived_seed(seed, 2, 2)
    assert training_seed(msg, context) == derived_seed(7, 2, 2)
    assert training_seed(msg, Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                                      run_config={})) == derived_seed(7, 2, 5)   # no partition-id: the node id
    with pytest.raises(ValueError, match="no ConfigRecord 'cfg'"):
        training_seed(msg, context, configrecord_key="cfg")


def test_late_node_gets_the_global_mean_without_extend_tree(records, monkeypatch):
    monkeypatch.delattr(fedtreelora, "extend_tree", raising=False)
    nodes, initial, _ = _federation(n=7)
    late = 106
    grid = LateGrid(nodes, joins={late: 4})
    strategy = FedTreeLoRA(warmup_rounds=2)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=5)
    ids = [n for n in sorted(nodes) if n != late]
    assert strategy.tree.client_names == [str(n) for n in ids]          # placed nowhere
    weights = {n: float(nodes[n].weight) for n in sorted(nodes)}
    # round 4: it starts from the global mean of the round-3 uploads, with a warning
    before = {n: nodes[n].uploads()[3] for n in ids}
    total = sum(weights[n] for n in ids)
    mean3 = {k: sum(before[n][k].double() * weights[n] / total for n in ids) for k in before[ids[0]]}
    _, _, phase, sent, external, _ = nodes[late].got("train", 4)
    assert phase == "federated" and external is None
    _close(sent, mean3)
    assert any(f"node {late} was first seen in round 4" in m for m in records.warnings())
    assert any(f"node {late} first uploaded after warm-up" in m and "global mean" in m for m in records.warnings())
    # round 5: still the global mean, now over everyone's round-4 upload (its own included)
    after = {n: nodes[n].uploads()[4] for n in sorted(nodes)}
    total = sum(weights.values())
    mean4 = {k: sum(after[n][k].double() * weights[n] / total for n in after) for k in after[ids[0]]}
    _close(nodes[late].got("train", 5)[3], mean4)
    assert nodes[late].got("train", 5)[4] is None
    # the tree's nodes are aggregated over the tree's nodes only
    expected = _expected_experts(strategy, {n: after[n] for n in ids}, weights, ids)
    _close(nodes[ids[0]].got("train", 5)[3], expected.cluster_states[str(ids[0])])
    assert strategy.experts(late)[1] is None and result.arrays is not None


def test_late_node_is_placed_by_extend_tree_when_the_library_has_it(records, monkeypatch):
    calls = []

    def extend_tree(tree, client_states, new_states, names=None):
        """Stand-in with the open-membership signature: each new node joins node 100's clusters."""
        calls.append((list(client_states), list(new_states)))
        new = list(new_states)
        labels = torch.cat([tree.labels, tree.labels[:, :1].repeat(1, len(new))], dim=1)
        linkage = build_tree({**client_states, **new_states}).linkage   # a valid [N+M-1, 4] on this branch
        return fedtreelora.AggregationTree(layers=tree.layers, linkage=linkage, n_clusters=tree.n_clusters,
                                           labels=labels, scores=tree.scores, config=tree.config,
                                           client_names=list(tree.client_names) + new)

    monkeypatch.setattr(fedtreelora, "extend_tree", extend_tree, raising=False)
    nodes, initial, _ = _federation(n=7)
    late = 106
    strategy = FedTreeLoRA(warmup_rounds=2)
    strategy.start(grid=LateGrid(nodes, joins={late: 4}), initial_arrays=to_arrayrecord(initial), num_rounds=5)
    assert calls == [([str(n) for n in range(100, 106)], [str(late)])]
    assert strategy.tree.client_names[-1] == str(late)
    weights = {n: float(nodes[n].weight) for n in nodes}
    after = {n: nodes[n].uploads()[4] for n in nodes}
    expected = _expected_experts(strategy, after, weights, [int(c) for c in strategy.tree.client_names])
    _, _, _, sent, external, _ = nodes[late].got("train", 5)
    _close(sent, expected.cluster_states[str(late)])
    _close(sent, nodes[100].got("train", 5)[3])                   # it shares node 100's cluster expert
    _close(external, expected.external_states[str(late)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters_travel_and_come_back_in_their_dtype(dtype):
    nodes, initial, truth = _federation(n=4, dtype=dtype)
    strategy = FedTreeLoRA(warmup_rounds=1)
    result = strategy.start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial), num_rounds=2)
    wire = "float32" if dtype == torch.bfloat16 else "float16"
    assert {a.dtype for a in result.arrays.values()} == {wire}
    assert strategy.tree.labels.tolist() == truth.tolist()
    cluster, external = strategy.experts(100)
    assert {v.dtype for v in cluster.values()} == {dtype} and {v.dtype for v in external.values()} == {dtype}
    ids = sorted(nodes)
    latest = {str(n): {k: v.to(dtype) for k, v in nodes[n].uploads()[2].items()} for n in ids}
    expected = aggregate(latest, weights={str(n): float(nodes[n].weight) for n in ids}, tree=strategy.tree)
    tol = dict(rtol=1e-2, atol=1e-2)
    _close(cluster, expected.cluster_states["100"], **tol)


# -- the client helpers on a tiny PEFT model ---------------------------------------------------------
def _context(node=1):
    from flwr.app import Context
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _sent(content, message_type="train"):
    msg = Message(content, dst_node_id=1, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = "m-" + message_type
    return msg


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (4, 6), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}


def test_load_experts_and_make_reply_on_a_tiny_peft_model():
    from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
    from peft import get_peft_model_state_dict
    from peft_fixtures import randomised_state
    model, _ = tiny_peft_model("bert")
    keys = set(get_peft_model_state_dict(model))
    cluster, external = randomised_state(model, 1), randomised_state(model, 2)
    external = {k: v for k, v in external.items() if "lora_" in k}
    context = _context()
    msg = _sent(RecordDict({"arrays": to_arrayrecord(cluster), "external": to_arrayrecord(external),
                            "config": ConfigRecord({"server-round": 3})}))
    mixer = load_experts(model, msg, context, init_lam=0.7)
    state = get_peft_model_state_dict(model)
    _close(state, cluster)                                                     # the cluster expert is PEFT's adapter
    assert set(state) == keys                                                 # the mixer adds no adapter key
    assert mixer.active_groups == {"layer_0", "layer_1", "layer_2"}
    assert mixer.lams()["layer_0"] == pytest.approx(0.7)

    # lam is a model parameter: a plain optimiser over model.parameters() trains it
    assert any(p is mixer.logits["layer_1"] for p in model.parameters())
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.05)
    before = {g: float(p.detach()) for g, p in mixer.logits.items()}
    model.train()
    for step in range(3):
        loss = model(**_batch(step)).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    assert all(float(mixer.logits[g].detach()) != before[g] for g in before)
    trained = get_peft_model_state_dict(model)

    reply = make_reply(model, msg, context, num_examples=12, metrics={"train-loss": float(loss)})
    assert list(reply.content.array_records) == ["arrays"] and list(reply.content.metric_records) == ["metrics"]
    _close(from_arrayrecord(reply.content["arrays"]), trained)
    assert reply.content["metrics"]["num-examples"] == 12
    validate_message_reply_consistency([reply.content], "num-examples", check_arrayrecord=True)   # FedAvg accepts it
    assert reply.metadata.reply_to_message_id == "m-train"
    saved = from_arrayrecord(context.state[MIXING_STATE])
    assert {g: float(v) for g, v in saved.items()} == pytest.approx({g: float(p) for g, p in mixer.logits.items()})

    # next round: a fresh model, lam restored from context.state; no external expert -> plain LoRA
    fresh, _ = tiny_peft_model("bert", seed=3)
    msg2 = _sent(RecordDict({"arrays": to_arrayrecord(trained)}))
    mixer2 = load_experts(fresh, msg2, context)
    assert mixer2.lams() == pytest.approx(mixer.lams()) and mixer2.active_groups == set()
    # an evaluate reply carries metrics only
    reply = make_reply(fresh, _sent(RecordDict(), "evaluate"), context, num_examples=5, metrics={"accuracy": 0.5})
    assert list(reply.content.array_records) == [] and dict(reply.content["metrics"]) == {"accuracy": 0.5,
                                                                                          "num-examples": 5}


def test_hf_trainer_trains_lam_with_no_extra_code(tmp_path, one_thread):
    pytest.importorskip("accelerate")
    from peft_fixtures import randomised_state
    from transformers import Trainer, TrainingArguments
    model, _ = tiny_peft_model("bert")
    cluster, external = randomised_state(model, 1), randomised_state(model, 2)
    mixer = load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord(cluster), "external": to_arrayrecord(
        {k: v for k, v in external.items() if "lora_" in k})})), _context())
    before = {g: float(p.detach()) for g, p in mixer.logits.items()}
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in (_batch(0), _batch(1)) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.05,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert all(float(mixer.logits[g].detach()) != before[g] for g in before)


def test_trl_sft_trainer_trains_lam_with_no_extra_code(tmp_path, one_thread):
    """TRL's SFTTrainer on a PEFT causal LM after load_experts: lam (registered on the model) trains too."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from peft_fixtures import randomised_state
    from tiny_causal import tiny_tokenizer
    from trl import SFTConfig, SFTTrainer
    model, _ = tiny_peft_model("llama")
    cluster, external = randomised_state(model, 1), randomised_state(model, 2)
    mixer = load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord(cluster), "external": to_arrayrecord(external)})),
                         _context())
    assert mixer.active_groups
    before = {g: float(p.detach()) for g, p in mixer.logits.items()}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    g = torch.Generator().manual_seed(0)
    rows = datasets.Dataset.from_dict({"input_ids": torch.randint(4, 64, (8, 6), generator=g).tolist()})
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.05,
                     report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataset_num_proc=None)
    SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer()).train()
    assert all(float(mixer.logits[g].detach()) != before[g] for g in before)
    assert any(not torch.equal(p.detach(), lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


def test_external_expert_changes_the_forward_and_an_all_zero_one_does_not():
    from peft_fixtures import randomised_state
    model, _ = tiny_peft_model("llama")
    cluster = randomised_state(model, 1)
    zero_ext = {k: torch.zeros_like(v) for k, v in cluster.items()}
    x = {"input_ids": torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))}
    load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord(cluster)})), _context(), init_lam=0.6)
    model.eval()
    plain = model(**x).logits
    mixer = load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord(cluster),
                                                  "external": to_arrayrecord(zero_ext)})), _context())
    assert mixer.active_groups == set()                               # all-zero external: nothing mixes
    torch.testing.assert_close(model(**x).logits, plain)
    ext = randomised_state(model, 2)
    mixer = load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord(cluster), "external": to_arrayrecord(ext)})),
                         _context())
    assert mixer.active_groups and not torch.allclose(model(**x).logits, plain)


def test_client_helper_errors_name_the_key():
    from peft import get_peft_model_state_dict
    model, _ = tiny_peft_model("bert")
    state = get_peft_model_state_dict(model)
    key = sorted(state)[0]
    with pytest.raises(KeyError, match="no ArrayRecord 'arrays'"):
        load_experts(model, _sent(RecordDict({"weights": to_arrayrecord(state)})), _context())
    with pytest.raises(KeyError, match="lacks the model's adapter key"):
        load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord({k: v for k, v in state.items() if k != key})})),
                     _context())
    with pytest.raises(KeyError, match="extra.weight"):
        load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord({**state, "extra.weight": torch.ones(1)})})),
                     _context())
    msg = _sent(RecordDict({"arrays": to_arrayrecord(state)}))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_examples"):
            make_reply(model, msg, _context(), num_examples=bad)
    with pytest.raises(ValueError, match="'note'"):
        make_reply(model, msg, _context(), num_examples=3, metrics={"note": "text"})
    with pytest.raises(ValueError, match="num-examples"):
        make_reply(model, msg, _context(), num_examples=3, metrics={"num-examples": 4})


def test_bf16_model_replies_float32_and_records_its_dtype():
    from peft import get_peft_model_state_dict
    model, _ = tiny_peft_model("bert")
    model.to(torch.bfloat16)
    state = get_peft_model_state_dict(model)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    with pytest.raises(TypeError):
        ArrayRecord(state)                                       # what FlowerTune's own line does with bf16
    context = _context()
    load_experts(model, _sent(RecordDict({"arrays": to_arrayrecord(state)})), context)
    reply = make_reply(model, _sent(RecordDict()), context, num_examples=4)
    assert {a.dtype for a in reply.content["arrays"].values()} == {"float32"}
    from fedtreelora.flower.arrays import read_dtypes
    dtypes = read_dtypes(reply.content.config_records[DTYPE_RECORD])
    assert set(dtypes) == set(state) and set(dtypes.values()) == {torch.bfloat16}
    back = from_arrayrecord(reply.content["arrays"], dtypes)
    assert all(torch.equal(back[k], state[k]) for k in state)


# -- a PEFT ClientApp end to end: the in-process Grid, then Flower's simulation engine ---------------
_BASE = {}


def fresh_model():
    """A new tiny PEFT BERT per message, as a FlowerTune ClientApp builds one (a copy of one built once: fast)."""
    import copy
    if "bert" not in _BASE:
        _BASE["bert"] = tiny_peft_model("bert")[0]
    return copy.deepcopy(_BASE["bert"])


def peft_client_app(steps: int = 2):
    """A minimal FlowerTune-shaped ClientApp on the tiny BERT: node k's labels are permuted by its group."""
    from flwr.clientapp import ClientApp
    app = ClientApp()

    def data(context):
        k = int(context.node_config.get("partition-id", context.node_id % 4))
        g = torch.Generator().manual_seed(k)
        x = torch.randint(0, 64, (16, 6), generator=g)
        y = (x[:, 0] % 3 + (k % 2)) % 3                           # two groups: conflicting labels
        return x, y

    @app.train()
    def train(msg, context):
        model = fresh_model()
        load_experts(model, msg, context)
        x, y = data(context)
        optimiser = torch.optim.AdamW(model.parameters(), lr=float(msg.content["config"].get("lr", 0.05)))
        model.train()
        for step in range(steps):
            loss = model(input_ids=x[step * 8:(step + 1) * 8], labels=y[step * 8:(step + 1) * 8]).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        return make_reply(model, msg, context, num_examples=len(x), metrics={"train-loss": float(loss.detach())})

    @app.evaluate()
    def evaluate(msg, context):
        model = fresh_model()
        load_experts(model, msg, context)
        x, y = data(context)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=x, labels=y)
        acc = float((out.logits.argmax(-1) == y).float().mean())
        return make_reply(model, msg, context, num_examples=len(x), metrics={"accuracy": acc, "loss": float(out.loss)})

    return app


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_peft_client_app_on_the_in_process_grid(one_thread):
    from peft import get_peft_model_state_dict
    model, _ = tiny_peft_model("bert")
    app = peft_client_app()
    grid = InProcessGrid({n: app for n in (11, 12, 13, 14)},
                         node_configs={n: {"partition-id": n - 11} for n in (11, 12, 13, 14)})
    strategy = FedTreeLoRA(warmup_rounds=1)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(get_peft_model_state_dict(model)), num_rounds=3,
                            train_config=ConfigRecord({"lr": 0.05}))
    assert strategy.failures == []
    assert strategy.tree.client_names == ["11", "12", "13", "14"]
    assert set(result.evaluate_metrics_clientapp) == {1, 2, 3} and "accuracy" in result.evaluate_metrics_clientapp[3]
    for n in (11, 12, 13, 14):                                    # lam lives on the node, in its context
        assert MIXING_STATE in grid.contexts[n].state.array_records
        cluster, _ = strategy.experts(n)
        assert set(cluster) == set(get_peft_model_state_dict(model))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_simulation_with_four_nodes(tmp_path, monkeypatch):
    """The same ServerApp line a FlowerTune app has, on Flower's simulation engine (Ray), 4 SuperNodes."""
    import os
    import sys
    from pathlib import Path
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from peft import get_peft_model_state_dict
    tests = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out.pt"
    server = ServerApp()

    @server.main()
    def main(grid, context):
        model, _ = tiny_peft_model("bert")
        strategy = FedTreeLoRA(warmup_rounds=1, min_available_nodes=4)
        result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(get_peft_model_state_dict(model)),
                                num_rounds=2, train_config=ConfigRecord({"lr": 0.05}))
        torch.save({"names": strategy.tree.client_names, "failures": strategy.failures,
                    "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
                    "external": {int(n): strategy.experts(int(n))[1] is not None for n in strategy.tree.client_names}},
                   out)

    run_simulation(server, peft_client_app(), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0}})
    assert out.is_file(), "the ServerApp did not finish"
    got = torch.load(out)
    assert len(got["names"]) == 4 and got["failures"] == []
    assert set(got["evaluate"]) == {1, 2} and "accuracy" in got["evaluate"][2]
    assert sys.modules.get("flwr") is not None


def test_robust_and_clip_settings_reach_aggregate():
    nodes, initial, _ = _federation()
    ids = sorted(nodes)
    strategy = FedTreeLoRA(warmup_rounds=1, robust="trimmed_mean", trim_ratio=0.2, clip_norm="median")
    strategy.start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial), num_rounds=2)
    latest = {str(n): nodes[n].uploads()[2] for n in ids}
    weights = {str(n): float(nodes[n].weight) for n in ids}
    expected = aggregate(latest, weights=weights, tree=strategy.tree, robust="trimmed_mean", trim_ratio=0.2,
                         clip_norm="median")
    plain = aggregate(latest, weights=weights, tree=strategy.tree)
    _close(strategy.experts(100)[0], expected.cluster_states["100"])
    key = next(k for k in plain.cluster_states["100"] if "layer.2" in k and "lora_B" in k)
    assert not torch.allclose(plain.cluster_states["100"][key], expected.cluster_states["100"][key])


def test_malformed_replies_are_errors_that_name_the_node():
    nodes, initial, _ = _federation(n=4)

    def two_records(msg, context):
        reply = nodes[101](msg, context)
        if msg.metadata.message_type == "train":
            reply.content["extra"] = to_arrayrecord({"x": torch.ones(1)})
        return reply

    def no_weight(msg, context):
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"loss": 1.0})}),
                       reply_to=msg)

    for node, app, match in ((101, two_records, "node 101's train reply must carry exactly one ArrayRecord"),
                             (102, no_weight, "node 102's MetricRecord lacks the weight 'num-examples'")):
        apps = dict(nodes)
        apps[node] = app
        with pytest.raises(ValueError, match=match):
            FedTreeLoRA(warmup_rounds=1).start(grid=InProcessGrid(apps), initial_arrays=to_arrayrecord(initial),
                                               num_rounds=1)


def test_late_node_is_placed_by_the_librarys_extend_tree(records):
    if not hasattr(fedtreelora, "extend_tree"):
        pytest.skip("this fedtreelora has no extend_tree (the fallback is tested above)")
    nodes, initial, truth = _federation(n=7)
    late = 106                                                   # planted in the second group at the deep layer
    strategy = FedTreeLoRA(warmup_rounds=2)
    strategy.start(grid=LateGrid(nodes, joins={late: 4}), initial_arrays=to_arrayrecord(initial), num_rounds=5)
    names = strategy.tree.client_names
    assert names[-1] == str(late) and len(names) == 7
    column = {n: strategy.tree.labels[:, names.index(str(n))].tolist() for n in nodes}
    same_group = [n for k, n in enumerate(sorted(nodes)) if n != late and truth[-1, k] == truth[-1, 6]]
    assert column[late] == column[same_group[0]]                 # the nearest cluster: its planted group
    weights = {n: float(nodes[n].weight) for n in nodes}
    after = {n: nodes[n].uploads()[4] for n in nodes}
    expected = _expected_experts(strategy, after, weights, [int(c) for c in names])
    _, _, _, sent, external, _ = nodes[late].got("train", 5)
    _close(sent, expected.cluster_states[str(late)])
    _close(external, expected.external_states[str(late)])
    assert not any("global mean (no cluster" in m for m in records.warnings())


def test_docs_switch_diff_calls_the_real_api():
    """The new side of docs/flower.md's FlowerTune diff, executed: the server's imports, initial arrays and
    strategy statement, then the client's train body on a tiny PEFT model (the trainer a stand-in)."""
    import textwrap
    from pathlib import Path
    from types import SimpleNamespace
    from peft import get_peft_model_state_dict
    text = (Path(__file__).resolve().parents[1] / "docs" / "flower.md").read_text()
    section = text[text.index("## Switch your FlowerTune app to FedTreeLoRA"):]
    diff = section[section.index("```diff\n") + 8:section.index("\n```", section.index("```diff"))]
    files = {}
    for line in diff.splitlines():
        if line.startswith("--- "):
            current = files.setdefault(line[4:].strip(), [])
        elif not line.startswith(("+++", "@@", "-")):
            current.append(line[1:])
    assert sorted(files) == ["flowertune_llm/client_app.py", "flowertune_llm/server_app.py"]

    def define(lines, namespace, name, tail=""):
        """The file's new lines as function `name` in `namespace` (its imports run first)."""
        imports = [line for line in lines if line.startswith(("from ", "import "))]
        body = textwrap.dedent("\n".join(line for line in lines if line not in imports))
        exec("\n".join(imports), namespace)                      # noqa: S102 - the documented code itself
        exec(f"def {name}():\n{textwrap.indent(body, '    ')}\n    {tail}", namespace)   # noqa: S102
        return namespace[name]

    model, _ = tiny_peft_model("bert")
    cfg = SimpleNamespace(model=None, strategy=SimpleNamespace(fraction_train=0.5, fraction_evaluate=0.25))
    server = define(files["flowertune_llm/server_app.py"], {"cfg": cfg, "get_model": lambda _: model,
                                                            "get_peft_model_state_dict": get_peft_model_state_dict},
                    "main", "return locals()")()
    strategy = server["strategy"]
    assert isinstance(strategy, FedTreeLoRA) and (strategy.fraction_train, strategy.fraction_evaluate) == (0.5, 0.25)
    assert strategy.warmup_rounds == 2 and strategy.tree_config == TreeConfig()
    _close(from_arrayrecord(server["arrays"]), get_peft_model_state_dict(model))
    msg = _sent(RecordDict({"arrays": server["arrays"], "external": server["arrays"]}))
    context = _context()
    trainer = SimpleNamespace(train=lambda: SimpleNamespace(training_loss=0.25))
    client = {"cfg": cfg, "get_model": lambda _: model, "msg": msg, "context": context, "trainer": trainer,
              "trainset": [0] * 7}
    reply = define(files["flowertune_llm/client_app.py"], client, "train")()
    assert list(reply.content.array_records) == ["arrays"]
    assert dict(reply.content["metrics"]) == {"train_loss": 0.25, "num-examples": 7}
    assert hasattr(model, "expert_mixer") and MIXING_STATE in context.state.array_records


@pytest.mark.parametrize("name", ["fedtreelora.flower.arrays", "fedtreelora.flower.tree_strategy",
                                  "fedtreelora.flower.local_grid", "fedtreelora.client.mixing"])
def test_docstring_examples_of_the_flower_api(name):
    import doctest
    import importlib
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"


# -- resume: a restarted ServerApp continues with the stored tree ------------------------------------
class CrashGrid(InProcessGrid):
    """The ServerApp process dies (an exception out of the grid) at its `crash_at`-th send_and_receive."""

    def __init__(self, apps, crash_at):
        super().__init__(apps)
        self.calls, self.crash_at = 0, crash_at

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("the ServerApp was killed")
        return super().send_and_receive(messages, timeout=timeout)


def _run(nodes, initial, num_rounds, grid=None, **options):
    calls = []
    snapshots = {}

    def evaluate_fn(rnd, arrays):
        calls.append(rnd)
        return MetricRecord({"norm": float(sum(v.double().norm() for v in from_arrayrecord(arrays).values()))})

    strategy = FedTreeLoRA(warmup_rounds=2, experts_fn=lambda rnd, ex: snapshots.__setitem__(rnd, ex), **options)
    result = strategy.start(grid=grid or InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial),
                            num_rounds=num_rounds, evaluate_fn=evaluate_fn)
    return strategy, result, calls, snapshots


def _identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stop, dtype", [("after-round-3", torch.float32), ("killed-in-round-4", torch.bfloat16)])
def test_resume_reloads_the_tree_and_matches_an_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch, stop, dtype):
    failing = {101: dict(fail_rounds={3, 4})}
    nodes, initial, _ = _federation(dtype=dtype, node_options=failing)
    full, full_result, _, full_snapshots = _run(nodes, initial, 5, run_dir=tmp_path / "full")

    first_nodes, _, _ = _federation(dtype=dtype, node_options=failing)
    if stop == "after-round-3":
        _run(first_nodes, initial, 3, run_dir=tmp_path / "cut")
    else:   # killed after round 4's training was aggregated, before its evaluation: round 4 is not committed
        with pytest.raises(KeyboardInterrupt):
            _run(first_nodes, initial, 5, grid=CrashGrid(first_nodes, crash_at=8), run_dir=tmp_path / "cut")
        assert 4 in first_nodes[100].uploads()
    state = json.loads((tmp_path / "cut" / "checkpoints" / "strategy" / "state.json").read_text())
    assert state["round"] == 3 and state["tree"] is not None

    import fedtreelora.federation.methods as methods

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a resumed run must not build the tree again")
    monkeypatch.setattr(methods, "build_tree", no_rebuild)
    new_nodes, _, _ = _federation(dtype=dtype, node_options=failing)       # what the restarted ServerApp reaches
    resumed, result, calls, snapshots = _run(new_nodes, initial, 5, run_dir=tmp_path / "cut", resume=True)

    assert resumed.resumed_round == 3 and calls == [4, 5]                 # evaluate_fn only for the new rounds
    assert resumed.tree.to_dict() == full.tree.to_dict()
    for n in nodes:
        assert all(r[1] >= 4 for r in new_nodes[n].received)               # nobody is asked for rounds 1-3 again
        for kind in ("train", "evaluate"):
            for rnd in (4, 5):
                if kind == "train" or rnd in full.evaluate_metrics:
                    got, want = new_nodes[n].got(kind, rnd), nodes[n].got(kind, rnd)
                    _identical(got[3], want[3])
                    assert (got[4] is None) == (want[4] is None)
                    if want[4] is not None:
                        _identical(got[4], want[4])
        for got, want in zip(resumed.experts(n), full.experts(n)):
            _identical(got, want)
        for rnd in (4, 5):
            for got, want in zip(snapshots[rnd][n], full_snapshots[rnd][n]):
                _identical(got, want)
    assert sorted(snapshots) == [4, 5]
    _identical(from_arrayrecord(result.arrays), from_arrayrecord(full_result.arrays))
    for table in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
        want = {r: dict(m) for r, m in getattr(full_result, table).items()}
        assert {r: dict(m) for r, m in getattr(result, table).items()} == want, table
    assert resumed.failures == full.failures and [(f["round"], f["node"]) for f in full.failures] == [(3, 101), (4, 101)]
    assert resumed.train_metrics == full.train_metrics and resumed.evaluate_metrics == full.evaluate_metrics


def test_resume_refuses_an_occupied_run_dir_other_settings_and_other_arrays(tmp_path):
    from fedtreelora.federation.checkpoints import CheckpointError, RunFolderError
    nodes, initial, _ = _federation(n=4)
    FedTreeLoRA(warmup_rounds=1, run_dir=tmp_path).start(grid=InProcessGrid(nodes), initial_arrays=to_arrayrecord(initial),
                                                         num_rounds=2)
    fresh, _, _ = _federation(n=4)

    def start(arrays=initial, **options):
        FedTreeLoRA(**{"warmup_rounds": 1, "run_dir": tmp_path, **options}).start(
            grid=InProcessGrid(fresh), initial_arrays=to_arrayrecord(arrays), num_rounds=3)

    with pytest.raises(RunFolderError, match="already holds a FedTreeLoRA run .round 2 committed.: pass resume=True"):
        start()
    with pytest.raises(RunFolderError, match="warmup_rounds: committed 1, now 2"):
        start(warmup_rounds=2, resume=True)
    with pytest.raises(RunFolderError, match="tree_config: committed .*'tau': 0.1.*now .*'tau': 0.3"):
        start(tree_config=TreeConfig(tau=0.3), resume=True)
    with pytest.raises(RunFolderError, match="robust"):
        start(robust="trimmed_mean", resume=True)
    key = sorted(initial)[0]
    with pytest.raises(RunFolderError, match=f"initial_arrays lacks key '{key}'"):
        start({k: v for k, v in initial.items() if k != key}, resume=True)
    with pytest.raises(RunFolderError, match=f"initial_arrays key '{key}' is torch.float32 .2, 4."):
        start({**initial, key: torch.zeros(2, 4)}, resume=True)
    with pytest.raises(ValueError, match="resume=True needs run_dir"):
        FedTreeLoRA(resume=True)
    assert all(node.received == [] for node in fresh.values())           # refused before any node is contacted
    # sampling settings may change on resume (they decide neither the tree nor the experts)
    strategy = FedTreeLoRA(warmup_rounds=1, run_dir=tmp_path, resume=True, fraction_evaluate=0.5)
    strategy.start(grid=InProcessGrid(fresh), initial_arrays=to_arrayrecord(initial), num_rounds=3)
    assert strategy.resumed_round == 2 and [r[1] for r in fresh[100].received if r[0] == "train"] == [3]
    data = next((tmp_path / "checkpoints" / "strategy").glob("round_*.safetensors"))
    assert data.name == "round_003.safetensors"
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="SHA-256"):
        start(resume=True)
