"""fedtreelora.ops.silhouette against sklearn.metrics.silhouette_score(metric="precomputed").

sklearn sees exactly the values the kernel sees (d converted to float64), so the only difference
allowed is the float32 output and summation order: 1e-5 absolute. Where sklearn refuses a partition
(fewer than 2 or more than N-1 distinct labels) the op returns NaN.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import silhouette_score

import fedtreelora.ops as ops

TOL = 1e-5
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sklearn_scores(d: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[L, M] float64 from sklearn, NaN where it raises for the number of labels."""
    dd = d.to(torch.float64).numpy()
    ll = labels.numpy()
    out = np.full(ll.shape[:2], np.nan)
    for l in range(ll.shape[0]):
        for m in range(ll.shape[1]):
            k = len(np.unique(ll[l, m]))
            if 2 <= k <= ll.shape[2] - 1:
                out[l, m] = silhouette_score(dd[l], ll[l, m], metric="precomputed")
            else:
                with pytest.raises(ValueError):
                    silhouette_score(dd[l], ll[l, m], metric="precomputed")
    return out


def assert_matches_sklearn(d: torch.Tensor, labels: torch.Tensor) -> None:
    d_before, labels_before = d.clone(), labels.clone()
    got = ops.silhouette(d, labels)
    assert torch.equal(d, d_before) and torch.equal(labels, labels_before), "inputs were modified"
    assert got.dtype == torch.float32 and got.shape == labels.shape[:2]
    want = sklearn_scores(d, labels)
    np.testing.assert_array_equal(np.isnan(got.numpy()), np.isnan(want), err_msg="NaN pattern differs from sklearn")
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=TOL)


def random_distances(rng: np.random.Generator, n_layers: int, n: int, kind: str) -> np.ndarray:
    """Symmetric zero-diagonal distances: euclidean points, duplicated clients, small-integer ties."""
    out = np.zeros((n_layers, n, n))
    for l in range(n_layers):
        if kind == "ties":  # few distinct values: equal a and b, equal cluster means
            a = rng.integers(0, 3, size=(n, n)).astype(np.float64)
            d = np.triu(a, 1) + np.triu(a, 1).T
        else:
            pts = rng.normal(size=(n, rng.integers(1, 6)))
            if kind == "duplicates" and n > 1:  # clients copied onto others: zero off-diagonal distances
                src = rng.integers(0, n, size=n)
                copy = rng.random(n) < 0.5
                pts[copy] = pts[src[copy]]
            d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
            d = 0.5 * (d + d.T)
        np.fill_diagonal(d, 0.0)
        out[l] = d
    return out


def random_labels(rng: np.random.Generator, n_layers: int, n_parts: int, n: int) -> np.ndarray:
    """Random partitions with k distinct labels drawn (non-contiguously) from [0, N)."""
    out = np.zeros((n_layers, n_parts, n), dtype=np.int64)
    for l in range(n_layers):
        for m in range(n_parts):
            k = int(rng.integers(1, n + 1))
            values = rng.choice(n, size=k, replace=False)
            out[l, m] = values[rng.integers(0, k, size=n)]
    return out


@SETTINGS
@given(n=st.integers(1, 40), n_layers=st.integers(1, 3), n_parts=st.integers(1, 4),
       kind=st.sampled_from(["points", "duplicates", "ties"]), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 2**32 - 1))
def test_random_partitions_match_sklearn(n, n_layers, n_parts, kind, dtype, seed):
    rng = np.random.default_rng(seed)
    d = torch.from_numpy(random_distances(rng, n_layers, n, kind)).to(dtype)
    labels = torch.from_numpy(random_labels(rng, n_layers, n_parts, n))
    assert_matches_sklearn(d, labels)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(60, 200), seed=st.integers(0, 2**32 - 1))
def test_nested_tree_cuts_match_sklearn(n, seed):
    """The partitions the cut search scores: every cut of an average-linkage tree, per layer."""
    rng = np.random.default_rng(seed)
    d = random_distances(rng, 2, n, "duplicates")
    counts = sorted(set(rng.integers(1, n + 1, size=5).tolist()) | {1, 2, n - 1, n})
    labels = np.stack([cut_tree(linkage(squareform(d[l], checks=False), "average"), n_clusters=counts).T
                       for l in range(2)])
    assert_matches_sklearn(torch.from_numpy(d), torch.from_numpy(labels.astype(np.int64)))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_edge_sizes(n):
    """Every partition of 1, 2 and 3 clients: only 2 clusters of 3 clients is scored."""
    rng = np.random.default_rng(n)
    d = torch.from_numpy(random_distances(rng, 1, n, "points"))
    parts = {tuple(int(v) for v in p) for p in np.ndindex(*([n] * n))}
    labels = torch.tensor(sorted(parts), dtype=torch.int64)[None]
    assert_matches_sklearn(d, labels)
    got = ops.silhouette(d, labels)[0]
    k = torch.tensor([len(set(p)) for p in labels[0].tolist()])
    assert torch.equal(torch.isnan(got), (k < 2) | (k > n - 1))


