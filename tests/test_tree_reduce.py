"""fedtreelora.ops.tree_reduce against a float64 PyTorch reference written here (one-hot matrix
products, externals computed directly from the complement), and against fedtreelora.core.reference.

The kernel accumulates in float64 and rounds once to x's dtype, so the error allowed is half an ulp
of the output dtype (eps * |expected|, or the subnormal spacing near 0) plus a tiny absolute term for
the cancellation of totals minus cluster sums.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedtreelora.ops as ops
from fedtreelora.core import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expected_means(x: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                   n_clusters: int):
    """float64 (cluster [C, P], external [C, P]) by one-hot products, 0 for empty sets."""
    x64, w64 = x.to(torch.float64), weights.to(torch.float64)
    cluster = torch.zeros(n_clusters, x.shape[1], dtype=torch.float64)
    external = torch.zeros_like(cluster)
    bounds = offsets.tolist()
    for l, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        member = labels[l][None, :] == torch.arange(n_clusters)[:, None]  # [C, N]
        for mask, out in ((member, cluster), (~member & member.any(1, keepdim=True), external)):
            wm = mask.to(torch.float64) * w64
            total = wm.sum(1, keepdim=True)
            out[:, lo:hi] = torch.where(total > 0, (wm @ x64[:, lo:hi]) / total.clamp_min(1e-300), 0.0)
    return cluster, external


def assert_close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, what: str) -> None:
    assert got.dtype == x.dtype and got.shape == want.shape, what
    eps, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    scale = float(x.to(torch.float64).abs().max()) if x.numel() else 0.0
    err = (got.to(torch.float64) - want).abs()
    allowed = eps * want.abs() + eps * tiny + 1e-12 * scale + 1e-300  # eps * tiny: subnormal spacing
    worst = int(torch.argmax(err - allowed))
    assert bool((err <= allowed).all()), (
        f"{what} ({x.dtype}): |got - want| = {float(err.flatten()[worst])} > {float(allowed.flatten()[worst])} "
        f"at flat index {worst}")


def check(x, offsets, labels, weights, n_clusters=None):
    inputs = [t.clone() for t in (x, offsets, labels, weights)]
    cluster, external = ops.tree_reduce(x, offsets, labels, weights, n_clusters=n_clusters)
    for before, after in zip(inputs, (x, offsets, labels, weights)):
        assert torch.equal(before, after), "an input was modified"
    c = n_clusters if n_clusters is not None else int(labels.max()) + 1
    want_cluster, want_external = expected_means(x, offsets, labels, weights, c)
    assert_close(cluster, want_cluster, x, "cluster mean")
    assert_close(external, want_external, x, "external mean")
    return cluster, external


def offsets_of(widths) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(widths).tolist()], dtype=torch.int64)


@st.composite
def problems(draw, max_n=30):
    seed = draw(st.integers(0, 2**32 - 1))
    gen = torch.Generator().manual_seed(seed)
    n = draw(st.integers(1, max_n))
    widths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    n_clusters = draw(st.integers(1, min(7, n)))  # the wrapper wants labels in [0, N)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "row_slice", "column_stride", "transposed"]))
    p = sum(widths)
    # Labels drawn from a per-layer subset of [0, C): some labels are absent from some layers.
    labels = torch.stack([torch.randint(0, n_clusters, (n,), generator=gen) % draw(st.integers(1, n_clusters))
                          for _ in widths])
    if draw(st.booleans()):
        weights = torch.randint(1, 500, (n,), generator=gen).to(torch.float64)  # sample counts
    else:
        weights = torch.rand(n, generator=gen, dtype=torch.float64) * 10 + 1e-3
    x64 = torch.randn(n, p, generator=gen, dtype=torch.float64) * 10 ** draw(st.integers(-3, 3))
    if layout == "row_slice":  # rows of a wider tensor: strided rows, unit-stride columns
        x = torch.zeros(2 * n, p + 3, dtype=dtype)[::2, 1:p + 1]
    elif layout == "column_stride":
        x = torch.zeros(n, 2 * p, dtype=dtype)[:, ::2]
    elif layout == "transposed":
        x = torch.zeros(p, n, dtype=dtype).T
    else:
        x = torch.zeros(n, p, dtype=dtype)
    x.copy_(x64.to(dtype))
    extra = draw(st.integers(0, 2))  # n_clusters beyond the largest label: trailing absent rows
    return x, offsets_of(widths), labels, weights, int(labels.max()) + 1 + extra


@SETTINGS
@given(problems())
def test_random_problems_match_float64_reference(problem):
    x, offsets, labels, weights, n_clusters = problem
    cluster, external = check(x, offsets, labels, weights, n_clusters)
    absent = ~(labels[:, None, :] == torch.arange(n_clusters)[None, :, None]).any(2)  # [L, C]
    bounds = offsets.tolist()
    for l, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = absent[l].nonzero().flatten()
        assert not bool(cluster[rows, lo:hi].any()) and not bool(external[rows, lo:hi].any()), \
            "rows of an absent label must be 0"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_n=12))
def test_matches_reference_module(problem):
    x, offsets, labels, weights, n_clusters = problem
    got = ops.tree_reduce(x, offsets, labels, weights, n_clusters=n_clusters)
    want = reference.tree_reduce(x, offsets, labels, weights, n_clusters)
    for g, w in zip(got, want):
        assert_close(g, w.to(torch.float64), x, "against fedtreelora.core.reference")


def test_one_cluster_holding_everyone_has_zero_external():
    x = torch.randn(5, 9)
    offsets = offsets_of([4, 5])
    labels = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 1, 1, 0]])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    cluster, external = check(x, offsets, labels, weights)
    assert torch.equal(external[0, :4], torch.zeros(4))
    assert torch.equal(external[1, :4], torch.zeros(4))  # label 1 absent from layer 0
    w = weights.to(torch.float32)
    torch.testing.assert_close(cluster[0, :4], (w[:, None] * x[:, :4]).sum(0) / w.sum())
    torch.testing.assert_close(external[1, 4:], cluster[0, 4:])  # two clusters: each is the other's external


def test_single_client_and_default_n_clusters():
    x = torch.randn(1, 6)
    cluster, external = check(x, offsets_of([2, 4]), torch.zeros(2, 1, dtype=torch.int64), torch.tensor([3.0]))
    assert torch.equal(cluster, x) and torch.equal(external, torch.zeros(1, 6))


def test_wide_layers_many_clusters_and_thread_count():
    """Layers wider than a column chunk, and C = N (small chunks); same bits with 1 thread."""
    gen = torch.Generator().manual_seed(3)
    n = 120
    x = torch.randn(n, 5000 + 777, generator=gen)
    offsets = offsets_of([5000, 777])
    labels = torch.stack([torch.randint(0, 3, (n,), generator=gen), torch.randperm(n, generator=gen)])
    weights = torch.randint(1, 50, (n,), generator=gen).to(torch.float64)
    got = check(x, offsets, labels, weights, n_clusters=n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.tree_reduce(x, offsets, labels, weights, n_clusters=n)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


def test_float32_weights_are_accepted():
    x = torch.randn(4, 3)
    labels = torch.tensor([[0, 1, 0, 1]])
    w32 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = ops.tree_reduce(x, offsets_of([3]), labels, w32)
    want = expected_means(x, offsets_of([3]), labels, w32.double(), 2)
    assert_close(got[0], want[0], x, "cluster mean")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument (and the client), never a crash or a wrong result.

def valid():
    return (torch.randn(4, 6), offsets_of([2, 4]), torch.tensor([[0, 1, 0, 1], [0, 0, 1, 2]]),
            torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))


def test_wrapper_rejects_bad_input():
    x, offsets, labels, weights = valid()
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.tree_reduce(x, offsets, labels.clamp(max=0) - 1, weights)
    with pytest.raises(ValueError, match="labels hold cluster 2 but n_clusters=2"):
        ops.tree_reduce(x, offsets, labels, weights, n_clusters=2)
    with pytest.raises(ValueError, match=r"client 2 has weight 0\.0"):
        ops.tree_reduce(x, offsets, labels, torch.tensor([1.0, 2.0, 0.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"client 1 has weight -1\.0"):
        ops.tree_reduce(x, offsets, labels, torch.tensor([1.0, -1.0, 1.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"client 3 has weight nan"):
        ops.tree_reduce(x, offsets, labels, torch.tensor([1.0, 1.0, 1.0, float("nan")], dtype=torch.float64))
    bad_x = x.clone()
    bad_x[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"x has NaN or Inf values in client 2 \(layer 1, column 4\)"):
        ops.tree_reduce(bad_x, offsets, labels, weights)
    with pytest.raises(ValueError, match=r"labels must be \[L, N\]"):
        ops.tree_reduce(x, offsets, labels[:1], weights)
    with pytest.raises(ValueError, match=r"weights must be \[N\]"):
        ops.tree_reduce(x, offsets, labels, weights[:3])
    with pytest.raises(ValueError, match="layer_offsets must end at the number of columns"):
        ops.tree_reduce(x, offsets_of([2, 3]), labels, weights)
    with pytest.raises(TypeError, match="labels must be int64"):
        ops.tree_reduce(x, offsets, labels.to(torch.int32), weights)
    with pytest.raises(TypeError, match="weights must be a floating-point"):
        ops.tree_reduce(x, offsets, labels, weights.to(torch.int64))
    with pytest.raises(TypeError, match="x must be float32"):
        ops.tree_reduce(x.to(torch.int32), offsets, labels, weights)


def test_an_external_mean_that_overflows_float64_is_refused_not_returned_as_inf():
    # Every cluster sum is finite and so is the total (summed in cluster order: -big + big + big),
    # but total - cluster 0's sum (the external sum of cluster 0) overflows: the true external mean
    # of cluster 0 (big) is finite, so an inf there would be a silently wrong result.
    big = 1.5e308
    x = torch.tensor([[big], [big], [-big]], dtype=torch.float64)
    labels = torch.tensor([[1, 2, 0]])
    with pytest.raises(ValueError, match="tree_reduce overflowed: x is finite"):
        ops.tree_reduce(x, offsets_of([1]), labels, torch.ones(3, dtype=torch.float64))


@pytest.mark.skipif(not ops.native_available(), reason="the native core is not loaded")
def test_kernel_rejects_bad_input():
    """Called through torch.ops directly (no wrapper), the kernel refuses instead of writing out of bounds."""
    kernel = torch.ops.fedtreelora.tree_reduce
    x, offsets, labels, weights = valid()
    with pytest.raises(ValueError, match="client 3 has label 3 in layer 1"):
        kernel(x, offsets, torch.tensor([[0, 1, 0, 1], [0, 0, 1, 3]]), weights, 3)
    with pytest.raises(ValueError, match="client 0 has label -1 in layer 0"):
        kernel(x, offsets, torch.tensor([[-1, 1, 0, 1], [0, 0, 1, 2]]), weights, 3)
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        kernel(x, offsets, labels, weights, 0)
    with pytest.raises(ValueError, match="client 1 has weight -2"):
        kernel(x, offsets, labels, torch.tensor([1.0, -2.0, 1.0, 1.0], dtype=torch.float64), 3)
    with pytest.raises(TypeError, match="weights must be float64"):
        kernel(x, offsets, labels, weights.float(), 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        kernel(x, torch.tensor([0, 3, 3, 6]), torch.zeros(3, 4, dtype=torch.int64), weights, 1)
    with pytest.raises(ValueError, match="must run from 0 to P=6"):
        kernel(x, torch.tensor([0, 2, 5]), labels, weights, 3)
    with pytest.raises(ValueError, match=r"labels must be \[L, N\]"):
        kernel(x, offsets, labels.T.contiguous(), weights, 3)
