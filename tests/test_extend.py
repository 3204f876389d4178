"""extend_tree: late clients placed into a stored tree, against the planted truth and a float64 reference."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import fedtreelora as ftl
from fedtreelora.core.synthetic import planted_states

GROUPS = (1, 1, 2, 2, 4, 4)


def held_out(n_clients=24, late=(3, 10, 17, 22), **kwargs):
    states, truth = planted_states(n_layers=6, groups=GROUPS, n_clients=n_clients, **kwargs)
    old = [k for k in range(n_clients) if k not in late]
    return [states[k] for k in old], [states[k] for k in late], truth[:, old], truth[:, list(late)]


def reference_placement(tree, old_states, new_states, metric="frobenius"):
    """The rule written out by hand: numpy float64 distances, shallow to deep, nested candidates."""
    layers = tree.layers
    n_linked = tree.n_linked

    def rows(states, layer):
        return np.stack([np.concatenate([s[k].double().numpy().ravel() for k in s
                                         if k.startswith(layer + ".") and ".lora_B." in k]) for s in states])

    labels = tree.labels.numpy()
    out = np.zeros((len(layers), len(new_states)), dtype=np.int64)
    margins = []
    for j in range(len(new_states)):
        parent = 0
        for l, layer in enumerate(layers):
            members = [i for i in range(n_linked) if l == 0 or labels[l - 1, i] == parent]
            subs = sorted({labels[l, i] for i in members})
            a = rows(new_states[j:j + 1], layer)[0]
            b = rows([old_states[i] for i in members], layer)
            if metric == "frobenius":
                d = np.sqrt(((b - a) ** 2).sum(1))
            else:
                na, nb = np.linalg.norm(a), np.linalg.norm(b, axis=1)
                cos = np.where((na > 0) & (nb > 0), b @ a / np.maximum(na * nb, 1e-300), 0.0)
                d = 1.0 - cos
            means = [d[[labels[l, i] == c for i in members]].mean() for c in subs]
            best = int(np.argmin(means))
            if len(means) > 1:
                margins.append(sorted(means)[1] - sorted(means)[0])
            out[l, j] = parent = subs[best]
    return out, margins


def test_placed_clients_land_in_their_planted_group_at_every_layer():
    old, new, truth_old, truth_new = held_out()
    tree = ftl.build_tree(old)
    assert tree.n_clusters.tolist() == list(GROUPS)
    ext = ftl.extend_tree(tree, old, new)
    n, m = len(old), len(new)
    assert ext.n_clients == n + m and ext.n_linked == n and ext.placed == list(range(n, n + m))
    assert torch.equal(ext.labels[:, :n], tree.labels) and torch.equal(ext.linkage, tree.linkage)
    for l in range(6):
        for j in range(m):
            mates = (truth_old[l] == truth_new[l, j]).nonzero().flatten()
            assert set(tree.labels[l, mates].tolist()) == {int(ext.labels[l, n + j])}, (l, j)
    for l in range(1, 6):  # nesting: a cluster of layer l lies inside one cluster of layer l - 1
        parent_of = {}
        for k in range(n + m):
            assert parent_of.setdefault(int(ext.labels[l, k]), int(ext.labels[l - 1, k])) == int(ext.labels[l - 1, k])


@pytest.mark.parametrize("metric", ["frobenius", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rule_equals_float64_reference(metric, seed):
    # weak structure and large noise: placements are genuinely contested, not decided by the plant
    states, _ = planted_states(n_layers=4, groups=(1, 2, 2, 4), n_clients=20, d=6, r=2, separation=1.0, noise=0.6,
                               seed=seed, head=False)
    old, new = states[:14], states[14:]
    built = ftl.build_tree(old, ftl.TreeConfig(metric=metric))
    counts = torch.tensor([2, 3, 5, 7])  # a choice at every layer: cut the same Z deeper than the search would
    tree = dataclasses.replace(built, n_clusters=counts, labels=ftl.ops.cut_tree(built.linkage, counts))
    tree.validate()
    ext = ftl.extend_tree(tree, old, new)
    ref, margins = reference_placement(tree, old, new, metric)
    assert min(margins) > 1e-6  # no near tie that float32 could flip
    np.testing.assert_array_equal(ext.labels[:, 14:].numpy(), ref)


def test_order_independent_and_extending_twice_equals_once():
    old, new, _, _ = held_out()
    tree = ftl.build_tree(old)
    once = ftl.extend_tree(tree, old, new)
    rev = ftl.extend_tree(tree, old, new[::-1])
    assert torch.equal(once.labels[:, len(old):], rev.labels[:, len(old):].flip(1))
    step = ftl.extend_tree(tree, old, new[:2])
    twice = ftl.extend_tree(step, old + new[:2], new[2:])
    assert torch.equal(twice.labels, once.labels) and twice.placed == once.placed and twice.n_linked == len(old)


def test_serialisation_print_plot_and_aggregate(tmp_path):
    old, new, _, truth_new = held_out()
    named_old = {f"c{k}": s for k, s in enumerate(old)}
    tree = ftl.build_tree(named_old)
    assert tree.to_dict()["format"] == "fedtreelora.AggregationTree/1" and "placed" not in tree.to_dict()
    ext = ftl.extend_tree(tree, named_old, new, names=["late-a", "late-b", "late-c", "late-d"])
    assert ext.client_names == list(named_old) + ["late-a", "late-b", "late-c", "late-d"]
    data = json.loads(ext.to_json())
    assert data["format"] == "fedtreelora.AggregationTree/2" and data["placed"] == ext.placed
    back = ftl.AggregationTree.from_dict(data)
    assert back.placed == ext.placed and torch.equal(back.labels, ext.labels) and torch.equal(back.linkage, ext.linkage)
    text = str(ext)
    assert "4 placed by extend_tree" in text and "late-a*" in text and "c0*" not in text
    ext.plot(tmp_path / "ext.png")
    assert (tmp_path / "ext.png").stat().st_size > 10_000
    # aggregate takes the N + M clients in the tree's order; a placed client gets its cluster's mean
    all_states = {**named_old, **dict(zip(["late-a", "late-b", "late-c", "late-d"], new))}
    res = ftl.aggregate(all_states, tree=ext)
    key = "base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.weight"
    names = list(all_states)
    mates = [names[k] for k in range(len(names)) if ext.labels[5, k] == ext.labels[5, names.index("late-c")]]
    expected = torch.stack([all_states[c][key].double() for c in mates]).mean(0)
    assert torch.allclose(res.cluster_states["late-c"][key].double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="tree was built for 24 clients, got 20"):
        ftl.aggregate(named_old, tree=ext)


def test_inconsistent_placed_field_is_refused():
    old, new, _, _ = held_out()
    data = ftl.extend_tree(ftl.build_tree(old), old, new).to_dict()
    data["placed"] = data["placed"][1:]  # then Z would have to cover 21 clients
    with pytest.raises(ValueError, match="linkage must be"):
        ftl.AggregationTree.from_dict(data)
    data["placed"] = [0, 1, 2, 3]
    with pytest.raises(ValueError, match="placed must list the last clients"):
        ftl.AggregationTree.from_dict(data)


def test_inputs_are_not_modified():
    old, new, _, _ = held_out()
    before = [{k: v.clone() for k, v in s.items()} for s in old + new]
    ftl.extend_tree(ftl.build_tree(old), old, new)
    for s, b in zip(old + new, before):
        assert all(torch.equal(s[k], b[k]) for k in b)


def test_bad_inputs_are_named():
    old, new, _, _ = held_out()
    tree = ftl.build_tree(old)
    with pytest.raises(TypeError, match="tree must be"):
        ftl.extend_tree("tree", old, new)
    with pytest.raises(ValueError, match="client_states has 19 clients, the tree has 20"):
        ftl.extend_tree(tree, old[:-1], new)
    with pytest.raises(ValueError, match="new_states: client_states is empty"):
        ftl.extend_tree(tree, old, [])
    short = [{k: v for k, v in s.items() if ".layer.5." not in k} for s in old + new]
    with pytest.raises(ValueError, match=r"layers .* differ from the tree's"):
        ftl.extend_tree(tree, short[:20], short[20:])
    bad = [dict(s) for s in new]
    key = "base_model.model.bert.encoder.layer.2.attention.self.query.lora_B.weight"
    bad[1][key] = bad[1][key].clone()
    bad[1][key][0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"new_states: client 21, key '{key}': NaN or Inf at index \(0, 0\)"):
        ftl.extend_tree(tree, old, bad)
    wrong = [dict(s) for s in new]
    wrong[2][key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=rf"client 22, key '{key}': LoRA rank 3 differs"):
        ftl.extend_tree(tree, old, wrong)
    named = ftl.build_tree({f"c{k}": s for k, s in enumerate(old)})
    with pytest.raises(ValueError, match=r"new client name\(s\) \['c3'\] already name clients"):
        ftl.extend_tree(named, {f"c{k}": s for k, s in enumerate(old)}, {"c3": new[0]})
    with pytest.raises(ValueError, match="names repeats"):
        ftl.extend_tree(tree, old, new, names=["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="names has 2 entries for 4 new clients"):
        ftl.extend_tree(tree, old, new, names=["a", "b"])
    with pytest.raises(ValueError, match="names: pass names only with new_states as a list"):
        ftl.extend_tree(tree, old, {"a": new[0]}, names=["a"])
    with pytest.raises(ValueError, match="differ from the tree's clients"):
        ftl.extend_tree(named, {f"d{k}": s for k, s in enumerate(old)}, new)


def test_nonfinite_old_member_is_named_by_its_tree_index():
    old, new, _, _ = held_out()
    key = "base_model.model.bert.encoder.layer.2.attention.self.value.lora_B.weight"  # layer 2: first choice
    old = [dict(s) for s in old]
    old[13][key] = old[13][key].clone()
    old[13][key][4, 1] = float("nan")
    tree = ftl.build_tree([s if k != 13 else {**s, key: new[0][key]} for k, s in enumerate(old)])
    with pytest.raises(ValueError, match=rf"client_states: client 13, key '{key}': NaN or Inf at index \(4, 1\)"):
        ftl.extend_tree(tree, old, new)
