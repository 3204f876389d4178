"""Fuzzing the public ops: random shapes, dtypes, NaN/Inf, huge and tiny magnitudes, ties, duplicates,
empty and single clients. Every case ends in a result equal to the float64 reference or in a
ValueError/TypeError with a message; never a crash, never a silently wrong value; inputs untouched;
results bitwise identical when the same call is repeated.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from fedtreelora.core import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLEAR_ERRORS = (ValueError, TypeError)


@st.composite
def client_matrix(draw, max_clients=9, max_layers=4):
    """x [N, P] with a random layer split, magnitude, dtype, duplicates and special values."""
    n = draw(st.integers(0, max_clients))
    widths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=max_layers))
    p = sum(widths)
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = draw(st.sampled_from([1.0, 1e-12, 1e-30, 1e12, 1e30] if dtype in (torch.float32, torch.float64) else [1.0, 1e-3, 1e3]))
    offset = draw(st.sampled_from([0.0, 0.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, p, generator=g, dtype=torch.float64) * magnitude + offset)
    if n >= 2 and draw(st.booleans()):
        x[-1] = x[0]  # a duplicate client
    if n >= 1 and draw(st.integers(0, 4)) == 0:
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, p - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    offsets = torch.tensor([0, *np.cumsum(widths).tolist()], dtype=torch.int64)
    return x.to(dtype), offsets


def _relative_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    scale = want.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    err = (got.double() - want.double()).abs().max() if want.numel() else torch.tensor(0.0)
    assert err <= rtol * scale, f"max error {float(err):.3e} vs scale {float(scale):.3e}"


@given(client_matrix(), st.sampled_from(["frobenius", "cosine"]))
def test_layer_distances_fuzz(case, metric):
    x, offsets = case
    before = x.clone()
    try:
        per_layer, mean = ops.layer_distances(x, offsets, metric)
    except CLEAR_ERRORS as exc:
        assert str(exc)
        finite = bool(torch.isfinite(x.double()).all())
        assert x.shape[0] == 0 or not finite or "overflow" in str(exc), f"refused a valid input: {exc}"
        return
    finally:
        assert torch.equal(x, before) or (x.isnan() == before.isnan()).all()
    assert torch.isfinite(x.double()).all(), "NaN/Inf input must be refused"
    ref_per_layer, _ = reference.layer_distances(x, offsets, metric)
    rtol = {torch.float32: 2e-3, torch.float64: 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}[x.dtype]
    for l in range(per_layer.shape[0]):
        if metric == "frobenius":  # relative to each layer's own scale
            _relative_close(per_layer[l], ref_per_layer[l], rtol)
        else:  # cosine distances live in [0, 2]: an absolute tolerance
            torch.testing.assert_close(per_layer[l].double(), ref_per_layer[l].double(), rtol=0, atol=10 * rtol)
    assert torch.equal(per_layer, per_layer.transpose(1, 2)) and (per_layer >= 0).all()
    assert (torch.diagonal(per_layer, dim1=1, dim2=2) == 0).all()
    again = ops.layer_distances(x, offsets, metric)
    assert torch.equal(again[0], per_layer) and torch.equal(again[1], mean), "not deterministic"


@st.composite
def distance_matrix(draw, max_clients=12):
    n = draw(st.integers(1, max_clients))
    kind = draw(st.sampled_from(["random", "ties", "duplicates", "huge", "tiny"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pts = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if kind == "ties":
        pts = pts.round()
    if kind == "duplicates" and n >= 2:
        pts[n // 2:] = pts[0]
    scale = {"huge": 1e150, "tiny": 1e-150}.get(kind, 1.0)
    d = torch.cdist(pts, pts) * scale
    d = 0.5 * (d + d.T)
    d.fill_diagonal_(0)
    return d


@given(distance_matrix(), st.sampled_from(list(ops.LINKAGE_METHODS)))
def test_linkage_and_cut_tree_fuzz(d, method):
    before = d.clone()
    z = ops.linkage(d, method)
    assert torch.equal(d, before)
    assert z.shape == (d.shape[0] - 1, 4)
    ref = reference.linkage(d, method)
    # heights always agree with scipy (merge order may differ among exact ties)
    torch.testing.assert_close(z[:, 2].sort().values, ref[:, 2].sort().values, rtol=1e-12, atol=0)
    assert torch.equal(z, ops.linkage(d, method)), "not deterministic"
    n = d.shape[0]
    counts = torch.arange(1, n + 1)
    labels = ops.cut_tree(z, counts)
    assert labels.shape == (n, n)
    assert torch.equal(labels, reference.cut_tree(z, counts))
    assert [len(set(row.tolist())) for row in labels] == counts.tolist()


@given(distance_matrix(), st.integers(0, 2**31 - 1), st.booleans())
def test_silhouette_fuzz(d, seed, poison):
    n = d.shape[0]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(1, min(n, 4)), (2, n), generator=g)
    d3 = d[None]  # float64: the huge and tiny cases do not fit float32
    if poison and n >= 2:
        d3 = d3.clone()
        d3[0, 0, 1] = math.nan
    before = d3.clone()
    try:
        got = ops.silhouette(d3, labels[None])
    except CLEAR_ERRORS as exc:
        assert poison and "NaN" in str(exc)
        return
    assert torch.equal(d3, before)
    want = reference.silhouette(d3, labels[None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan())


@given(client_matrix(max_clients=8), st.integers(0, 2**31 - 1), st.sampled_from(["ok", "zero", "negative", "nan", "int"]))
def test_tree_reduce_fuzz(case, seed, weight_kind):
    x, offsets = case
    n, n_layers = x.shape[0], offsets.numel() - 1
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(1, min(n, 3)), (n_layers, n), generator=g) if n else torch.zeros(n_layers, 0, dtype=torch.int64)
    weights = torch.randint(1, 100, (n,), generator=g).double()
    if n and weight_kind in ("zero", "negative", "nan"):
        weights[-1] = {"zero": 0.0, "negative": -1.0, "nan": math.nan}[weight_kind]
    if weight_kind == "int":
        weights = weights.long()
    before = (x.clone(), labels.clone(), weights.clone())
    try:
        cluster, external = ops.tree_reduce(x, offsets, labels, weights)
    except CLEAR_ERRORS as exc:
        assert str(exc)
        valid = n > 0 and weight_kind in ("ok",) and bool(torch.isfinite(x.double()).all())
        assert not valid or "overflow" in str(exc), f"refused a valid input: {exc}"
        return
    finally:
        assert torch.equal(labels, before[1]) and torch.equal(weights.isnan(), before[2].isnan())
        assert torch.equal(x.isnan(), before[0].isnan()) and torch.equal(x.nan_to_num(), before[0].nan_to_num())
    assert weight_kind == "ok" and torch.isfinite(x.double()).all()
    ref_cluster, ref_external = reference.tree_reduce(x, offsets, labels, weights, int(labels.max()) + 1)
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}[x.dtype]
    for l in range(n_layers):
        lo, hi = offsets[l].item(), offsets[l + 1].item()
        for c in labels[l].unique().tolist():
            scale = x[:, lo:hi].double().abs().max().clamp_min(1e-300)
            for got, want in ((cluster, ref_cluster), (external, ref_external)):
                err = (got[c, lo:hi].double() - want[c, lo:hi].double()).abs().max()
                assert err <= rtol * scale + 1e-300, (l, c, float(err), float(scale))
    again = ops.tree_reduce(x, offsets, labels, weights)
    assert torch.equal(again[0], cluster) and torch.equal(again[1], external), "not deterministic"


@pytest.mark.parametrize("bad", [
    lambda: ops.layer_distances([[1.0]], torch.tensor([0, 1])),
    lambda: ops.layer_distances(torch.ones(2, 3, dtype=torch.int32), torch.tensor([0, 3])),
    lambda: ops.layer_distances(torch.ones(2, 3), torch.tensor([0, 3], dtype=torch.int32)),
    lambda: ops.layer_distances(torch.ones(2, 3), torch.tensor([0, 3], device="meta")),
    lambda: ops.linkage(torch.zeros(2, 3, dtype=torch.float64)),
    lambda: ops.cut_tree(torch.zeros(2, 3, dtype=torch.float64), [1]),
    lambda: ops.silhouette(torch.zeros(1, 3, 3), torch.zeros(1, 1, 3, dtype=torch.int32)),
    lambda: ops.tree_reduce(torch.ones(2, 3), torch.tensor([0, 3]), torch.zeros(1, 2, dtype=torch.int64), torch.ones(3)),
])
def test_malformed_calls_raise_clear_errors(bad):
    with pytest.raises(CLEAR_ERRORS) as info:
        bad()
    assert len(str(info.value)) > 10
