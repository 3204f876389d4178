"""fedtreelora.ops.cut_tree against scipy.cluster.hierarchy.cut_tree, label for label.

Claimed and tested: for every n_clusters c in [1, N], row c of our output equals scipy's column
for c, on trees from every linkage method (random points, tied and duplicate points) and on random
valid trees whose heights are not monotone (scipy's merge order by height still decides).
One deliberate difference: scipy, given a list holding N (all singletons) anywhere but first,
leaves that column all zeros (it writes the singleton partition into groups[0]); we return the
singleton partition wherever N appears, which is what scipy returns for n_clusters=[N] or first.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.cluster.hierarchy import cut_tree as scipy_cut_tree
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import pdist

from fedtreelora import ops

METHODS = ("single", "complete", "average", "weighted", "ward")


def scipy_labels(z: np.ndarray, counts) -> np.ndarray:
    """scipy's labels as [M, N]; the distinct counts are passed largest first (see the module doc)."""
    n = z.shape[0] + 1
    if n == 1 or not counts:
        return np.zeros((len(counts), n), dtype=np.int64)
    distinct = sorted(set(counts), reverse=True)
    columns = scipy_cut_tree(z, n_clusters=distinct)
    by_count = {c: columns[:, k] for k, c in enumerate(distinct)}
    return np.stack([by_count[c] for c in counts]).astype(np.int64)


def assert_same_as_scipy(z: np.ndarray, counts) -> None:
    z_t = torch.from_numpy(z)
    before = z_t.clone()
    n_clusters = torch.tensor(counts, dtype=torch.int64)
    labels = ops.cut_tree(z_t, n_clusters)
    assert labels.dtype == torch.int64 and labels.shape == (len(counts), z.shape[0] + 1)
    assert np.array_equal(labels.numpy(), scipy_labels(z, counts))
    assert torch.equal(z_t, before) and torch.equal(n_clusters, torch.tensor(counts, dtype=torch.int64))


def tree(seed: int, n: int, method: str, integer: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(n, 2)).astype(np.float64) if integer else rng.normal(size=(n, 3))
    return scipy_linkage(pdist(x), method)


def random_valid_tree(seed: int, n: int) -> np.ndarray:
    """Any valid Z: random pairs of current clusters, random (not monotone, often tied) heights."""
    rng = np.random.default_rng(seed)
    alive = list(range(n))
    size = {i: 1 for i in range(n)}
    z = np.zeros((n - 1, 4))
    for k in range(n - 1):
        a, b = rng.choice(len(alive), size=2, replace=False)
        x, y = alive[a], alive[b]
        alive = [c for c in alive if c not in (x, y)] + [n + k]
        size[n + k] = size[x] + size[y]
        z[k] = [x, y, float(rng.integers(0, 4)), size[n + k]]
    return z


def test_native_kernel_is_loaded():
    assert ops.native_available(), "run with FEDTREELORA_REQUIRE_NATIVE=1: these tests are for the native kernel"


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60), integer=st.booleans())
def test_every_cut_equals_scipy(method, seed, n, integer):
    z = tree(seed, n, method, integer)
    assert_same_as_scipy(z, list(range(1, n + 1)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 40))
def test_non_monotone_trees_equal_scipy(seed, n):
    assert_same_as_scipy(random_valid_tree(seed, n), list(range(1, n + 1)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 40), data=st.data())
def test_any_order_and_repeats_of_n_clusters(seed, n, data):
    counts = data.draw(st.lists(st.integers(1, n), min_size=0, max_size=8))
    assert_same_as_scipy(tree(seed, n, "average"), counts)


def test_one_point():
    labels = ops.cut_tree(torch.zeros(0, 4, dtype=torch.float64), torch.tensor([1, 1]))
    assert torch.equal(labels, torch.zeros(2, 1, dtype=torch.int64))


@pytest.mark.parametrize("n", [2, 3])
def test_two_and_three_points(n):
    assert_same_as_scipy(tree(n, n, "average"), list(range(1, n + 1)))


def test_singletons_wherever_n_appears():
    z = tree(0, 6, "average")
    labels = ops.cut_tree(torch.from_numpy(z), torch.tensor([2, 6, 6]))
    assert torch.equal(labels[1], torch.arange(6)) and torch.equal(labels[2], torch.arange(6))
    assert np.array_equal(labels[0].numpy(), scipy_cut_tree(z, n_clusters=[2])[:, 0])


def test_each_cut_has_exactly_c_clusters_and_nests():
    z = tree(7, 50, "ward")
    labels = ops.cut_tree(torch.from_numpy(z), torch.arange(1, 51)).numpy()
    for c in range(1, 51):
        assert len(np.unique(labels[c - 1])) == c
        assert set(np.unique(labels[c - 1])) == set(range(c))
    for c in range(1, 50):  # every cluster of the finer partition lies inside one of the coarser
        pairs = set(zip(labels[c].tolist(), labels[c - 1].tolist()))
        assert len({fine for fine, _ in pairs}) == len(pairs)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError (or TypeError for dtypes) naming the problem; nothing crashes.
def _z5():
    return torch.from_numpy(tree(3, 5, "average")).clone()


def _malformed():
    not_formed = _z5()
    not_formed[0, 1] = 7  # cluster 7 is formed by row 2
    fractional = _z5()
    fractional[1, 0] = 0.5
    negative = _z5()
    negative[1, 0] = -1
    nan = _z5()
    nan[2, 2] = float("nan")
    return [
        ("not formed yet", not_formed, "formed"),
        ("fractional id", fractional, "integer"),
        ("negative id", negative, "integer|non-negative"),
        ("nan height", nan, "NaN|finite"),
    ]


