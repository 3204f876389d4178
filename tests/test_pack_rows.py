"""fedtreelora.ops.pack_rows against torch.stack / torch.cat, its errors, and its use in layer_rows and pack."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from fedtreelora.core import adapters, ops, reference
from fedtreelora.core.adapters import layer_rows

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
native = pytest.mark.skipif(not ops.native_available(), reason="the native core is not loaded (reference ops only)")


def _clients(n: int, shapes, dtype=torch.float32, seed: int = 0) -> list[list[torch.Tensor]]:
    """clients[i][j]: key j of client i, fresh random values (special values included)."""
    gen = torch.Generator().manual_seed(seed)
    clients = [[torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes] for _ in range(n)]
    if n and shapes and math.prod(shapes[0]):
        clients[-1][0].view(-1)[0] = float("nan")  # copied bit for bit like anything else
        clients[0][0].view(-1)[-1] = -0.0
    return clients


def _key_major(clients) -> list[torch.Tensor]:
    n, k = len(clients), len(clients[0])
    return [clients[i][j] for j in range(k) for i in range(n)]


def _by_cat(clients, dtype) -> torch.Tensor:
    """Row i = torch.cat of client i's tensors, flattened (what adapters.pack computed)."""
    return torch.stack([torch.cat([t.reshape(-1) for t in row]) if row else torch.zeros(0, dtype=dtype)
                        for row in clients])