def test_singletons_score_zero():
    """A partition of singletons plus one pair: singletons add 0, the pair's two members their s."""
    d = torch.tensor([[0, 1, 4, 5], [1, 0, 4, 5], [4, 4, 0, 2], [5, 5, 2, 0]], dtype=torch.float64)
    labels = torch.tensor([[3, 3, 1, 0]])  # non-contiguous labels (no 2); clients 2 and 3 are singletons
    s_pair = (4.0 - 1.0) / 4.0  # a = 1, b = min(mean to {2} = 4, mean to {3} = 5) = 4
    assert ops.silhouette(d, labels).item() == pytest.approx(2 * s_pair / 4, abs=1e-7)
    assert_matches_sklearn(d[None], labels[None])


def test_all_zero_distances_score_zero():
    """Duplicates everywhere: a = b = 0 gives s = 0 (sklearn's nan_to_num), not NaN."""
    d = torch.zeros(1, 5, 5)
    labels = torch.tensor([[[0, 0, 1, 1, 3]]])
    assert ops.silhouette(d, labels).item() == 0.0
    assert_matches_sklearn(d, labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_distances(dtype):
    rng = np.random.default_rng(0)
    d = torch.from_numpy(random_distances(rng, 2, 30, "points")).to(dtype)
    labels = torch.from_numpy(random_labels(rng, 2, 3, 30))
    assert_matches_sklearn(d, labels)


def test_non_contiguous_inputs_and_2d_form():
    rng = np.random.default_rng(1)
    n = 25
    base = torch.from_numpy(random_distances(rng, 2, n + 4, "points"))
    d = base[:, 2:2 + n, 2:2 + n]  # strided view; still a zero-diagonal distance matrix per layer
    labels_wide = torch.from_numpy(random_labels(rng, 2, 6, n))
    labels = labels_wide[:, ::2]
    assert not d.is_contiguous() and not labels.is_contiguous()
    assert_matches_sklearn(d, labels)
    two_d = ops.silhouette(d[0], labels[0])
    assert two_d.shape == (3,)
    assert torch.equal(two_d, ops.silhouette(d.contiguous(), labels.contiguous())[0])


def test_nested_crossing_and_singleton_partitions_in_one_batch():
    """The kernel sums per class of the partitions' common refinement: nested cuts of one tree
    (few classes), partitions that cross each other, and an all-singletons-but-one partition
    (as many classes as clients) in one batch all equal sklearn."""
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform
    rng = np.random.default_rng(7)
    n = 40
    d = random_distances(rng, 2, n, "points")
    z = linkage(squareform(d[0], checks=False), "average")
    nested = cut_tree(z, n_clusters=[2, 3, 5, 9]).T
    crossing = np.stack([np.arange(n) % 3, np.arange(n) // 14, rng.integers(0, 6, n)])
    fine = np.arange(n)[None].copy()
    fine[0, 1] = 0
    labels = np.concatenate([nested, crossing, fine])[None].repeat(2, 0)
    assert_matches_sklearn(torch.from_numpy(d), torch.from_numpy(np.ascontiguousarray(labels)))


@contextlib.contextmanager
def torch_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_same_on_one_thread(d, labels):
    """The scores on one thread equal those on all of torch's threads, bit for bit."""
    with torch_threads(1):
        one = ops.silhouette(d, labels)
    torch.testing.assert_close(one, ops.silhouette(d, labels), rtol=0, atol=0, equal_nan=True)


def test_result_does_not_depend_on_thread_count():
    rng = np.random.default_rng(2)
    d = torch.from_numpy(random_distances(rng, 3, 90, "points"))
    labels = torch.from_numpy(random_labels(rng, 3, 4, 90))
    assert_same_on_one_thread(d, labels)


def test_empty_batches():
    assert ops.silhouette(torch.zeros(0, 4, 4), torch.zeros(0, 2, 4, dtype=torch.int64)).shape == (0, 2)
    assert ops.silhouette(torch.zeros(2, 4, 4), torch.zeros(2, 0, 4, dtype=torch.int64)).shape == (2, 0)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, from the wrapper and from the kernel itself.

def valid_d(n_layers: int = 2, n: int = 4, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(random_distances(np.random.default_rng(seed), n_layers, n, "points")).to(dtype)


def test_wrapper_rejects_bad_input():
    d = valid_d()
    labels = torch.zeros(2, 3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.silhouette(d, torch.full((2, 3, 4), 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.silhouette(d, torch.full((2, 3, 4), -1, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels must be int64"):
        ops.silhouette(d, labels.to(torch.int32))
    with pytest.raises(TypeError, match="d must be a floating-point or integer"):
        ops.silhouette(d > 0, labels)
    with pytest.raises(ValueError, match=r"d must be \[L, N, N\]"):
        ops.silhouette(torch.rand(2, 4, 5), labels)
    with pytest.raises(ValueError, match="labels must be"):
        ops.silhouette(d, torch.zeros(3, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must have one entry per client"):
        ops.silhouette(d, torch.zeros(2, 3, 5, dtype=torch.int64))
    bad = d.clone()
    bad[1, 2, 3] = bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"d has a NaN or Inf entry at layer 1, \[2, 3\]"):
        ops.silhouette(bad, labels)
    bad[0, 3, 0] = bad[0, 0, 3] = float("-inf")      # the first bad entry is reported, whatever the partitions are
    for lab in (labels, torch.zeros(2, 0, 4, dtype=torch.int64), torch.tensor([0, 1, 0, 1]).repeat(2, 1, 1)):
        with pytest.raises(ValueError, match=r"d has a NaN or Inf entry at layer 0, \[0, 3\]"):
            ops.silhouette(bad, lab)
        with pytest.raises(ValueError, match=r"d has a NaN or Inf entry at layer 0, \[0, 3\]"):
            ops.silhouette(bad.half(), lab)


# Ported from scikit-learn's sklearn/metrics/cluster/tests/test_unsupervised.py: what sklearn refuses
# (non-zero diagonal, negative distances) we refuse too, naming d; integer d is accepted as float64.
def test_non_zero_diagonal_is_refused_like_sklearn():
    # test_silhouette_nonzero_diag: a diagonal of 10 * eps passes, 1000 * eps does not.
    for dtype in (np.float32, np.float64):
        dists = np.array([[0.0, 0.1, 0.2], [0.1, 0.0, 0.3], [0.2, 0.3, 0.0]], dtype=dtype)
        labels = np.array([0, 0, 1])
        eps = np.finfo(dtype).eps
        small = dists + 10 * eps * np.eye(3, dtype=dtype)
        want = silhouette_score(small, labels, metric="precomputed")
        got = ops.silhouette(torch.from_numpy(small), torch.from_numpy(labels)[None])
        assert got.item() == pytest.approx(want, abs=TOL)
        large = dists + 1000 * eps * np.eye(3, dtype=dtype)
        with pytest.raises(ValueError, match="contains non-zero"):
            silhouette_score(large, labels, metric="precomputed")
        with pytest.raises(ValueError, match=r"d must have a zero diagonal.*d\[0, 0\]"):
            ops.silhouette(torch.from_numpy(large), torch.from_numpy(labels)[None])


def test_negative_distances_are_refused_like_sklearn():
    # test_silhouette_reduce / test_non_numpy_labels' neighbour: precomputed d with a negative entry.
    d = valid_d(1, 5).numpy()[0]
    d[1, 3] = d[3, 1] = -0.5
    labels = np.array([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="Negative values"):
        silhouette_score(d, labels, metric="precomputed")
    with pytest.raises(ValueError, match=r"d has a negative distance at layer 0, \[1, 3\]: -0.5"):
        ops.silhouette(torch.from_numpy(d), torch.from_numpy(labels)[None])


def test_asymmetric_distances_are_read_by_rows_like_sklearn():
    # sklearn's silhouette_samples does not check symmetry (check_pairwise_arrays(precomputed=True)
    # checks the sign only) and reads client i's distances from row i: so do we.
    d = valid_d(2, 20, seed=3, dtype=torch.float64)
    labels = torch.from_numpy(random_labels(np.random.default_rng(3), 2, 2, 20))
    for i, j, factor in ((4, 9, 1 + 1e-7), (17, 2, 1.5), (0, 19, 3.0)):
        d[1, i, j] *= factor
    assert not torch.equal(d[1], d[1].T)
    for dt in (torch.float64, torch.float32):
        assert_matches_sklearn(d.to(dt), labels)


def test_integer_distances_are_converted_to_float64():
    # test_correct_labelsize's data as integers: sklearn accepts them, so do we.
    d = np.array([[0, 2, 7, 8], [2, 0, 6, 9], [7, 6, 0, 1], [8, 9, 1, 0]])
    labels = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    for dt in (torch.int64, torch.int32, torch.uint8):
        got = ops.silhouette(torch.from_numpy(d).to(dt), torch.from_numpy(labels))
        want = [silhouette_score(d, lab, metric="precomputed") for lab in labels]
        np.testing.assert_allclose(got.numpy(), want, atol=TOL)
    with pytest.raises(ValueError, match="zero diagonal"):
        ops.silhouette(torch.from_numpy(d + np.eye(4, dtype=d.dtype)), torch.from_numpy(labels))


def test_label_count_outside_2_to_n_minus_1_is_nan_where_sklearn_raises():
    # test_correct_labelsize: one label, or as many labels as samples, is a ValueError in sklearn.
    d = valid_d(1, 5)[0]
    for labels in ([0, 0, 0, 0, 0], [0, 1, 2, 3, 4]):
        with pytest.raises(ValueError, match="Number of labels is"):
            silhouette_score(d.numpy(), labels, metric="precomputed")
        assert torch.isnan(ops.silhouette(d, torch.tensor([labels]))).all()


@pytest.mark.skipif(not ops.native_available(), reason="the native core is not loaded")
def test_kernel_rejects_bad_input():
    """Called through torch.ops directly (no wrapper), the kernel refuses instead of reading out of bounds."""
    kernel = torch.ops.fedtreelora.silhouette
    d = valid_d()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, N\) with N=4, found 9 at \[1, 0, 2\]"):
        kernel(d, torch.tensor([[[0, 1, 0, 1]], [[0, 1, 9, 1]]]))
    # The first bad label in [layer, partition, client] order is named, on any number of threads.
    many = torch.zeros(5, 3, 4, dtype=torch.int64)
    many[4, 0, 0], many[2, 1, 3], many[2, 2, 0], many[3, 0, 1] = -1, 7, 9, 4
    for threads in (1, 2):
        with torch_threads(threads), pytest.raises(ValueError, match=r"found 7 at \[2, 1, 3\]"):
            kernel(valid_d(5), many)
        with torch_threads(threads), pytest.raises(ValueError, match=r"found 7 at \[2, 1, 3\]"):
            ops.silhouette(valid_d(5), many)
    with pytest.raises(ValueError, match="labels must be"):
        kernel(d, torch.zeros(2, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="d must be"):
        kernel(torch.rand(4, 4), torch.zeros(1, 1, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels must be int64"):
        kernel(d, torch.zeros(2, 1, 4, dtype=torch.int32))
    bad = d.clone()
    bad[1, 0, 3] = float("inf")
    with pytest.raises(ValueError, match=r"d has a NaN or Inf entry at layer 1, \[0, 3\]"):
        kernel(bad, torch.tensor([0, 1, 0, 1]).repeat(2, 1, 1))
    for what, edit in (("negative distance", lambda t: t.__setitem__((0, 1, 2), -1.0)),
                       ("zero diagonal", lambda t: t.__setitem__((0, 2, 2), 0.5))):
        bad = d.clone()
        edit(bad)
        with pytest.raises(ValueError, match=what):
            kernel(bad, torch.tensor([0, 1, 0, 1]).repeat(2, 1, 1))


@pytest.mark.parametrize("n", [31, 32, 33, 65, 100])
def test_row_block_edges_and_every_entry_checked(n):
    """The kernel reads d in blocks of 32 rows: sizes around the block, an asymmetry anywhere scored
    as sklearn scores it, and a negative entry or a NaN planted anywhere found and named."""
    rng = np.random.default_rng(n)
    d = torch.from_numpy(random_distances(rng, 2, n, "points")).float()
    labels = torch.from_numpy(random_labels(rng, 2, 3, n))
    assert_matches_sklearn(d, labels)
    for i, j in {(0, n - 1), (n - 1, 0), (n // 2, n // 3), (n - 1, n - 2), (n - 2, n - 1), (31, 32), (32, 31)}:
        if i == j or max(i, j) >= n:
            continue
        bad = d.clone()
        bad[1, i, j] += 1.0
        assert_matches_sklearn(bad, labels)
        bad = d.clone()
        bad[0, i, j] = -1e-30
        with pytest.raises(ValueError, match=rf"negative distance at layer 0, \[{i}, {j}\]"):
            ops.silhouette(bad, labels)
        bad = d.clone()
        bad[1, i, j] = float("nan")
        with pytest.raises(ValueError, match=rf"NaN or Inf entry at layer 1, \[{i}, {j}\]"):
            ops.silhouette(bad, labels)
        bad = d.clone()
        bad[0, i, j] = bad[0, j, i] = -1e-30
        with pytest.raises(ValueError, match=rf"negative distance at layer 0, \[{min(i, j)}, {max(i, j)}\]"):
            ops.silhouette(bad, labels)


@pytest.mark.parametrize("n", [2, 3, 15, 16, 17, 31, 32, 33, 48, 127, 128, 129, 300, 511, 512, 513, 528, 1000])
def test_few_classes_float32_every_entry_checked(n):
    """float32 d with at most 6 refined classes (nested cuts: the kernel's masked path on AVX-512,
    16 entries per vector, two vectors per step, float lanes flushed to double every 512 entries, a
    full and a partial vector at the row's end): equal to sklearn, NaN, Inf and negative entries
    found anywhere, -0.0 accepted as sklearn accepts it."""
    rng = np.random.default_rng(n)
    d = torch.from_numpy(random_distances(rng, 2, n, "points")).float()
    fine = rng.integers(0, min(n - 1, 6) if n > 2 else 1, size=n)   # <= 6 classes, nested coarser cuts
    labels = torch.from_numpy(np.stack([fine % 2, fine % 3 // 2, fine]).astype(np.int64))[None].repeat(2, 1, 1)
    assert_matches_sklearn(d, labels)
    spots = {(0, n - 1), (n - 1, 0), (n - 1, n - 2), (n // 2, n // 3)} | ({(n - 1, 16 * ((n - 1) // 16))} if n > 16 else set())
    spots |= {(n - 2, j) for j in (15, 16, 31, 32, 511, 512, 527, 528) if j < n - 2}
    for i, j in spots:
        if i == j:
            continue
        zero = d.clone()
        zero[1, i, j] = -0.0
        zero[0, j, i] = -0.0
        assert_matches_sklearn(zero, labels)
        for value, what in ((float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (-1e-30, "negative distance")):
            bad = d.clone()
            bad[1, i, j] = value
            with pytest.raises(ValueError, match=rf"{what}.* at layer 1, \[{i}, {j}\]"):
                ops.silhouette(bad, labels)
    assert_same_on_one_thread(d, labels)


@pytest.mark.parametrize("n_classes", [1, 2, 3, 4, 5, 6])
def test_few_classes_float32_sums_near_float_max(n_classes):
    """float32 entries near FLT_MAX: the masked path's float lanes overflow, so those rows are summed
    again in float64, as the docstring promises (sklearn on the same values in float64 agrees; the
    row sums only overflow float64 far beyond this)."""
    rng = np.random.default_rng(n_classes)
    n = 70
    d = rng.uniform(1e37, 3e38, size=(2, n, n))
    d = 0.5 * (d + d.transpose(0, 2, 1))
    d[:, np.arange(n), np.arange(n)] = 0.0
    d = torch.from_numpy(d).float()
    fine = np.arange(n) % n_classes
    labels = torch.from_numpy(np.stack([fine % 2, fine]).astype(np.int64))[None].repeat(2, 1, 1)
    assert_matches_sklearn(d, labels)


def test_few_classes_float32_wide_dynamic_range():
    """Entries from 1e-30 to 1e30 in one row (classes summed in float lanes, 16 entries a lane at
    most, then in float64): still within 1e-5 of sklearn in float64."""
    rng = np.random.default_rng(5)
    n = 600
    pts = rng.normal(size=(n, 3))
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) * 10.0 ** rng.integers(-30, 31, size=(n, n))
    np.fill_diagonal(d, 0.0)
    fine = rng.integers(0, 6, size=n)
    labels = np.stack([fine % 2, fine % 3, fine]).astype(np.int64)[None]
    assert_matches_sklearn(torch.from_numpy(d).float()[None], torch.from_numpy(labels))
