"""fedtreelora.ops.layer_distances against scipy's cdist and the float64 reference.

Tolerances are set by the dtype the kernel computes in (float32 for float32/bfloat16/float16 input,
float64 for float64), not by the input dtype: the references see exactly the same input values.
Frobenius errors are bounded on the squared distance relative to the slices' centred squared norms,
which is the error the Gram formulation makes (so duplicates must come out ~0 within it).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

import fedtreelora.ops as ops
from fedtreelora.core import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Tolerance on d^2 relative to ||a - mean||^2 + ||b - mean||^2 (frobenius), absolute on d (cosine).
FROBENIUS_TOL = {torch.float32: 3e-5, torch.float64: 1e-6}
COSINE_TOL = {torch.float32: 2e-5, torch.float64: 2e-6}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def offsets_of(widths) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(widths).tolist()], dtype=torch.int64)


def assert_structure(per_layer: torch.Tensor, mean: torch.Tensor, n: int, layers: int) -> None:
    assert per_layer.dtype == torch.float32 and mean.dtype == torch.float32
    assert per_layer.shape == (layers, n, n) and mean.shape == (n, n)
    assert torch.equal(per_layer, per_layer.transpose(1, 2)), "per-layer distances not exactly symmetric"
    assert torch.equal(mean, mean.T), "mean distances not exactly symmetric"
    assert torch.equal(torch.diagonal(per_layer, dim1=1, dim2=2), torch.zeros(layers, n))
    assert torch.equal(torch.diagonal(mean), torch.zeros(n))
    assert bool((per_layer >= 0).all()) and bool((mean >= 0).all())
    assert bool(torch.isfinite(per_layer).all())


def layer_slices(x: torch.Tensor, offsets: torch.Tensor) -> list[np.ndarray]:
    x64 = x.to(torch.float64).numpy()
    bounds = offsets.tolist()
    return [x64[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def assert_close_to_exact(got: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, metric: str, expected) -> None:
    """Compare each layer of `got` with expected[l] ([n, n] float64) under the kernel's error model."""
    for l, s in enumerate(layer_slices(x, offsets)):
        want = np.asarray(expected[l], dtype=np.float64)
        have = got[l].to(torch.float64).numpy()
        if metric == "frobenius":
            sq = ((s - s.mean(0)) ** 2).sum(1)
            allowed = FROBENIUS_TOL[compute_dtype(x.dtype)] * (sq[:, None] + sq[None, :]) + 1e-30
            err = np.abs(have ** 2 - want ** 2)
        else:
            allowed = COSINE_TOL[compute_dtype(x.dtype)]
            err = np.abs(have - want)
        worst = np.unravel_index(np.argmax(err - allowed), err.shape)
        assert bool((err <= allowed).all()), (
            f"layer {l} ({s.shape[1]} wide), pair {worst}: got {have[worst]}, want {want[worst]}")


def scipy_distances(s: np.ndarray, metric: str) -> np.ndarray:
    if metric == "frobenius":
        return cdist(s, s, "euclidean")
    norms = np.linalg.norm(s, axis=1)
    zero = norms == 0
    d = cdist(np.where(zero[:, None], 1.0, s), np.where(zero[:, None], 1.0, s), "cosine")
    d[zero, :] = 1.0  # a zero slice is dissimilar (cos 0) to everything but itself
    d[:, zero] = 1.0
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, 2.0)


def test_native_kernel_is_used_when_required():
    if os.environ.get("FEDTREELORA_REQUIRE_NATIVE") != "1":
        pytest.skip("run with FEDTREELORA_REQUIRE_NATIVE=1 to test the compiled kernel")
    assert ops.native_available()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fedtreelora::layer_distances", "CPU")


