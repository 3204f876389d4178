"""aggregate(): cluster and external experts against a float64 loop over keys and clusters."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import trim_mean
from sklearn.metrics import adjusted_rand_score

import fedtreelora as ftl
from fedtreelora import ops
from peft_fixtures import planted_states

LAYER = "base_model.model.bert.encoder.layer"


def reference_experts(states, labels, weights, head="deepest"):
    """Per client, float64 cluster and external means key by key (labels [L, N] from the tree)."""
    n = len(states)
    w = torch.as_tensor(weights, dtype=torch.float64)
    clus, ext = [dict() for _ in range(n)], [dict() for _ in range(n)]
    for key in states[0]:
        if ".lora_" in key:
            row = labels[int(key[len(LAYER) + 1:].split(".")[0])]
        else:
            row = labels[-1] if head == "deepest" else torch.zeros(n, dtype=torch.int64) if head == "global" else torch.arange(n)
        stacked = torch.stack([s[key].double() for s in states])
        for k in range(n):
            inside = row == row[k]
            wi = w[inside].reshape(-1, *[1] * (stacked.dim() - 1))
            clus[k][key] = (wi * stacked[inside]).sum(0) / w[inside].sum()
            if head == "local" and ".lora_" not in key:
                ext[k][key] = torch.zeros_like(stacked[k])
            elif bool((~inside).any()):
                wo = w[~inside].reshape(-1, *[1] * (stacked.dim() - 1))
                ext[k][key] = (wo * stacked[~inside]).sum(0) / w[~inside].sum()
            else:
                ext[k][key] = torch.zeros_like(stacked[k])
    return clus, ext


@pytest.mark.parametrize("head", ["deepest", "global", "local"])
def test_experts_equal_float64_reference(head):
    states, _ = planted_states()
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    counts = [10, 250, 3, 40, 7, 7, 100, 1]
    res = ftl.aggregate(states, weights=counts, config=ftl.TreeConfig(head=head))
    assert res.tree.n_clusters.tolist() == [1, 1, 2, 2, 4, 4]
    clus, ext = reference_experts(states, res.tree.labels, counts, head)
    for k in range(8):
        assert list(res.cluster_states[k]) == list(states[k]) == list(res.external_states[k])
        for key, t in states[k].items():
            got_c, got_e = res.cluster_states[k][key], res.external_states[k][key]
            assert got_c.shape == t.shape and got_c.dtype == t.dtype and got_c.device == t.device
            torch.testing.assert_close(got_c.double(), clus[k][key], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_e.double(), ext[k][key], rtol=1e-6, atol=1e-6)
            assert torch.equal(t, before[k][key])  # inputs never modified


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       equal=st.booleans())
def test_random_inputs_and_dtypes(n, seed, dtype, equal):
    states, _ = planted_states(n_clients=n, seed=seed, groups=(1, 2, 2, 3, 3, 3), dtype=dtype)
    weights = None if equal else (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 50 + 1).tolist()
    res = ftl.aggregate(states, weights=weights)
    clus, ext = reference_experts(states, res.tree.labels, weights or [1.0] * n)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for k in range(n):
        for key in states[0]:
            assert res.cluster_states[k][key].dtype == dtype
            torch.testing.assert_close(res.cluster_states[k][key].double(), clus[k][key], **tol)
            if res.external_states[k] is not None:
                torch.testing.assert_close(res.external_states[k][key].double(), ext[k][key], **tol)
    if int(res.tree.n_clusters.max()) == 1:
        assert all(e is None for e in res.external_states)


def test_stored_tree_skips_distances_and_linkage(monkeypatch):
    states, _ = planted_states()
    tree = ftl.build_tree(states)
    first = ftl.aggregate(states, tree=tree)

    def forbidden(*args, **kwargs):
        raise AssertionError("the per-round path must not recompute the tree")

    for name in ("layer_distances", "linkage", "silhouette", "cut_tree"):
        monkeypatch.setattr(ops, name, forbidden)
    again = ftl.aggregate(states, tree=tree)
    assert again.tree is tree
    for k in range(8):
        for key in states[0]:
            assert torch.equal(first.cluster_states[k][key], again.cluster_states[k][key])


def test_clients_of_a_cluster_share_storage_and_dicts_are_independent():
    states, _ = planted_states()
    res = ftl.aggregate(states)
    key = f"{LAYER}.5.attention.self.query.lora_B.weight"
    assert res.cluster_states[0][key].data_ptr() == res.cluster_states[1][key].data_ptr()  # views, no copies
    assert res.cluster_states[0][key].data_ptr() != res.cluster_states[2][key].data_ptr()
    res.cluster_states[0][key] = torch.zeros(1)
    assert res.cluster_states[1][key].shape == states[1][key].shape


def test_named_clients_and_weight_dicts():
    states, _ = planted_states(n_clients=4, groups=(1, 1, 2, 2, 2, 2))
    named = {f"site{k}": s for k, s in enumerate(states)}
    res = ftl.aggregate(named, weights={"site0": 1, "site1": 3, "site2": 2, "site3": 2})
    assert list(res.cluster_states) == list(named) and res.tree.client_names == list(named)
    key = f"{LAYER}.5.attention.self.value.lora_A.weight"
    torch.testing.assert_close(res.cluster_states["site1"][key], (states[0][key] + 3 * states[1][key]) / 4)
    with pytest.raises(ValueError, match="no entry for client"):
        ftl.aggregate(named, weights={"site0": 1})


def test_single_client_comes_back_unchanged_with_a_warning():
    states, _ = planted_states(n_clients=1, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="single client"):
        res = ftl.aggregate(states)
    assert res.external_states == [None]
    assert all(torch.equal(res.cluster_states[0][k], v) for k, v in states[0].items())


def test_trimmed_mean_ignores_a_huge_client():
    states, _ = planted_states(groups=(1, 1, 2, 2, 2, 2), n_clients=10, noise=0.1)
    honest = ftl.aggregate(states)
    poisoned = [dict(s) for s in states]
    poisoned[3] = {k: v * 1e6 for k, v in states[3].items()}
    tree = honest.tree
    plain = ftl.aggregate(poisoned, tree=tree)
    trimmed = ftl.aggregate(poisoned, tree=tree, robust="trimmed_mean", trim_ratio=0.2)
    key = f"{LAYER}.4.attention.self.query.lora_B.weight"
    shift_plain = (plain.cluster_states[0][key] - honest.cluster_states[0][key]).norm()
    shift_trim = (trimmed.cluster_states[0][key] - honest.cluster_states[0][key]).norm()
    assert shift_plain > 1e4 and shift_trim < 1.0  # the noise-level difference of dropping the tails
    # external expert of the other cluster (it contains client 3 as an outsider) is protected too
    assert (trimmed.external_states[9][key] - honest.external_states[9][key]).norm() < 1.0


def test_trimmed_mean_equals_scipy_with_equal_weights():
    states, _ = planted_states(groups=(1,) * 6, n_clients=10)
    tree = ftl.build_tree(states)
    res = ftl.aggregate(states, tree=tree, robust="trimmed_mean", trim_ratio=0.2)
    for key in list(states[0])[:6]:
        stacked = torch.stack([s[key] for s in states]).double().numpy()
        np.testing.assert_allclose(res.cluster_states[0][key].double().numpy(), trim_mean(stacked, 0.2, axis=0), rtol=1e-6, atol=1e-6)


def test_clipping_keeps_the_planted_groups_against_a_huge_client():
    states, truth = planted_states()
    poisoned = [dict(s) for s in states]
    poisoned[5] = {k: v * 1e6 for k, v in states[5].items()}
    broken = ftl.aggregate(poisoned).tree
    assert broken.n_clusters.tolist() != [1, 1, 2, 2, 4, 4]
    res = ftl.aggregate(poisoned, clip_norm="median")
    assert res.tree.n_clusters.tolist() == [1, 1, 2, 2, 4, 4]
    for l in range(6):
        assert adjusted_rand_score(truth[l].numpy(), res.tree.labels[l].numpy()) == 1.0
    key = f"{LAYER}.0.attention.self.query.lora_B.weight"
    assert res.cluster_states[0][key].norm() < 10  # the clipped client no longer dominates the trunk
    clipped = ftl.aggregate(states, clip_norm=1e-3)  # a float limit: every slice at most 1e-3
    assert clipped.cluster_states[0][key].norm() <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=[1, 2, 3]), "one entry per client"),
    (dict(weights=[1, 0, 1, 1, 1, 1, 1, 1]), "client 1 has weight 0"),
    (dict(weights=[1, float("nan")] + [1] * 6), "client 1 has weight nan"),
    (dict(robust="median"), "robust"),
    (dict(trim_ratio=0.5), "trim_ratio"),
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(clip_norm="mean"), "clip_norm"),
])
def test_bad_arguments(kwargs, message):
    states, _ = planted_states()
    with pytest.raises(ValueError, match=message):
        ftl.aggregate(states, **kwargs)


def test_bad_states_and_trees():
    states, _ = planted_states()
    bad = [dict(s) for s in states]
    bad[6] = dict(bad[6])
    bad[6][f"{LAYER}.2.attention.self.value.lora_A.weight"] = torch.full((2, 8), float("inf"))
    with pytest.raises(ValueError, match=r"client 6, key '.*layer.2.attention.self.value.lora_A.weight': NaN or Inf"):
        ftl.aggregate(bad)
    tree = ftl.build_tree(states)
    with pytest.raises(ValueError, match="tree was built for 8 clients, got 7"):
        ftl.aggregate(states[:7], tree=tree)
    fewer_layers = [{k: v for k, v in s.items() if f"{LAYER}.5." not in k} for s in states]
    with pytest.raises(ValueError, match="tree was built for the layers"):
        ftl.aggregate(fewer_layers, tree=tree)
    with pytest.raises(TypeError, match="AggregationTree"):
        ftl.aggregate(states, tree=tree.to_dict())


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's aggregate example, taken from README.md itself, runs and draws the tree."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "ftl.build_tree(client_states, config=config)" in b]
    assert len(blocks) == 1, "the README must hold exactly one runnable aggregate example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "tree.png").stat().st_size > 10_000


@pytest.mark.parametrize("head", ["deepest", "global", "local"])
def test_everyone_shares_means_no_external_and_fedavg(head):
    states, _ = planted_states(groups=(1,) * 6, n_clients=5, d=64, r=4)
    res = ftl.aggregate(states, config=ftl.TreeConfig(head=head))
    assert res.tree.n_clusters.tolist() == [1] * 6 and res.external_states == [None] * 5
    for key in states[0]:
        want = states[3][key] if head == "local" and ".lora_" not in key else torch.stack([s[key] for s in states]).mean(0)
        torch.testing.assert_close(res.cluster_states[3][key], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head", ["deepest", "global"])
def test_streamed_stored_tree_path_equals_the_packed_reduction_exactly(dtype, head):
    from fedtreelora.core import adapters
    from fedtreelora.core.aggregation import _experts, _segment_labels

    states, _ = planted_states(n_clients=9, dtype=dtype)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    tree = ftl.build_tree(states, ftl.TreeConfig(head=head))
    w = torch.arange(1, 10, dtype=torch.float64)
    res = ftl.aggregate(states, weights=w, tree=tree)
    layout = adapters.parse_layout(states)
    x = adapters.pack(states, layout)
    packed = _experts(x, layout, layout.layer_offsets, _segment_labels(tree.labels, layout, head), w,
                      int(tree.n_clusters.max()), None)
    for k in range(9):
        for key in states[0]:
            assert torch.equal(res.cluster_states[k][key], packed[0][k][key]), key
            assert torch.equal(res.external_states[k][key], packed[1][k][key]), key
    assert all(torch.equal(s[k], b[k]) for s, b in zip(states, before) for k in b)


def test_streamed_path_never_packs_and_names_a_nonfinite_a_factor(monkeypatch):
    from fedtreelora.core import aggregation

    states, _ = planted_states(n_clients=6)
    tree = ftl.build_tree(states)
    monkeypatch.setattr(aggregation.adapters, "pack", lambda *a, **k: pytest.fail("packed the clients"))
    ftl.aggregate(states, tree=tree)
    key = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"
    states[4][key][0, 3] = float("inf")
    with pytest.raises(ValueError, match=rf"client 4, key '{key}': NaN or Inf at index \(0, 3\)"):
        ftl.aggregate(states, tree=tree)


def test_streamed_blocks_of_any_size_give_the_same_experts(monkeypatch):
    from fedtreelora.core import aggregation

    states, _ = planted_states(n_clients=7)
    tree = ftl.build_tree(states)
    whole = ftl.aggregate(states, tree=tree)
    monkeypatch.setattr(aggregation, "_BLOCK_BYTES", 1)  # one segment per op call
    single = ftl.aggregate(states, tree=tree)
    for k in range(7):
        for key in states[0]:
            assert torch.equal(whole.cluster_states[k][key], single.cluster_states[k][key])
            assert torch.equal(whole.external_states[k][key], single.external_states[k][key])
