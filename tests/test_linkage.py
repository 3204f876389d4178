"""fedtreelora.ops.linkage against scipy.cluster.hierarchy.linkage, to the bit.

What is claimed and tested: Z (merge order, ids, heights, counts) is identical to
scipy.cluster.hierarchy.linkage(squareform(d), method) for single, complete, average, weighted and
ward, on random euclidean distances, on random non-euclidean symmetric matrices (not ward), and
also with ties (integer-valued distances) and duplicate points (zero distances): the kernels follow
scipy's algorithms step for step, including the order in which candidates are compared.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import pdist, squareform

from fedtreelora import ops

METHODS = ("single", "complete", "average", "weighted", "ward")
NON_WARD = ("single", "complete", "average", "weighted")


def scipy_z(d: np.ndarray, method: str) -> np.ndarray:
    if d.shape[0] == 1:
        return np.zeros((0, 4))
    return scipy_linkage(squareform(d, checks=False), method)


def assert_same_as_scipy(d: np.ndarray, method: str) -> None:
    z = ops.linkage(torch.from_numpy(d), method)
    assert z.dtype == torch.float64 and z.shape == (d.shape[0] - 1, 4)
    expected = scipy_z(d, method)
    # Bit equality: array_equal on the values and on the raw bytes (tells -0.0 and 0.0 apart too).
    assert np.array_equal(z.numpy(), expected), f"{method}: Z differs from scipy\n{z.numpy()}\n{expected}"
    assert z.numpy().tobytes() == np.ascontiguousarray(expected).tobytes()


def points_distances(seed: int, n: int, dim: int, integer: bool = False, duplicates: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    if integer:
        x = rng.integers(0, 3, size=(n, dim)).astype(np.float64)
    if duplicates and n > 1:
        rows = rng.integers(0, n, size=duplicates)
        x[rng.integers(0, n, size=duplicates)] = x[rows]
    return squareform(pdist(x))


def test_native_kernel_is_loaded():
    assert ops.native_available(), "run with FEDTREELORA_REQUIRE_NATIVE=1: these tests are for the native kernel"


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 120), dim=st.integers(1, 8))
def test_random_points_equal_scipy(method, seed, n, dim):
    assert_same_as_scipy(points_distances(seed, n, dim), method)


@pytest.mark.parametrize("method", NON_WARD)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 120))
def test_random_non_euclidean_matrices_equal_scipy(method, seed, n):
    rng = np.random.default_rng(seed)
    a = rng.exponential(size=(n, n))
    d = np.triu(a, 1)
    d = d + d.T
    assert_same_as_scipy(d, method)


@pytest.mark.parametrize("method", METHODS)
def test_three_hundred_points(method):
    assert_same_as_scipy(points_distances(300, 300, 16), method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_smallest_sizes(method, n):
    d = points_distances(n, n, 2)
    assert_same_as_scipy(d, method)
    assert ops.linkage(torch.from_numpy(d), method).shape == (n - 1, 4)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 80), dim=st.integers(1, 3))
def test_ties_integer_distances_equal_scipy(method, seed, n, dim):
    # Points on a small integer grid: many equal distances, many duplicates (zero distances).
    d = points_distances(seed, n, dim, integer=True)
    assert_same_as_scipy(d, method)


@pytest.mark.parametrize("method", NON_WARD)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 80), levels=st.integers(1, 4))
def test_ties_integer_matrices_equal_scipy(method, seed, n, levels):
    rng = np.random.default_rng(seed)
    d = np.triu(rng.integers(0, levels + 1, size=(n, n)).astype(np.float64), 1)
    assert_same_as_scipy(d + d.T, method)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 80), duplicates=st.integers(1, 40))
def test_duplicate_points_equal_scipy(method, seed, n, duplicates):
    assert_same_as_scipy(points_distances(seed, n, 4, duplicates=duplicates), method)


@pytest.mark.parametrize("method", METHODS)
def test_all_points_identical(method):
    assert_same_as_scipy(np.zeros((7, 7)), method)


@pytest.mark.parametrize("method", METHODS)
def test_input_not_modified_and_layout_irrelevant(method):
    d = torch.from_numpy(points_distances(5, 40, 3))
    before = d.clone()
    z = ops.linkage(d, method)
    assert torch.equal(d, before)
    # A non-contiguous view of the same matrix and a float32 copy (converted to float64) work too.
    big = torch.zeros(80, 80, dtype=torch.float64)
    big[::2, ::2] = d
    assert torch.equal(ops.linkage(big[::2, ::2], method), z)
    d32 = d.float()
    assert np.array_equal(ops.linkage(d32, method).numpy(), scipy_z(d32.double().numpy(), method))


def test_empty_linkage_for_one_point():
    z = ops.linkage(torch.zeros(1, 1, dtype=torch.float64), "average")
    assert z.shape == (0, 4) and z.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the problem, from the wrapper and from the kernel itself.
def _bad_inputs():
    d = torch.from_numpy(points_distances(0, 6, 2))
    asym = d.clone()
    asym[1, 4] += 1e-9
    diag = d.clone()
    diag[2, 2] = 0.5
    nan = d.clone()
    nan[0, 3] = nan[3, 0] = float("nan")
    inf = d.clone()
    inf[5, 1] = inf[1, 5] = float("inf")
    neg = d.clone()
    neg[2, 3] = neg[3, 2] = -1.0
    return [
        ("asymmetric", asym, "symmetric"),
        ("diagonal", diag, "diagonal"),
        ("nan", nan, "NaN"),
        ("inf", inf, "Inf"),
        ("negative", neg, "negative"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_values_raise_value_error(case):
    _, d, message = case
    before = d.clone()
    with pytest.raises(ValueError, match=message):
        ops.linkage(d, "average")
    with pytest.raises(ValueError, match=message):
        torch.ops.fedtreelora.linkage(d, "average")
    torch.testing.assert_close(d, before, rtol=0, atol=0, equal_nan=True)  # not modified


def test_bad_method_and_shape_raise():
    d = torch.from_numpy(points_distances(0, 4, 2))
    with pytest.raises(ValueError, match="method"):
        ops.linkage(d, "centroid")
    with pytest.raises(ValueError, match="method"):
        torch.ops.fedtreelora.linkage(d, "centroid")
    with pytest.raises(ValueError, match="square"):
        ops.linkage(d[:, :3], "average")
    with pytest.raises(ValueError, match="square"):
        torch.ops.fedtreelora.linkage(d[:, :3].contiguous(), "average")
    with pytest.raises(ValueError, match="square"):
        torch.ops.fedtreelora.linkage(torch.zeros(4, dtype=torch.float64), "average")
    with pytest.raises(TypeError, match="float64"):
        torch.ops.fedtreelora.linkage(d.float(), "average")


@pytest.mark.parametrize("method", ["ward", "average"])
def test_overflowing_distances_raise_instead_of_returning_nan(method):
    # Finite input whose updates overflow (ward squares 1e300; average sums sizes * 1e308).
    d = torch.from_numpy(points_distances(1, 30, 3)) * (1e300 if method == "ward" else 1.7e308 / 10)
    with pytest.raises(ValueError, match="overflow"):
        ops.linkage(d, method)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_distances_are_converted_to_float64(dtype):
    """The docstring's promise: integer d is converted (exactly) to float64, and equals scipy on it."""
    d = np.array([[0, 3, 5, 9], [3, 0, 4, 8], [5, 4, 0, 2], [9, 8, 2, 0]])
    for method in ops.LINKAGE_METHODS:
        z = ops.linkage(torch.from_numpy(d).to(dtype), method)
        assert np.array_equal(z.numpy(), scipy_linkage(squareform(d.astype(np.float64)), method))
    with pytest.raises(TypeError, match="floating-point or integer"):
        ops.linkage(torch.from_numpy(d) > 0)


def test_contract_is_scipys_squareform_checks():
    """scipy's squareform (is_valid_dm, tol=0) refuses what we refuse: any asymmetry, any diagonal."""
    from scipy.spatial.distance import is_valid_dm
    d = points_distances(1, 5, 2)
    for i, j, delta in ((1, 3, 1e-12), (2, 2, 1e-300)):
        bad = d.copy()
        bad[i, j] += delta
        assert not is_valid_dm(bad)
        with pytest.raises(ValueError, match="symmetric" if i != j else "diagonal"):
            ops.linkage(torch.from_numpy(bad))