@st.composite
def cases(draw):
    n = draw(st.integers(1, 150))
    widths = draw(st.lists(st.integers(1, 300), min_size=1, max_size=5))
    dtype = draw(st.sampled_from(DTYPES))
    metric = draw(st.sampled_from(("frobenius", "cosine")))
    layout = draw(st.sampled_from(("contiguous", "transposed", "column_slice")))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from((1e-3, 1.0, 30.0)))
    duplicates = draw(st.integers(0, n // 2))
    zero_rows = draw(st.integers(0, n // 3)) if metric == "cosine" else 0
    gen = torch.Generator().manual_seed(seed)
    p = sum(widths)
    x64 = torch.randn(n, p, generator=gen, dtype=torch.float64) * scale
    for _ in range(duplicates):  # clients that hold the same adapter
        src, dst = torch.randint(n, (2,), generator=gen).tolist()
        x64[dst] = x64[src]
    for _ in range(zero_rows):  # an untrained (zero) slice in one layer
        k, l = torch.randint(n, (1,), generator=gen).item(), torch.randint(len(widths), (1,), generator=gen).item()
        lo = sum(widths[:l])
        x64[k, lo:lo + widths[l]] = 0
    if layout == "transposed":  # a [P, N] buffer viewed as [N, P]
        x = x64.to(dtype).T.contiguous().T
    elif layout == "column_slice":  # every other column of a wider buffer
        wide = torch.zeros(n, 2 * p, dtype=dtype)
        wide[:, ::2] = x64.to(dtype)
        x = wide[:, ::2]
    else:
        x = x64.to(dtype)
    return x, offsets_of(widths), metric


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_matches_scipy_and_reference(case):
    x, offsets, metric = case
    before = x.clone()
    per_layer, mean = ops.layer_distances(x, offsets, metric)
    assert torch.equal(x, before), "the input was modified"
    n, layers = x.shape[0], offsets.numel() - 1
    assert_structure(per_layer, mean, n, layers)
    assert_close_to_exact(per_layer, x, offsets, metric, [scipy_distances(s, metric) for s in layer_slices(x, offsets)])
    ref_layers, ref_mean = reference.layer_distances(x, offsets, metric)
    assert_close_to_exact(per_layer, x, offsets, metric, ref_layers.double().numpy())
    # The mean is the float64 mean of the (unrounded) layer distances.
    torch.testing.assert_close(mean.double(), per_layer.double().mean(0), rtol=1e-6, atol=1e-30)
    # 1 - cos of two equal rows is a rounding residue (~1e-16 in float64) where ours may be exactly 0:
    # cosine gets the same absolute floor as its per-layer check above.
    floor = COSINE_TOL[compute_dtype(x.dtype)] if metric == "cosine" else 0.0
    torch.testing.assert_close(mean, ref_mean, rtol=1e-3, atol=1e-3 * float(ref_mean.abs().max()) + floor + 1e-30)


def test_equal_rows_under_cosine_match_the_reference_whose_residue_is_not_zero():
    # Found by hypothesis: two clients with the same adapter, one layer. The float64 reference gives
    # 1 - cos = 3e-16, the kernel 0; both are right within the cosine tolerance.
    row = (torch.randn(1, 36, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-3).float()
    x, offsets = torch.cat([row, row]), torch.tensor([0, 36])
    test_matches_scipy_and_reference.hypothesis.inner_test((x, offsets, "cosine"))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("metric", ["frobenius", "cosine"])
def test_edge_sizes(n, metric):
    x = torch.randn(n, 9, generator=torch.Generator().manual_seed(n))
    offsets = torch.tensor([0, 1, 4, 9])
    per_layer, mean = ops.layer_distances(x, offsets, metric)
    assert_structure(per_layer, mean, n, 3)
    assert_close_to_exact(per_layer, x, offsets, metric, [scipy_distances(s, metric) for s in layer_slices(x, offsets)])
    if n == 1:
        assert torch.equal(mean, torch.zeros(1, 1))


@pytest.mark.parametrize("dtype, offset, noise, rtol", [
    (torch.float32, 1000.0, 1e-3, 1e-4),
    (torch.float64, 1e6, 1e-3, 1e-8),
])
def test_large_common_offset_keeps_relative_accuracy(dtype, offset, noise, rtol):
    # Clients that differ by little around a large common value: the plain Gram trick would lose
    # every digit (||x||^2 ~ 1e6 * P against differences ~ 1e-6 * P).
    gen = torch.Generator().manual_seed(0)
    x = (offset + noise * torch.randn(40, 300, generator=gen, dtype=torch.float64)).to(dtype)
    offsets = torch.tensor([0, 100, 300])
    per_layer, mean = ops.layer_distances(x, offsets, "frobenius")
    ref_layers, ref_mean = reference.layer_distances(x, offsets, "frobenius")
    off_diagonal = ~torch.eye(40, dtype=torch.bool)
    assert bool((ref_layers[:, off_diagonal] > 0).all())
    rel = ((per_layer.double() - ref_layers.double()).abs() / ref_layers.double().clamp_min(1e-300))[:, off_diagonal]
    assert float(rel.max()) < rtol, f"relative error {float(rel.max()):.3g}"
    torch.testing.assert_close(mean, ref_mean, rtol=rtol, atol=0.0)


def test_duplicates_and_zero_rows_exact_where_defined():
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    x[3] = x[1]
    x[4, :6] = 0  # zero in layer 0 only
    x[2, :6] = 0
    offsets = torch.tensor([0, 6, 12])
    cos_layers, _ = ops.layer_distances(x, offsets, "cosine")
    assert float(cos_layers[0, 4, 0]) == 1.0 and float(cos_layers[0, 0, 4]) == 1.0
    assert float(cos_layers[0, 2, 4]) == 1.0  # two zero slices: similarity 0 too
    assert float(cos_layers[:, 1, 3].abs().max()) < 1e-6
    fro_layers, _ = ops.layer_distances(x, offsets, "frobenius")
    assert float(fro_layers[:, 1, 3].max()) < 1e-5 * float(x.norm())
    assert float(fro_layers[0, 2, 4]) < 1e-6


@pytest.mark.parametrize("metric", ["frobenius", "cosine"])
def test_many_clients_span_several_gemm_blocks(metric):
    # The Gram is computed as a staircase of 256-row blocks; 600 clients make three, the last partial.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(600, 40, generator=gen)
    x[599] = x[0]  # a duplicate across blocks
    offsets = torch.tensor([0, 3, 40])
    per_layer, mean = ops.layer_distances(x, offsets, metric)
    assert_structure(per_layer, mean, 600, 2)
    assert_close_to_exact(per_layer, x, offsets, metric, [scipy_distances(s, metric) for s in layer_slices(x, offsets)])


@pytest.mark.parametrize("magnitude", [1e-30, 1e-18, 1e18, 1e30])
def test_magnitudes_whose_squares_leave_float32(magnitude):
    # Squares of 1e-30 underflow and of 1e30 overflow float32: rows are rescaled by a power of two.
    x = (magnitude * torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))).float()
    offsets = torch.tensor([0, 7, 20])
    per_layer, mean = ops.layer_distances(x, offsets, "frobenius")
    assert_structure(per_layer, mean, 30, 2)
    want = np.stack([cdist(s, s) for s in layer_slices(x, offsets)])
    off_diagonal = ~np.eye(30, dtype=bool)
    rel = np.abs(per_layer.double().numpy() - want)[:, off_diagonal] / want[:, off_diagonal]
    assert rel.max() < 1e-5, f"relative error {rel.max():.3g}"


@pytest.mark.parametrize("dtype, huge, tiny", [(torch.float64, 1e300, 1e-300), (torch.float32, 1e30, 1e-30)])
def test_opposite_and_scaled_rows_cosine(dtype, huge, tiny):
    a = torch.randn(1, 50, dtype=dtype, generator=torch.Generator().manual_seed(2))
    x = torch.cat([a, -a, huge * a, tiny * a])  # squares over/underflow: cosine is scale invariant
    per_layer, _ = ops.layer_distances(x, torch.tensor([0, 50]), "cosine")
    want = torch.tensor([[0, 2, 0, 0], [2, 0, 2, 2], [0, 2, 0, 0], [0, 2, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(per_layer[0], want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear Python exception naming the argument (or client) at fault.
GOOD_X = torch.randn(4, 6)
GOOD_OFFSETS = torch.tensor([0, 2, 6])


@pytest.mark.parametrize("x, offsets, metric, error, match", [
    (GOOD_X[0], GOOD_OFFSETS, "frobenius", ValueError, "x must be 2-D"),
    (GOOD_X[None], GOOD_OFFSETS, "frobenius", ValueError, "x must be 2-D"),
    (GOOD_X[:0], GOOD_OFFSETS, "frobenius", ValueError, "no clients"),
    (GOOD_X.to(torch.int32), GOOD_OFFSETS, "frobenius", TypeError, "x must be float32"),
    ([[1.0, 2.0]], torch.tensor([0, 2]), "frobenius", TypeError, "x must be a torch.Tensor"),
    (GOOD_X, GOOD_OFFSETS.to(torch.int32), "frobenius", TypeError, "layer_offsets must be int64"),
    (GOOD_X, GOOD_OFFSETS.to(torch.float32), "frobenius", TypeError, "layer_offsets must be int64"),
    (GOOD_X, torch.tensor([6]), "frobenius", ValueError, "layer_offsets must be 1-D"),
    (GOOD_X, GOOD_OFFSETS[None], "frobenius", ValueError, "layer_offsets must be 1-D"),
    (GOOD_X, torch.tensor([1, 2, 6]), "frobenius", ValueError, "layer_offsets must start at 0"),
    (GOOD_X, torch.tensor([0, 2, 5]), "frobenius", ValueError, "must end at the number of columns P=6"),
    (GOOD_X, torch.tensor([0, 2, 7]), "frobenius", ValueError, "must end at the number of columns P=6"),
    (GOOD_X, torch.tensor([0, 4, 2, 6]), "frobenius", ValueError, "strictly increasing: layer 1"),
    (GOOD_X, torch.tensor([0, 2, 2, 6]), "frobenius", ValueError, "strictly increasing: layer 1"),
    (GOOD_X, GOOD_OFFSETS, "euclidean", ValueError, "metric must be one of"),
])
def test_bad_input_raises_clear_error(x, offsets, metric, error, match):
    with pytest.raises(error, match=match):
        ops.layer_distances(x, offsets, metric)


@pytest.mark.parametrize("metric", ["frobenius", "cosine"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_client_and_layer(metric, bad):
    x = torch.randn(5, 6)
    x[3, 4] = bad
    with pytest.raises(ValueError, match=r"client 3 \(layer 1, column 4\)"):
        ops.layer_distances(x, GOOD_OFFSETS, metric)


def test_distances_beyond_float32_are_reported_not_silent():
    x = 1e300 * torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="overflowed"):
        ops.layer_distances(x, GOOD_OFFSETS, "frobenius")


@pytest.mark.skipif(not ops.native_available(), reason="native core not loaded")
@pytest.mark.parametrize("x, offsets, metric, error, match", [
    (GOOD_X, GOOD_OFFSETS, "manhattan", ValueError, "metric must be 'frobenius' or 'cosine'"),
    (GOOD_X[0], GOOD_OFFSETS, "frobenius", ValueError, "x must be 2-D"),
    (GOOD_X.to(torch.int64), GOOD_OFFSETS, "frobenius", TypeError, "x must be float32"),
    (GOOD_X, GOOD_OFFSETS.to(torch.int32), "frobenius", TypeError, "layer_offsets must be int64"),
    (GOOD_X, torch.tensor([0]), "frobenius", ValueError, "at least 2 entries"),
    (GOOD_X, torch.tensor([1, 6]), "frobenius", ValueError, "must start at 0"),
    (GOOD_X, torch.tensor([0, 5]), "frobenius", ValueError, "must end at the number of columns P=6"),
    (GOOD_X, torch.tensor([0, 3, 3, 6]), "frobenius", ValueError, "strictly increasing: layer 1"),
])
def test_kernel_checks_its_own_inputs(x, offsets, metric, error, match):
    # Called directly, bypassing the wrapper: TORCH_CHECKs, not a crash.
    with pytest.raises(error, match=match):
        torch.ops.fedtreelora.layer_distances(x, offsets, metric)


def test_non_finite_single_client_is_reported():
    # a lone client's output is the exact-zero diagonal, so ops.py checks x itself there
    with pytest.raises(ValueError, match="client 0"):
        ops.layer_distances(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0, 2]))


def test_iris_accuracy_is_the_documented_bound():
    """Real data (sklearn's iris): float64 x gives scipy's distances to float32 rounding; float32 x
    stays within the bound the docstring states (sqrt(w) 2**-24 (|a|^2 + |b|^2) / d^2)."""
    from scipy.spatial.distance import pdist, squareform
    from sklearn.datasets import load_iris
    x = load_iris().data
    offsets = torch.tensor([0, x.shape[1]])
    ref = squareform(pdist(x))
    off = ref > 0
    d64, _ = ops.layer_distances(torch.from_numpy(x), offsets)
    assert (np.abs(d64[0].double().numpy() - ref)[off] / ref[off]).max() < 1.2e-7
    x32 = torch.from_numpy(x).float()
    ref32 = squareform(pdist(x32.double().numpy()))
    d32, _ = ops.layer_distances(x32, offsets)
    centred = x32.double().numpy() - x32.double().numpy().mean(0)
    sq = (centred ** 2).sum(1)
    bound = np.sqrt(x.shape[1]) * 2.0 ** -24 * (sq[:, None] + sq[None, :]) / np.where(off, ref32, 1) ** 2
    rel = np.abs(d32[0].double().numpy() - ref32) / np.where(off, ref32, 1)
    assert (rel[off] <= np.maximum(bound[off], 1.2e-7)).all()
