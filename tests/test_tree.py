"""build_tree and the layer-wise cut search against a pure scipy/sklearn reference (the method's steps 2-3, docs/design.md)."""
import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import adjusted_rand_score, silhouette_score

import fedtreelora as ftl
from peft_fixtures import planted_states


def reference_tree(states, method="average", window=3, tau=0.1):
    """The whole procedure written from the paper with numpy, scipy and sklearn, in float64."""
    layers = sorted({k.split(".attention")[0] for k in states[0] if ".lora_" in k},
                    key=lambda name: int(name.rsplit(".", 1)[1]))
    n = len(states)
    per_layer = []
    for layer in layers:
        rows = np.stack([np.concatenate([s[k].double().numpy().ravel() for k in s
                                         if k.startswith(layer + ".") and ".lora_B." in k]) for s in states])
        per_layer.append(np.sqrt(((rows[:, None] - rows[None]) ** 2).sum(-1)))
    mean = np.mean(per_layer, axis=0)
    z = linkage(squareform(mean, checks=False), method=method)
    counts, prev, scores = [], 1, []
    for d in per_layer:
        best, best_score, layer_scores = None, -np.inf, {}
        for c in range(prev, min(n - 1, prev + window - 1) + 1):
            score = tau if c == 1 else silhouette_score(d, cut_tree(z, n_clusters=c).ravel(), metric="precomputed")
            layer_scores[c] = score
            if score > best_score:  # strict: ties keep the smaller c
                best, best_score = c, score
        best = best or 1
        counts.append(best)
        scores.append(layer_scores)
        prev = best
    labels = cut_tree(z, n_clusters=counts).T if n > 1 else np.zeros((len(layers), 1), dtype=np.int64)
    return z, np.array(counts), labels, scores


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 12), n_layers=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       method=st.sampled_from(["average", "complete", "single", "weighted", "ward"]),
       window=st.integers(1, 4), tau=st.floats(-0.2, 0.6), groups=st.integers(1, 4))
def test_build_tree_agrees_with_scipy_sklearn_reference(n, n_layers, seed, method, window, tau, groups):
    g = torch.Generator().manual_seed(seed)
    states = []
    centres = torch.randn(groups, n_layers, 6, 2, generator=g) * 3
    for k in range(n):
        s = {}
        for l in range(n_layers):
            base = centres[k % groups, l] * (l / max(n_layers - 1, 1))  # structure grows with depth
            s[f"m.layer.{l}.attention.q.lora_A.weight"] = torch.randn(2, 6, generator=g)
            s[f"m.layer.{l}.attention.q.lora_B.weight"] = base + torch.randn(6, 2, generator=g)
        states.append(s)
    cfg = ftl.TreeConfig(linkage=method, window=window, tau=tau)
    tree = ftl.build_tree(states, config=cfg)
    z, counts, labels, scores = reference_tree(states, method, window, tau)
    np.testing.assert_allclose(tree.linkage.numpy()[:, 2], z[:, 2], rtol=1e-5, atol=1e-6)
    # float32 distances may reorder a near-tie merge (the linkage op's own tests cover that case)
    assume(np.array_equal(tree.linkage.numpy()[:, [0, 1, 3]], z[:, [0, 1, 3]]))
    for l in range(n_layers):  # scores agree; a different choice only on a float32 near tie
        for c, s in scores[l].items():
            assert tree.scores[l][c] == pytest.approx(s, abs=1e-5)
        if tree.n_clusters[l] != counts[l]:
            assert abs(scores[l][int(tree.n_clusters[l])] - scores[l][int(counts[l])]) < 1e-5
            return
    assert tree.n_clusters.tolist() == counts.tolist()
    assert np.array_equal(tree.labels.numpy(), labels)
    assert bool((tree.n_clusters[1:] >= tree.n_clusters[:-1]).all())
    assert int(tree.n_clusters.max()) <= n - 1


def test_planted_structure_is_recovered_exactly():
    states, truth = planted_states(n_layers=6, groups=(1, 1, 2, 2, 4, 4), n_clients=8)
    tree = ftl.build_tree(states)
    assert tree.n_clusters.tolist() == [1, 1, 2, 2, 4, 4]
    for l in range(6):
        assert adjusted_rand_score(truth[l].numpy(), tree.labels[l].numpy()) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_structure_means_everyone_shares(seed):
    # i.i.d. noise at a realistic size (d=64, r=4): distances concentrate, every split scores below tau
    states, _ = planted_states(groups=(1,) * 6, n_clients=10, seed=seed, d=64, r=4)
    tree = ftl.build_tree(states)
    assert tree.n_clusters.tolist() == [1] * 6
    assert bool((tree.labels == 0).all())