def _by_stack(clients) -> torch.Tensor:
    """Key j's columns = torch.stack of its tensors (what layer_rows computed)."""
    n = len(clients)
    return torch.cat([torch.stack([clients[i][j] for i in range(n)]).reshape(n, -1)
                      for j in range(len(clients[0]))], dim=1)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit (NaN payloads and signed zeros included)."""
    def raw(t):
        return t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw(a), raw(b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 50])
@pytest.mark.parametrize("spare", [0, 7], ids=["contiguous_out", "row_strided_out"])
def test_equals_stack_and_cat(n, dtype, spare):
    shapes = [(4, 16), (16, 4), (), (0,), (3, 2, 5)]
    clients = _clients(n, shapes, dtype, seed=n)
    before = [[t.clone() for t in row] for row in clients]
    width = sum(math.prod(s) for s in shapes)
    buffer = torch.full((n, width + spare), 7.0, dtype=dtype)
    out = buffer[:, :width]
    assert ops.pack_rows(_key_major(clients), out) is None
    want = _by_cat(clients, dtype)
    assert _same_bits(out, want)
    assert _same_bits(out, _by_stack(clients))
    assert bool((buffer[:, width:] == 7).all()), "pack_rows wrote outside out"
    assert all(_same_bits(t, b) for row, brow in zip(clients, before) for t, b in zip(row, brow)), "a part was modified"


@given(n=st.integers(1, 12), shapes=st.lists(st.lists(st.integers(0, 9), max_size=3).map(tuple), min_size=1, max_size=6),
       dtype=st.sampled_from(DTYPES), spare=st.integers(0, 5), seed=st.integers(0, 2**31 - 1))
def test_random_layouts(n, shapes, dtype, spare, seed):
    clients = _clients(n, shapes, dtype, seed)
    width = sum(math.prod(s) for s in shapes)
    out = torch.zeros(n, width + spare, dtype=dtype)[:, :width]
    ops.pack_rows(_key_major(clients), out)
    assert _same_bits(out, _by_cat(clients, dtype))


def test_views_and_tuples_and_no_keys():
    x = torch.arange(24.0).reshape(4, 6)
    parts = tuple(x[i, :2] for i in range(4)) + tuple(x[i, 2:].view(2, 2) for i in range(4))  # contiguous views
    out = torch.empty(4, 6)
    ops.pack_rows(parts, out)
    assert torch.equal(out, x)
    ops.pack_rows(iter(parts), out)  # any iterable
    assert torch.equal(out, x)
    empty = torch.empty(3, 0)
    ops.pack_rows([], empty)  # no keys, no columns: nothing to do


def test_matches_the_reference():
    clients = _clients(5, [(3, 4), (2,)], torch.float32, seed=3)
    got, want = torch.zeros(5, 14), torch.zeros(5, 14)
    ops.pack_rows(_key_major(clients), got)
    reference.pack_rows(_key_major(clients), want)
    assert _same_bits(got, want)


# ------------------------------------------------------------------------------------------------ errors
def _args(n=3):
    clients = _clients(n, [(2, 3), (4,)], seed=1)
    return _key_major(clients), torch.zeros(n, 10)


def _error_cases():
    parts, out = _args()
    cases = {
        "count": (parts[:-1], out, ValueError, r"got 5 parts, not a multiple of N=3"),
        "dtype": (parts[:4] + [parts[4].double()] + parts[5:], out, TypeError,
                  r"parts\[4\] \(key 1, client 1\) is (torch.float64|Double) but out is (torch.float32|Float)"),
        "contiguous": (parts[:2] + [torch.zeros(3, 2).T] + parts[3:], out, ValueError,
                       r"parts\[2\] \(key 0, client 2\) is not contiguous"),
        "numel": (parts[:5] + [torch.zeros(5)], out, ValueError,
                  r"parts\[5\] \(key 1, client 2\) has 5 elements but key 1 has 4"),
        "widths": (parts, torch.full((3, 11), 5.0), ValueError, r"the 2 keys' widths sum to 10 but out has W=11 columns"),
        "out_dims": (parts, torch.zeros(30), ValueError, r"out must be \[N, W\]"),
        "out_rows": (parts, torch.zeros(0, 10), ValueError, r"out must be \[N, W\]"),
        "out_columns": (parts, torch.zeros(10, 3).T, ValueError, r"out's columns must be unit-stride"),
        "not_a_tensor": (parts[:3] + [[1.0, 2.0]] + parts[4:], out, TypeError,
                         r"parts\[3\] \(key 1, client 0\) must be a torch.Tensor, got list"),
    }
    return cases


@pytest.mark.parametrize("case", list(_error_cases()))
@pytest.mark.parametrize("path", ["native", "reference"])
def test_errors_name_the_part(case, path, monkeypatch):
    if path == "native" and not ops.native_available():
        pytest.skip("the native core is not loaded")
    if path == "reference":
        monkeypatch.setattr(ops, "native_available", lambda: False)
    parts, out, error, message = _error_cases()[case]
    before = out.clone()
    with pytest.raises(error, match=message):
        ops.pack_rows(parts, out)
    assert torch.equal(out, before), "out written before the checks passed"


def test_the_reference_path_refuses_overlaps_like_the_kernel(monkeypatch):
    monkeypatch.setattr(ops, "native_available", lambda: False)
    parts, out = _args()
    with pytest.raises(ValueError, match=r"rows overlap"):
        ops.pack_rows(parts, torch.zeros(10).expand(3, 10))
    with pytest.raises(ValueError, match=r"parts\[1\] \(key 0, client 1\) overlaps out"):
        ops.pack_rows(parts[:1] + [out[1, :6]] + parts[2:], out)
    assert not out.any()   # refused before anything was written
    wide = torch.zeros(3, 14)
    ops.pack_rows(parts, wide[:, :10])   # rows of a wider buffer: no overlap, accepted
    ops.pack_rows(parts, out)
    torch.testing.assert_close(wide[:, :10], out, rtol=0, atol=0, equal_nan=True)   # the samples hold a NaN


@native
def test_kernel_checks_without_the_wrapper():
    """The C++ checks the wrapper leaves to the kernel, and the ones it repeats, with the same words."""
    op = torch.ops.fedtreelora.pack_rows
    parts, out = _args()
    with pytest.raises(ValueError, match=r"rows overlap"):
        op(parts, torch.zeros(10).expand(3, 10))
    with pytest.raises(ValueError, match=r"parts\[1\] \(key 0, client 1\) overlaps out"):
        op(parts[:1] + [out[1, :6]] + parts[2:], out)
    with pytest.raises(ValueError, match=r"not a multiple of N=3"):
        op(parts[:-1], out)
    with pytest.raises(ValueError, match=r"columns must be unit-stride"):
        op(parts, torch.zeros(10, 3).T)
    # another device: the CPU kernel called directly (the dispatcher would pick the other device's)
    meta = parts[:4] + [parts[4].to("meta")] + parts[5:]
    with pytest.raises(ValueError, match=r"parts\[4\] \(key 1, client 1\) is on meta but out is on cpu"):
        op.default.redispatch(torch._C.DispatchKeySet("CPU"), meta, out)


# ------------------------------------------------------------------------------ layer_rows and pack
def _states(n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = {f"base_model.model.encoder.layer.{l}.attn.{m}.lora_{f}.weight": ((2, 8) if f == "A" else (8, 2))
            for l in range(3) for m in ("q", "v") for f in ("A", "B")}
    return [{k: torch.randn(shape, generator=gen).to(dtype) for k, shape in keys.items()} for _ in range(n)]


def _old_layer_rows(states, keys, dtype):
    """layer_rows before pack_rows: a torch.stack per key, converted to dtype."""
    return torch.cat([torch.stack([s[k] for s in states]).reshape(len(states), -1).to(dtype) for k in keys], dim=1)


@pytest.mark.parametrize("variant", ["contiguous", "non_contiguous", "other_dtype", "reference"])
def test_layer_rows_and_pack_take_either_path_with_the_same_bits(variant, monkeypatch):
    states = _states(6, seed=2)
    if variant == "non_contiguous":  # one client's tensor a transposed copy: the torch path
        key = next(iter(states[3]))
        states[3][key] = states[3][key].T.contiguous().T
        assert not states[3][key].is_contiguous()
    if variant == "other_dtype":  # a bf16 key among float32 ones: promoted, the torch path
        for s in states:
            key = next(iter(s))
            s[key] = s[key].to(torch.bfloat16)
    if variant == "reference":
        monkeypatch.setattr(ops, "native_available", lambda: False)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    layout = adapters.parse_layout(states)
    keys = list(layout.keys)
    want = _old_layer_rows(states, keys, layout.dtype)
    assert _same_bits(layer_rows(states, keys, layout.dtype), want)
    buffer = torch.full((6, want.shape[1] + 3), 9.0, dtype=layout.dtype)
    rows = layer_rows(states, keys[2:5], layout.dtype, buffer)
    assert rows.data_ptr() == buffer.data_ptr() and _same_bits(rows, _old_layer_rows(states, keys[2:5], layout.dtype))
    x = adapters.pack(states, layout)
    assert _same_bits(x, want)
    for s, b in zip(states, before):
        assert all(_same_bits(s[k], b[k]) for k in s), "an input tensor was modified"


# --------------------------------------------------------------------------- autograd, meta, views
@pytest.mark.parametrize("path", ["native", "reference"])
def test_parts_that_require_grad_are_refused_unless_grad_is_off(path, monkeypatch):
    """Like torch's out= functions: a write into out cannot carry the parts' history, so say so."""
    if path == "native" and not ops.native_available():
        pytest.skip("the native core is not loaded")
    if path == "reference":
        monkeypatch.setattr(ops, "native_available", lambda: False)
    parts = [torch.ones(2), torch.ones(2, requires_grad=True)]
    out = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"parts\[1\] \(key 0, client 1\) requires grad.*torch.no_grad"):
        ops.pack_rows(parts, out)
    assert bool((out == 0).all())
    with torch.no_grad():
        ops.pack_rows(parts, out)
    assert bool((out == 1).all()) and not out.requires_grad


@native
def test_a_write_into_out_is_seen_by_autograd():
    """out's version is bumped: a backward through out's earlier value raises instead of returning a
    wrong gradient (it returned 2 where the true gradient is 0 before); a leaf that requires grad and an
    inference tensor outside inference mode are refused as out, as torch's in-place ops refuse them."""
    a = torch.zeros(2, 2, requires_grad=True)
    y = a * 1.0
    loss = (y * y).sum()
    version = y._version
    ops.pack_rows([torch.ones(2), torch.ones(2)], y)
    assert y._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.pack_rows([torch.ones(2), torch.ones(2)], torch.zeros(2, 2, requires_grad=True))
    with torch.inference_mode():
        frozen = torch.zeros(1, 2)
        ops.pack_rows([torch.ones(2)], frozen)  # inside inference mode: allowed
    with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):
        ops.pack_rows([torch.ones(2)], frozen)


