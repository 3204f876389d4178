"""The methods' server rules on synthetic PEFT state dicts, against float64 means written out by hand."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedtreelora.federation.config import ExperimentConfig
from fedtreelora.core import group_experts
from fedtreelora.federation.methods import METHODS, make_method

PREFIX = "base_model.model.bert.encoder.layer"


def fake_states(n, n_layers=3, groups=None, seed=0, spread=1.0):
    """PEFT-style LoRA state dicts (q, v per layer + head); B factors drawn around a centre per group."""
    g = torch.Generator().manual_seed(seed)
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    centres = {int(c): torch.randn(n_layers, 2, 6, 2, generator=g) * 3 for c in set(groups.tolist())}
    states = []
    for k in range(n):
        s = {}
        for l in range(n_layers):
            for j, m in enumerate(("query", "value")):
                s[f"{PREFIX}.{l}.attention.self.{m}.lora_A.weight"] = torch.randn(2, 6, generator=g)
                s[f"{PREFIX}.{l}.attention.self.{m}.lora_B.weight"] = (centres[int(groups[k])][l, j]
                                                                         + spread * 0.1 * torch.randn(6, 2, generator=g))
        s["base_model.model.classifier.weight"] = torch.randn(3, 6, generator=g)
        s["base_model.model.classifier.bias"] = torch.randn(3, generator=g)
        states.append(s)
    return states


def wmean(states, members, key, w):
    members = list(members)
    if not members:
        return None
    ws = torch.tensor([w[i] for i in members], dtype=torch.float64)
    return sum(ws[j] * states[i][key].double() for j, i in enumerate(members)) / ws.sum()


def check_against_hand(states, experts, key_labels, w, mixing):
    """key_labels(key) -> labels [N] of the partition that key follows."""
    n = len(states)
    for k, (cluster, external) in enumerate(experts):
        assert set(cluster) == set(states[k])
        for key in states[k]:
            lab = key_labels(key)
            same = [i for i in range(n) if lab[i] == lab[k]]
            other = [i for i in range(n) if lab[i] != lab[k]]
            torch.testing.assert_close(cluster[key].double(), wmean(states, same, key, w), rtol=1e-5, atol=1e-5)
            if mixing and external is not None:
                want = wmean(states, other, key, w)
                want = torch.zeros_like(states[k][key].double()) if want is None else want
                torch.testing.assert_close(external[key].double(), want, rtol=1e-5, atol=1e-5)
        if not mixing:
            assert external is None


def layer_of(key):
    return int(key.split("layer.")[1].split(".")[0]) if "lora_" in key else None


CFG = ExperimentConfig(fixed_clusters=2)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_group_experts_equals_hand_means(n, seed):
    rng = np.random.default_rng(seed)
    states = fake_states(n, seed=seed)
    n_layers = 3
    labels = rng.integers(0, 3, (n_layers + 1, n))    # one row per layer, the last for the head
    w = rng.uniform(1, 5, n)
    experts = group_experts(states, labels[:-1], w, head_labels=labels[-1])
    check_against_hand(states, experts, lambda key: labels[n_layers if layer_of(key) is None else layer_of(key)], w,
                       mixing=True)
    for k, (_, external) in enumerate(experts):
        everyone = all((labels[s] == labels[s, k]).all() for s in range(len(labels)))
        assert (external is None) == everyone


def test_inputs_are_not_modified_and_dtypes_kept():
    states = [{k: v.half() for k, v in s.items()} for s in fake_states(4, seed=1)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    out = group_experts(states, np.zeros((3, 4)), np.ones(4))
    for s, b in zip(states, before):
        assert all(torch.equal(s[k], b[k]) for k in s)
    assert all(v.dtype == torch.float16 for v in out[0][0].values())


def test_group_experts_refuses_mixed_dtypes_and_bad_labels():
    states = fake_states(3, seed=1)
    states[1] = {k: v.half() for k, v in states[1].items()}
    with pytest.raises(TypeError, match="client 1"):
        group_experts(states, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="layer_labels must have shape"):
        group_experts(fake_states(3, seed=1), np.zeros((2, 3)))


@pytest.mark.parametrize("name", ["local", "fedit", "fedsa", "fedalt", "oracle-groups"])
def test_fixed_rule_methods(name):
    n, groups = 5, np.array([0, 0, 1, 1, 1])
    states = fake_states(n, groups=groups, seed=2)
    w = np.array([1.0, 2.0, 3.0, 1.0, 5.0])
    method = make_method(name)
    method.setup(states, w, CFG, groups)
    experts = method.aggregate(states, w)
    own, everyone = np.arange(n), np.zeros(n, dtype=int)
    rule = {
        "local": lambda key: own,
        "fedit": lambda key: everyone,
        "fedsa": lambda key: everyone if "lora_A" in key else own,
        "fedalt": lambda key: own,
        "oracle-groups": lambda key: groups,
    }[name]
    check_against_hand(states, experts, rule, w, mixing=(name == "fedalt"))
    if name == "fedalt":
        assert all(e is not None for _, e in experts)


@pytest.mark.parametrize("super_groups", [2, 0])
def test_oracle_tree_shares_a_trunk_then_super_groups_then_groups(super_groups):
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3, 1])
    states = fake_states(len(groups), n_layers=6, groups=groups, seed=5)
    w = np.array([1.0, 2.0, 3.0, 1.0, 5.0, 2.0, 1.0, 4.0, 2.0])
    cfg = ExperimentConfig(num_groups=4, super_groups=super_groups)
    method = make_method("oracle-tree")
    method.setup(states, w, cfg, groups)
    supers = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0]) if super_groups else groups
    levels = [np.zeros_like(groups)] * 2 + [supers] * 2 + [groups] * 2
    check_against_hand(states, method.aggregate(states, w),
                       lambda key: groups if layer_of(key) is None else levels[layer_of(key)], w, mixing=False)
    assert method.summary()["n_clusters"] == [1, 1, 2 if super_groups else 4, 2 if super_groups else 4, 4, 4]


@pytest.mark.parametrize("n_layers, cuts", [(1, [4]), (2, [1, 4]), (3, [1, 2, 4])])
def test_oracle_tree_always_ends_at_the_groups(n_layers, cuts):
    groups = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    states = fake_states(len(groups), n_layers=n_layers, groups=groups, seed=6)
    method = make_method("oracle-tree")
    method.setup(states, np.ones(len(groups)), ExperimentConfig(num_groups=4, super_groups=2), groups)
    assert method.summary()["n_clusters"] == cuts


def test_oracle_tree_invents_no_super_groups_for_prompt_datasets():
    # prompt datasets put one group per client (partition_by_group), never nested in super-groups
    groups = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    cfg = ExperimentConfig(task="causal_lm", dataset="aclsum", model="smollm2", num_groups=4, group_column="task")
    assert cfg.super_group_count == 2
    method = make_method("oracle-tree")
    method.setup(fake_states(8, n_layers=6, groups=groups, seed=7), np.ones(8), cfg, groups)
    assert method.summary()["n_clusters"] == [1, 1, 4, 4, 4, 4]


@pytest.mark.parametrize("name", ["flat", "ablation-fixed", "ablation-perlayer"])
def test_clustering_methods_find_planted_groups(name):
    groups = np.array([0, 1, 0, 1, 0, 1])
    states = fake_states(6, groups=groups, seed=3)
    w = np.ones(6)
    method = make_method(name)
    method.setup(states, w, CFG, groups)
    labels = np.asarray(method.summary()["labels"])
    for row in labels:
        # every layer's partition is the planted one (up to renaming)
        assert len(set(zip(row.tolist(), groups.tolist()))) == 2 and len(set(row.tolist())) == 2
    experts = method.aggregate(states, w)
    mixing = name != "flat"
    check_against_hand(states, experts, lambda key: groups, w, mixing=mixing)


def test_perlayer_ablation_clusters_each_layer_on_its_own():
    # layer 0: no structure (tau wins -> one cluster); layers 1-2 planted groups
    groups = np.array([0, 0, 0, 1, 1, 1])
    states = fake_states(6, groups=groups, seed=4)
    base = fake_states(1, seed=9)[0]
    for s in states:
        for key in s:
            if layer_of(key) == 0 and "lora_B" in key:
                s[key] = base[key].clone()  # identical: silhouette 0 < tau (random jitter could beat tau)
    method = make_method("ablation-perlayer")
    method.setup(states, np.ones(6), CFG, groups)
    assert method.summary()["n_clusters"] == [1, 2, 2]


def test_tree_method_matches_group_means_of_its_own_tree():
    groups = np.array([0, 0, 0, 1, 1, 1])
    states = fake_states(6, groups=groups, seed=5)
    w = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0])
    method = make_method("fedtreelora")
    method.setup(states, w, CFG, groups)
    labels = np.asarray(method.summary()["labels"])
    assert labels.shape == (3, 6)
    assert labels[-1].tolist() in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])   # deep layer: the planted groups
    experts = method.aggregate(states, w)
    deepest = labels[-1]
    check_against_hand(states, experts, lambda key: labels[layer_of(key)] if layer_of(key) is not None else deepest,
                       w, mixing=True)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'fedavg'"):
        make_method("fedavg")
    assert {"fedtreelora", "local", "fedit", "fedsa", "flat", "fedalt", "ablation-fixed", "ablation-perlayer"} <= set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("head", ["local", "global"])
def test_head_setting_shares_the_head_and_leaves_the_layers_alone(name, head):
    # `head: local` keeps each client's own head, `head: global` averages it over everyone, in every
    # method that shares (`local` never does); the LoRA layers are what the method decides either way.
    groups = np.array([0, 1, 0, 1, 0, 1])
    states = fake_states(6, groups=groups, seed=6)
    w = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0])
    runs = {}
    for policy in ("deepest", head):
        method = make_method(name)
        method.setup(states, w, CFG.replace(head=policy), groups)
        runs[policy] = method.aggregate(states, w)
    head_keys = [key for key in states[0] if layer_of(key) is None]
    everyone = list(range(6))
    for k in range(6):
        for key in states[0]:
            got, base = runs[head][k][0][key], runs["deepest"][k][0][key]
            if key not in head_keys:
                torch.testing.assert_close(got, base, rtol=0, atol=0)
            elif name == "local" or head == "local":
                torch.testing.assert_close(got, states[k][key], rtol=0, atol=0)
            else:
                torch.testing.assert_close(got.double(), wmean(states, everyone, key, w), rtol=1e-5, atol=1e-5)
    fresh = fake_states(6, groups=groups, seed=6)   # the uploads were not modified
    assert all(torch.equal(fresh[k][key], states[k][key]) for k in range(6) for key in states[k])


def test_head_setting_is_validated_and_reaches_the_tree():
    with pytest.raises(ValueError, match="config head must be one of"):
        ExperimentConfig(head="shared")
    assert ExperimentConfig(head="local").tree_config().head == "local"
    assert ExperimentConfig().tree_config().head == "deepest"


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("head", ["local", "global"])
def test_head_setting_holds_for_late_clients_and_after_a_resume(name, head):
    import json
    groups = np.array([0, 1, 0, 1, 0, 1])
    states = fake_states(6, groups=groups, seed=7)
    w = np.ones(6)
    cfg = CFG.replace(head=head)
    method = make_method(name)
    method.setup(states[:4], w[:4], cfg, groups[:4], names=[f"c{k}" for k in range(4)])
    method.extend(states[:4], states[4:], w, groups, names=["c4", "c5"])   # two late clients
    resumed = make_method(name)
    resumed.load_state(json.loads(json.dumps(method.state())), cfg)
    head_keys = [key for key in states[0] if layer_of(key) is None]
    for rule in (method, resumed):
        experts = rule.aggregate(states, w)
        for k in range(6):
            for key in head_keys:
                want = (states[k][key].double() if name == "local" or head == "local"
                        else wmean(states, range(6), key, w))
                torch.testing.assert_close(experts[k][0][key].double(), want, rtol=1e-5, atol=1e-5)