def test_window_bounds_growth_and_tau_biases_towards_sharing():
    states, _ = planted_states(groups=(1, 4, 4, 4, 4, 4), n_clients=8)
    assert ftl.build_tree(states, ftl.TreeConfig(window=2)).n_clusters.tolist() == [1, 2, 3, 4, 4, 4]
    assert ftl.build_tree(states, ftl.TreeConfig(window=1)).n_clusters.tolist() == [1] * 6
    assert ftl.build_tree(states, ftl.TreeConfig(tau=1.0)).n_clusters.tolist() == [1] * 6  # silhouette < 1 here


def test_ties_go_to_the_smaller_count():
    # identical clients in two exact groups: silhouette of c=2 is exactly 1.0 = tau -> keep c=1
    states, _ = planted_states(groups=(2,) * 3, n_layers=3, n_clients=4, noise=0.0)
    assert ftl.build_tree(states, ftl.TreeConfig(tau=1.0)).n_clusters.tolist() == [1, 1, 1]
    assert ftl.build_tree(states, ftl.TreeConfig(tau=0.99)).n_clusters.tolist() == [2, 2, 2]


def test_small_federations():
    one, _ = planted_states(n_clients=1)
    tree = ftl.build_tree(one)
    assert tree.n_clusters.tolist() == [1] * 6 and tree.linkage.shape == (0, 4) and tree.labels.shape == (6, 1)
    two, _ = planted_states(n_clients=2, groups=(2,) * 6)
    tree = ftl.build_tree(two)  # a split would leave singletons only: undefined silhouette, so c <= N - 1 = 1
    assert tree.n_clusters.tolist() == [1] * 6 and tree.linkage.shape == (1, 4)
    three, _ = planted_states(n_clients=3, groups=(1, 1, 1, 2, 2, 2), noise=0.01)
    assert ftl.build_tree(three).n_clusters.max() <= 2


def test_duplicate_clients():
    states, _ = planted_states(n_clients=4, groups=(1, 1, 2, 2, 2, 2))
    states = states + [dict(s) for s in states]  # every client twice: zero distances
    tree = ftl.build_tree(states)  # each pair is a perfect cluster, so the shallow layers split too
    assert tree.n_clusters.tolist() == reference_tree(states)[1].tolist()
    assert torch.equal(tree.labels[:, :4], tree.labels[:, 4:])  # a client and its copy never part


def test_serialisation_summary_and_plot(tmp_path):
    states, _ = planted_states()
    named = {f"client-{k}": s for k, s in enumerate(states)}
    tree = ftl.build_tree(named, ftl.TreeConfig(linkage="complete", tau=0.2))
    back = ftl.AggregationTree.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert torch.equal(back.linkage, tree.linkage) and torch.equal(back.labels, tree.labels)
    assert back.n_clusters.tolist() == tree.n_clusters.tolist() and back.scores == tree.scores
    assert back.config == tree.config and back.client_names == tree.client_names == list(named)
    text = str(tree)
    assert "4 clusters" in text and "{client-0, client-1}" in text and "1 cluster " in text
    out = tmp_path / "tree.png"
    tree.plot(out)
    assert out.stat().st_size > 10_000
    ftl.build_tree(states[:1]).plot(tmp_path / "one.png")


def test_from_dict_refuses_inconsistent_trees():
    states, _ = planted_states()
    data = ftl.build_tree(states).to_dict()
    data["n_clusters"] = data["n_clusters"][::-1]
    with pytest.raises(ValueError, match="labels must use exactly|never decrease"):
        ftl.AggregationTree.from_dict(data)
    with pytest.raises(ValueError, match="format"):
        ftl.AggregationTree.from_dict({"layers": []})


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="linkage"):
        ftl.TreeConfig(linkage="centroid")
    with pytest.raises(ValueError, match="window"):
        ftl.TreeConfig(window=0)
    with pytest.raises(ValueError, match="head"):
        ftl.TreeConfig(head="shared")
    states, _ = planted_states(n_clients=3)
    states[1]["base_model.model.bert.encoder.layer.4.attention.self.value.lora_B.weight"][2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"client 1, key '.*layer.4.attention.self.value.lora_B.weight': NaN or Inf at index \(2, 1\)"):
        ftl.build_tree(states)


def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib
    from fedtreelora.report import plot_accuracy
    before = matplotlib.get_backend()
    states, _ = planted_states(n_layers=3, groups=(1, 2, 2), n_clients=4)
    ftl.build_tree(states).plot(tmp_path / "tree.png")
    plot_accuracy({"methods": {"m": {"history": [{"round": 1, "mean_accuracy": 0.5}]}},
                   "config": {"warmup_rounds": 1}}, tmp_path / "acc.png")
    assert matplotlib.get_backend() == before
    assert (tmp_path / "tree.png").stat().st_size > 1000 and (tmp_path / "acc.png").stat().st_size > 1000