def test_meta_parts_or_out_are_refused_not_skipped():
    """A meta tensor sends the call to the fake kernel, which checks the layout like the kernels do
    (it used to return without writing out or saying anything)."""
    out = torch.full((1, 2), 7.0)
    with pytest.raises(ValueError, match=r"parts\[0\] \(key 0, client 0\) is on meta but out is on cpu"):
        ops.pack_rows([torch.ones(2, device="meta")], out)
    assert bool((out == 7).all())
    with pytest.raises(ValueError, match=r"parts\[0\] \(key 0, client 0\) is on cpu but out is on meta"):
        ops.pack_rows([torch.ones(2)], torch.zeros(1, 2, device="meta"))
    ops.pack_rows([torch.ones(2, device="meta")], torch.zeros(1, 2, device="meta"))  # all meta: shapes only


@pytest.mark.parametrize("view", ["conj", "neg"])
def test_conjugate_or_negative_views_as_out_are_refused(view):
    if view == "conj":
        parts, out = [torch.ones(2, dtype=torch.complex64)], torch.zeros(1, 2, dtype=torch.complex64).conj()
    else:
        parts, out = [torch.ones(2)], torch._neg_view(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="out must not be a conjugate or negative view"):
        ops.pack_rows(parts, out)


def test_aggregate_reads_parameters_as_values():
    """Clients passed as nn.Parameters (requires_grad): aggregate reads them through detach() views and
    returns the same experts as for plain tensors, with no autograd history; nothing is modified.
    Before, the gather raised torch's "out=... don't support automatic differentiation"."""
    import fedtreelora as ftl

    plain = _states(5, seed=4)
    params = [{k: torch.nn.Parameter(v.clone()) for k, v in s.items()} for s in plain]
    want = ftl.aggregate(plain)
    got = ftl.aggregate(params)
    for i in range(5):
        for k, v in want.cluster_states[i].items():
            assert torch.equal(got.cluster_states[i][k], v) and not got.cluster_states[i][k].requires_grad
    assert all(torch.equal(p[k].detach(), s[k]) and p[k].requires_grad for p, s in zip(params, plain) for k in s)