def _malformed_for_the_kernel():
    reused = _z5()
    reused[3, 0], reused[3, 1] = reused[0, 0], 7  # a cluster merged twice
    bad_count = _z5()
    bad_count[2, 3] += 1
    negative_height = _z5()
    negative_height[0, 2] = -1.0
    return [
        ("cluster used twice", reused, "more than once"),
        ("wrong count", bad_count, "count"),
        ("negative height", negative_height, "non-negative"),
    ]


@pytest.mark.parametrize("case", _malformed(), ids=lambda c: c[0])
def test_malformed_z_raises(case):
    _, z, message = case
    with pytest.raises(ValueError, match=message):
        ops.cut_tree(z, torch.tensor([2]))
    with pytest.raises(ValueError):
        torch.ops.fedtreelora.cut_tree(z, torch.tensor([2]))


@pytest.mark.parametrize("case", _malformed_for_the_kernel(), ids=lambda c: c[0])
def test_malformed_z_raises_in_kernel(case):
    _, z, message = case
    with pytest.raises(ValueError, match=message):
        ops.cut_tree(z, torch.tensor([2]))
    with pytest.raises(ValueError, match=message):
        torch.ops.fedtreelora.cut_tree(z, torch.tensor([2]))


@pytest.mark.parametrize("bad", [0, 6, -1])
def test_n_clusters_out_of_range(bad):
    z = _z5()
    with pytest.raises(ValueError, match="n_clusters"):
        ops.cut_tree(z, torch.tensor([2, bad]))
    with pytest.raises(ValueError, match="n_clusters"):
        torch.ops.fedtreelora.cut_tree(z, torch.tensor([2, bad]))


def test_bad_shapes_and_dtypes():
    z = _z5()
    with pytest.raises(ValueError, match="z"):
        ops.cut_tree(z[:, :3], torch.tensor([2]))
    with pytest.raises(ValueError, match="z"):
        torch.ops.fedtreelora.cut_tree(z[:, :3].contiguous(), torch.tensor([2]))
    with pytest.raises(TypeError, match="float64"):
        torch.ops.fedtreelora.cut_tree(z.float(), torch.tensor([2]))
    with pytest.raises(TypeError, match="int64"):
        torch.ops.fedtreelora.cut_tree(z, torch.tensor([2], dtype=torch.int32))
    with pytest.raises(ValueError, match="n_clusters"):
        torch.ops.fedtreelora.cut_tree(z, torch.tensor([[2]]))


# Ported from scipy's scipy/cluster/tests/test_hierarchy.py (TestIsValidLinkage): every Z that
# is_valid_linkage refuses, cut_tree refuses too, naming z.
from scipy.cluster.hierarchy import is_valid_linkage  # noqa: E402


def _scipy_z(n: int) -> np.ndarray:
    return scipy_linkage(pdist(np.random.default_rng(n).normal(size=(n, 2))), "single")


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_valid_linkages_from_scipy_are_accepted(n):
    z = _scipy_z(n)
    assert is_valid_linkage(z)
    assert_same_as_scipy(z, list(range(1, n + 1)))


def test_integer_z_is_refused_like_scipy():  # test_is_valid_linkage_int_type
    z = np.asarray([[0, 1, 3.0, 2], [3, 2, 4.0, 3]], dtype=int)
    with pytest.raises(TypeError):
        is_valid_linkage(z, throw=True)
    for dtype in (torch.int64, torch.float32):
        with pytest.raises(TypeError, match="float64"):
            ops.cut_tree(torch.from_numpy(z).to(dtype), [1])


@pytest.mark.parametrize("bad_shape", [(0, 4), (3, 3), (3,), (2, 4, 1)])
def test_bad_shapes_are_refused(bad_shape):  # test_is_valid_linkage_empty and wrong shapes
    z = np.zeros(bad_shape)
    if bad_shape == (0, 4):   # scipy refuses an empty Z; ours is the tree of one point
        with pytest.raises(ValueError):
            is_valid_linkage(z, throw=True)
        assert ops.cut_tree(torch.from_numpy(z), [1]).tolist() == [[0]]
        return
    with pytest.raises(ValueError):
        is_valid_linkage(z, throw=True)
    with pytest.raises(ValueError, match="z must be"):
        ops.cut_tree(torch.from_numpy(z), [1])


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("edit, message", [
    (lambda z, i: z.__setitem__((i // 2, 0), -2), "integer|non-negative"),              # negative index
    (lambda z, i: z.__setitem__((i // 2, 2), -0.5), "non-negative"),                    # negative distance
    (lambda z, i: z.__setitem__((i // 2, 3), -2), "count"),                             # negative count
    (lambda z, i: z.__setitem__((i // 2, 0), z.shape[0] + i // 2 + 1), "formed"),       # used before formed
    (lambda z, i: z.__setitem__((i // 2, 1), z[i // 2, 0]), "more than once"),          # used twice
], ids=["negative-index", "negative-distance", "negative-count", "used-before-formed", "used-twice"])
def test_malformed_linkages_are_refused_like_scipy(n, edit, message):
    z = _scipy_z(n)
    edit(z, n - 1)
    assert not is_valid_linkage(z)
    with pytest.raises(ValueError, match=message):
        ops.cut_tree(torch.from_numpy(z), [1])