# -- streaming: one layer at a time, the same tree to the bit ----------------------------------
@pytest.mark.parametrize("metric", ["frobenius", "cosine"])
@pytest.mark.parametrize("method", ["average", "complete", "ward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_equals_in_memory_exactly(metric, method, dtype):
    states, _ = planted_states(n_layers=5, groups=(1, 2, 2, 4, 8), n_clients=40, d=16, r=4, noise=0.3, dtype=dtype)
    cfg = ftl.TreeConfig(metric=metric, linkage=method, tau=0.0)
    a = ftl.build_tree(states, cfg, streaming=True)
    b = ftl.build_tree(states, cfg, streaming=False)
    assert torch.equal(a.linkage, b.linkage) and torch.equal(a.labels, b.labels)
    assert a.n_clusters.tolist() == b.n_clusters.tolist() and a.scores == b.scores
    # and both equal the scipy/sklearn float64 reference on the planted structure
    if dtype == torch.float32 and metric == "frobenius":
        z, counts, labels, _ = reference_tree(states, method, 3, 0.0)
        np.testing.assert_allclose(a.linkage.numpy()[:, 2], z[:, 2], rtol=1e-5)
        assert a.n_clusters.tolist() == counts.tolist() and np.array_equal(a.labels.numpy(), labels)


def test_streaming_reads_one_layer_per_op_call_and_the_auto_rule(monkeypatch):
    from fedtreelora.core import tree as tree_mod

    states, _ = planted_states(n_layers=4, groups=(1, 2, 2, 4), n_clients=12)
    widths = []
    real = ftl.ops.layer_distances

    def spy(x, offsets, metric="frobenius"):
        widths.append((tuple(x.shape), offsets.tolist()))
        return real(x, offsets, metric)

    monkeypatch.setattr(tree_mod.ops, "layer_distances", spy)
    ftl.build_tree(states, streaming=True)
    w = 2 * 8 * 2  # q and v B factors of a layer: d=8, r=2
    assert widths == [((12, w), [0, w])] * 4  # one GEMM pass of 4 layers (pass 2 reads the spill)
    widths.clear()
    monkeypatch.setenv("FEDTREELORA_SCRATCH_DIR", "none")
    ftl.build_tree(states, streaming=True)
    assert widths == [((12, w), [0, w])] * 8  # no spill: two passes of 4 layers, never the [L, N, N] stack
    widths.clear()
    ftl.build_tree(states)  # tiny: the in-memory path, one call over all layers
    assert widths == [((12, 4 * w), [0, w, 2 * w, 3 * w, 4 * w])]
    est = tree_mod.memory_estimates(10_000, ftl.core.adapters.parse_layout(states).b_layout())
    assert est["streaming"] < est["in_memory"]
    monkeypatch.setattr(tree_mod, "IN_MEMORY_LIMIT_BYTES", 0)
    widths.clear()
    ftl.build_tree(states)
    assert len(widths) == 8
    with pytest.raises(TypeError, match="streaming must be"):
        ftl.build_tree(states, streaming="yes")


@pytest.mark.parametrize("scratch", ["folder", "none", "missing"])
def test_streaming_spill_gives_the_same_tree_and_leaves_no_file(scratch, tmp_path, monkeypatch):
    states, _ = planted_states(n_layers=5, groups=(1, 2, 2, 4, 8), n_clients=40, d=16, r=4, noise=0.3)
    cfg = ftl.TreeConfig(tau=0.0)
    folder = {"folder": tmp_path, "none": "none", "missing": tmp_path / "absent"}[scratch]
    monkeypatch.setenv("FEDTREELORA_SCRATCH_DIR", str(folder))
    a = ftl.build_tree(states, cfg, streaming=True)
    b = ftl.build_tree(states, cfg, streaming=False)
    assert torch.equal(a.linkage, b.linkage) and torch.equal(a.labels, b.labels) and a.scores == b.scores
    assert list(tmp_path.iterdir()) == []  # the scratch file was unlinked at creation


def test_streaming_names_nonfinite_client_and_key():
    states, _ = planted_states(n_clients=5)
    key = "base_model.model.bert.encoder.layer.3.attention.self.value.lora_B.weight"
    states[2][key][1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"client 2, key '{key}': NaN or Inf at index \(1, 0\)"):
        ftl.build_tree(states, streaming=True)
    with pytest.raises(ValueError, match=rf"client 0, key '{key}': NaN or Inf at index \(1, 0\)"):
        ftl.build_tree(states[2:3], streaming=True)  # one client: nothing to cluster, still checked
