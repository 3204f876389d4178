"""Every op on CUDA tensors against the same op on CPU tensors (fedtreelora.ops), on random inputs.

The CPU ops are checked against scipy/sklearn/float64 references in tests/; here the CPU op is the
reference for the CUDA one. Inputs are drawn on the CPU and copied, so both sides see the same values.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fedtreelora.ops as ops

OPS = ("layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows")
HALF_DTYPES = (torch.float16, torch.bfloat16)
FUZZ = settings(max_examples=25, deadline=None)


def _offsets(widths) -> torch.Tensor:
    return torch.tensor([0] + list(widths), dtype=torch.int64).cumsum(0)


def _rows(n: int, widths, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sum(widths), generator=gen).to(dtype)
    return x, _offsets(widths)


def _labels(n_layers: int, n: int, n_clusters: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_clusters, (n_layers, n), generator=gen)


def _assert_on(device: torch.device, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device == device, f"output on {t.device}, input on {device}"


@pytest.mark.skipif(not ops.native_available(), reason="the native core is not loaded (reference ops only)")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fedtreelora::{op}", "CUDA")


# ---------------------------------------------------------------------------------------- distances
def _check_distances(x: torch.Tensor, offsets: torch.Tensor, metric: str, device: torch.device, rtol: float) -> None:
    x_dev, off_dev = x.to(device), offsets.to(device)
    before = x_dev.clone()
    per_layer, mean = ops.layer_distances(x_dev, off_dev, metric)
    _assert_on(device, per_layer, mean)
    assert per_layer.dtype == mean.dtype == torch.float32
    assert torch.equal(x_dev, before), "layer_distances modified its input"
    # The properties the op promises hold exactly on the device too.
    assert torch.equal(per_layer, per_layer.transpose(1, 2)) and torch.equal(mean, mean.T)
    assert not bool(torch.diagonal(per_layer, dim1=1, dim2=2).any()) and not bool(torch.diagonal(mean).any())
    assert bool((per_layer >= 0).all())
    ref_layers, ref_mean = ops.layer_distances(x, offsets, metric)
    # Gram-based distances in float32 on both sides: errors scale with the largest distance.
    scale = max(float(ref_layers.abs().max()), 1.0)
    torch.testing.assert_close(per_layer.cpu(), ref_layers, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(mean.cpu(), ref_mean, rtol=rtol, atol=rtol * scale)


@FUZZ
@given(n=st.integers(1, 40), widths=st.lists(st.integers(1, 70), min_size=1, max_size=5),
       metric=st.sampled_from(ops.METRICS), dtype=st.sampled_from((torch.float32,) + HALF_DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_layer_distances_matches_cpu(cuda, n, widths, metric, dtype, seed):
    x, offsets = _rows(n, widths, dtype, seed)
    # Half inputs are converted exactly to float32 on both sides, so they get float32's tolerance:
    # only the GEMMs' accumulation order differs.
    _check_distances(x, offsets, metric, cuda, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3, 257])
@pytest.mark.parametrize("metric", ops.METRICS)
def test_layer_distances_edge_sizes_and_duplicates(cuda, n, metric):
    x, offsets = _rows(n, [3, 130, 1], seed=n)
    x[n // 2] = x[0]  # a duplicate client: distance 0 up to rounding
    x += 100.0  # a large common offset, clients that differ by little
    _check_distances(x, offsets, metric, cuda, rtol=1e-3)


def test_layer_distances_non_contiguous(cuda):
    x, offsets = _rows(9, [5, 17])
    wide = torch.zeros(9, 2 * x.shape[1], device=cuda)
    wide[:, ::2] = x.to(cuda)
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    per_layer, mean = ops.layer_distances(strided, offsets.to(cuda))
    ref_layers, ref_mean = ops.layer_distances(x, offsets)
    torch.testing.assert_close(per_layer.cpu(), ref_layers, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.cpu(), ref_mean, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ linkage and cut_tree
def _distance_matrix(n: int, seed: int) -> torch.Tensor:
    x, _ = _rows(n, [6], torch.float64, seed)
    d = torch.cdist(x, x)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    return d


@pytest.mark.parametrize("method", ops.LINKAGE_METHODS)
@pytest.mark.parametrize("n", [1, 2, 3, 30])
def test_linkage_and_cut_tree_match_cpu(cuda, method, n):
    d = _distance_matrix(n, seed=n)
    z = ops.linkage(d.to(cuda), method)
    _assert_on(cuda, z)
    assert torch.equal(z.cpu(), ops.linkage(d, method))  # the same host kernel runs: identical bits
    counts = torch.arange(1, n + 1, dtype=torch.int64)
    labels = ops.cut_tree(z, counts.to(cuda))
    _assert_on(cuda, labels)
    assert torch.equal(labels.cpu(), ops.cut_tree(z.cpu(), counts))


def test_linkage_on_cuda_leaves_input_alone(cuda):
    d = _distance_matrix(12, seed=3).to(cuda)
    before = d.clone()
    ops.linkage(d, "ward")
    assert torch.equal(d, before)


# ------------------------------------------------------------------------------------------ silhouette
@FUZZ
@given(n=st.integers(1, 30), n_layers=st.integers(1, 3), n_partitions=st.integers(1, 4),
       max_clusters=st.integers(1, 6), dtype=st.sampled_from((torch.float32, torch.float64)),
       seed=st.integers(0, 2**31 - 1))
def test_silhouette_matches_cpu(cuda, n, n_layers, n_partitions, max_clusters, dtype, seed):
    x, offsets = _rows(n, [4] * n_layers, seed=seed)
    d, _ = ops.layer_distances(x, offsets)
    labels = torch.stack([_labels(n_partitions, n, min(max_clusters, n), seed + l) for l in range(n_layers)])
    d = d.to(dtype)
    out = ops.silhouette(d.to(cuda), labels.to(cuda))
    _assert_on(cuda, out)
    assert out.dtype == torch.float32 and out.shape == (n_layers, n_partitions)
    # NaN where sklearn refuses (one cluster, or every client alone) must match too.
    torch.testing.assert_close(out.cpu(), ops.silhouette(d, labels), rtol=1e-5, atol=1e-5, equal_nan=True)


# ----------------------------------------------------------------------------------------- tree_reduce
# (rtol, atol): float64 accumulation on both sides (only the order differs), then one rounding to the
# output dtype on each side: one ulp of that dtype apart at most.
_REDUCE_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.float16: (2 ** -10, 2 ** -10),
               torch.bfloat16: (2 ** -7, 2 ** -7)}


def _check_tree_reduce(x, offsets, labels, weights, device, x_dev=None):
    """The CUDA op against the CPU op; x_dev: x's values on the device in a layout of the test's own
    (a view with row strides or a misaligned start), else x copied."""
    n_clusters = int(labels.max()) + 1
    args = [x.to(device) if x_dev is None else x_dev] + [t.to(device) for t in (offsets, labels, weights)]
    before = [t.clone() for t in args]
    cluster, external = ops.tree_reduce(*args, n_clusters=n_clusters)
    _assert_on(device, cluster, external)
    assert cluster.dtype == external.dtype == x.dtype
    assert all(torch.equal(a, b) for a, b in zip(args, before)), "tree_reduce modified an input"
    ref_cluster, ref_external = ops.tree_reduce(x, offsets, labels, weights, n_clusters=n_clusters)
    # Compare only what the op specifies: rows of labels present in the layer (absent ones: unspecified).
    rtol, atol = _REDUCE_TOL[x.dtype]
    bounds = offsets.tolist()
    for layer in range(labels.shape[0]):
        present = labels[layer].unique()
        cols = slice(bounds[layer], bounds[layer + 1])
        for got, want in ((cluster, ref_cluster), (external, ref_external)):
            torch.testing.assert_close(got.cpu()[present, cols], want[present, cols], rtol=rtol, atol=atol,
                                       msg=lambda m: f"layer {layer}: {m}")
        everyone = present[(labels[layer] == present[:, None]).all(1)]
        assert not bool(external.cpu()[everyone, cols].any()), "a cluster of every client has a non-zero external mean"
    return cluster, external


@FUZZ
@given(n=st.integers(1, 40), widths=st.lists(st.integers(1, 300), min_size=1, max_size=5),
       max_clusters=st.integers(1, 8), dtype=st.sampled_from((torch.float32,) + HALF_DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_tree_reduce_matches_cpu(cuda, n, widths, max_clusters, dtype, seed):
    x, offsets = _rows(n, widths, dtype, seed)
    labels = _labels(len(widths), n, min(max_clusters, n), seed)
    # Sample counts within a factor 10: external means come from (total - cluster) sums, whose
    # rounding grows with the spread of the weights.
    weights = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 9 + 1
    _check_tree_reduce(x, offsets, labels, weights, cuda)


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_DTYPES)
def test_tree_reduce_large_and_strided(cuda, dtype):
    # Wide layers (several blocks per layer on the device) and a non-contiguous view of x.
    x, offsets = _rows(64, [4096, 1, 20000, 333], dtype, seed=7)
    labels = torch.stack([torch.zeros(64, dtype=torch.int64), _labels(1, 64, 3, 1)[0],
                          torch.arange(64) % 5, _labels(1, 64, 64, 2)[0]])
    weights = torch.arange(1, 65, dtype=torch.float64)
    _check_tree_reduce(x, offsets, labels, weights, cuda)
    strided = x.to(cuda).T.contiguous().T
    assert not strided.is_contiguous()
    got, _ = ops.tree_reduce(strided, offsets.to(cuda), labels.to(cuda), weights.to(cuda))
    want, _ = ops.tree_reduce(x, offsets, labels, weights)
    torch.testing.assert_close(got.cpu()[0, :4096], want[0, :4096], rtol=_REDUCE_TOL[dtype][0], atol=_REDUCE_TOL[dtype][1])


# ------------------------------------------------------------------------------------------- pack_rows
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64) + HALF_DTYPES)
@pytest.mark.parametrize("n", [1, 3, 200])
def test_pack_rows_matches_cpu(cuda, n, dtype):
    """Every client's keys into its row of a row-strided out on the device: the CPU op's bits; the
    parts untouched, and nothing written outside out."""
    gen = torch.Generator().manual_seed(n)
    shapes = [(4, 64), (64, 4), (), (0,), (7,)]
    parts = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes for _ in range(n)]
    width = sum(math.prod(shape) for shape in shapes)
    want = torch.zeros(n, width, dtype=dtype)
    ops.pack_rows(parts, want)
    dev_parts = [p.to(cuda) for p in parts]
    buffer = torch.full((n, width + 3), 7.0, dtype=dtype, device=cuda)
    ops.pack_rows(dev_parts, buffer[:, :width])
    assert torch.equal(buffer[:, :width].cpu(), want) and bool((buffer[:, width:] == 7).all())
    assert all(torch.equal(d.cpu(), p) for d, p in zip(dev_parts, parts))


def test_pack_rows_refuses_a_part_on_another_device(cuda):
    parts = [torch.ones(3, device=cuda), torch.ones(3)]
    with pytest.raises(ValueError, match=r"parts\[1\] \(key 0, client 1\) is on cpu but out is on cuda"):
        ops.pack_rows(parts, torch.zeros(2, 3, device=cuda))
    with pytest.raises(ValueError, match=r"parts\[0\] \(key 0, client 0\) is on cuda:\d but out is on cpu"):
        ops.pack_rows(parts, torch.zeros(2, 3))


# ----------------------------------------------------------------------------------- devices and errors
def test_mixed_devices_are_refused(cuda):
    x, offsets = _rows(5, [3, 4])
    labels, weights = _labels(2, 5, 2), torch.ones(5)
    d = _distance_matrix(5, seed=0)
    z = ops.linkage(d)
    with pytest.raises(ValueError, match="one device"):
        ops.layer_distances(x.to(cuda), offsets)
    with pytest.raises(ValueError, match="one device"):
        ops.tree_reduce(x.to(cuda), offsets.to(cuda), labels, weights.to(cuda))
    with pytest.raises(ValueError, match="one device"):
        ops.tree_reduce(x.to(cuda), offsets.to(cuda), labels.to(cuda), weights)
    with pytest.raises(ValueError, match="one device"):
        ops.silhouette(d.to(cuda).unsqueeze(0), torch.zeros(1, 1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="one device"):
        ops.cut_tree(z.to(cuda), torch.tensor([1, 2]))


@pytest.mark.skipif(not ops.native_available(), reason="the native core is not loaded (reference ops only)")
def test_native_cut_tree_refuses_mixed_devices_without_the_wrapper(cuda):
    z = ops.linkage(_distance_matrix(4, seed=1))
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fedtreelora.cut_tree(z.to(cuda), torch.tensor([1, 2]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_outputs_stay_on_a_second_device():
    second = torch.device("cuda", 1)
    x, offsets = _rows(6, [5, 7])
    labels, weights = _labels(2, 6, 3), torch.ones(6)
    with torch.cuda.device(0):  # the current device is not the inputs' device
        per_layer, mean = ops.layer_distances(x.to(second), offsets.to(second))
        z = ops.linkage(mean.to(second).double())
        cut = ops.cut_tree(z, torch.tensor([1, 3], device=second))
        score = ops.silhouette(per_layer, cut.unsqueeze(0).expand(2, -1, -1).contiguous())
        cluster, external = ops.tree_reduce(x.to(second), offsets.to(second), labels.to(second), weights.to(second))
    _assert_on(second, per_layer, mean, z, cut, score, cluster, external)
    torch.testing.assert_close(cluster.cpu(), ops.tree_reduce(x, offsets, labels, weights)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- shared samples, opcheck, streams
from op_samples import OPS as SAMPLE_OPS, sample_inputs  # noqa: E402


def _compare_outputs(got, want, dtype):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        g = g.cpu()
        if not g.is_floating_point():
            assert torch.equal(g, w)
            continue
        # one ulp of the output dtype (float64 accumulation on both sides; only the order differs)
        tol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}.get(g.dtype, 1e-5)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("op", SAMPLE_OPS)
def test_every_sample_matches_cpu_and_passes_opcheck(cuda, op):
    kernel = getattr(torch.ops.fedtreelora, op)
    for dev_args, cpu_args in zip(sample_inputs(op, cuda), sample_inputs(op, "cpu")):
        got, want = kernel(*dev_args), kernel(*cpu_args)
        if op == "pack_rows":  # writes its out argument: the same bits on both sides
            assert torch.equal(dev_args[1].cpu(), cpu_args[1])
        elif op == "tree_reduce":  # rows of labels absent from a layer are unspecified: compare the present ones
            x, off, labels = cpu_args[:3]
            bounds = off.tolist()
            for l in range(labels.shape[0]):
                present = labels[l].unique()
                for g, w in zip(got, want):
                    _compare_outputs(g.cpu()[present, bounds[l]:bounds[l + 1]], w[present, bounds[l]:bounds[l + 1]], x.dtype)
        else:
            _compare_outputs(got, want, None)
        if not (op == "silhouette" and bool(want.isnan().any())):
            torch.library.opcheck(kernel, dev_args)


def test_non_default_stream(cuda):
    """Kernels launch on the current stream: work queued on a side stream sees its inputs, in order."""
    stream = torch.cuda.Stream()
    x, offsets = _rows(50, [64, 30], seed=5)
    labels = _labels(2, 50, 4, seed=5)
    weights = torch.rand(50, dtype=torch.float64) + 1
    with torch.cuda.stream(stream):
        xd = x.to(cuda, non_blocking=True).mul_(2)  # queued on the side stream, before the ops
        per_layer, _ = ops.layer_distances(xd, offsets.to(cuda))
        scores = ops.silhouette(per_layer, labels[:, None].repeat(1, 2, 1).to(cuda))
        cluster, _ = ops.tree_reduce(xd, offsets.to(cuda), labels.to(cuda), weights.to(cuda))
    stream.synchronize()
    ref_layers, _ = ops.layer_distances(2 * x, offsets)
    torch.testing.assert_close(per_layer.cpu(), ref_layers, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores.cpu(), ops.silhouette(ref_layers, labels[:, None].repeat(1, 2, 1)), rtol=1e-5,
                               atol=1e-5, equal_nan=True)
    torch.testing.assert_close(cluster.cpu(), ops.tree_reduce(2 * x, offsets, labels, weights)[0], rtol=1e-5, atol=1e-5)


def test_tf32_on_does_not_change_distances(cuda):
    """The Gram runs in full float32 even with TF32 on (HF Trainer's tf32=True), and the caller's
    setting is restored afterwards."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2048, generator=gen)
    x = base + 1e-3 * torch.randn(40, 2048, generator=gen)  # near-identical clients: the normal case
    offsets = torch.tensor([0, 1024, 2048])
    ref_layers, _ = ops.layer_distances(x.double(), offsets)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        per_layer, _ = ops.layer_distances(x.to(cuda), offsets.to(cuda))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32, precision = before
        torch.set_float32_matmul_precision(precision)
    off_diag = ~torch.eye(40, dtype=torch.bool)
    rel = (per_layer.cpu().double() - ref_layers.double()).abs()[:, off_diag] / ref_layers.double()[:, off_diag]
    assert float(rel.max()) < 1e-3  # TF32 would be off by ~1e-1 here


def test_float64_layer_distances_and_tree_reduce(cuda):
    x, offsets = _rows(30, [17, 200], torch.float64, seed=9)
    _check_distances(x, offsets, "frobenius", cuda, rtol=1e-6)
    _check_distances(x, offsets, "cosine", cuda, rtol=1e-6)
    _check_tree_reduce(x, offsets, _labels(2, 30, 4, seed=9), torch.rand(30, dtype=torch.float64) + 1, cuda)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_silhouette(cuda, dtype):
    x, offsets = _rows(40, [8, 8], seed=11)
    d, _ = ops.layer_distances(x, offsets)
    d = d.to(dtype)
    labels = torch.stack([_labels(3, 40, 5, seed=11 + l) for l in range(2)])
    torch.testing.assert_close(ops.silhouette(d.to(cuda), labels.to(cuda)).cpu(), ops.silhouette(d, labels),
                               rtol=1e-5, atol=1e-5, equal_nan=True)


def test_tree_reduce_workspace_path_and_row_strided_x(cuda):
    """C = 250 clusters: [C, 256] float64 accumulators (500 KiB) exceed any GPU's shared memory, so
    they live in the global workspace; x a row-strided view (its columns unit-stride, rows a slice of a
    wider tensor), read without a copy."""
    n = 400
    wide, _ = _rows(n, [300, 212], seed=12)
    x = wide[:, :400]
    offsets = torch.tensor([0, 300, 400])
    assert x.stride() == (512, 1)
    labels = torch.stack([torch.arange(n) % 250, torch.arange(n) % 7])
    _check_tree_reduce(x, offsets, labels, torch.rand(n, dtype=torch.float64) + 1, cuda,
                       x_dev=wide.to(cuda)[:, :400])


def _tree_reduce_layout(layout: str, n: int, dtype, seed: int, device):
    """(x on the CPU, the same values on the device in the given layout, offsets)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 129, generator=gen).to(dtype)
    dev = base.to(device)
    if layout == "aligned":  # 16-byte aligned rows: vector loads and stores throughout
        widths, view = [37, 2, 65], lambda t: t[:, :104].contiguous()
    elif layout == "misaligned":  # starts 1 element into the storage, odd row stride: scalar loads
        widths, view = [37, 2, 65], lambda t: t[:, 1:105]
    else:  # aligned row stride (128 elements) but P = 103: the row's last vector is loaded by scalars
        base, dev = base[:, :128].contiguous(), dev[:, :128].contiguous()
        widths, view = [37, 1, 65], lambda t: t[:, :103]
    x_dev = view(dev)
    assert x_dev.stride(1) == 1 and (x_dev.storage_offset() == 1) == (layout == "misaligned")
    return view(base).contiguous(), x_dev, _offsets(widths)


@pytest.mark.parametrize("n_clusters", [1, 5, 40, 150])
@pytest.mark.parametrize("layout", ["aligned", "misaligned", "row_strided_tail"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64) + HALF_DTYPES)
def test_tree_reduce_load_and_accumulator_paths(cuda, dtype, layout, n_clusters):
    """Every kernel variant: vector or scalar loads (alignment of x's rows, the row's tail), and the
    [C, V, 256] float64 accumulators in shared memory (C = 1, 5 and 40: above 48 KiB with the opt-in;
    V = 1 where V columns per thread do not fit or leave fewer bytes in flight) or in the global
    workspace (C = 150)."""
    n = 2 * n_clusters + 3
    x, x_dev, offsets = _tree_reduce_layout(layout, n, dtype, seed=n_clusters, device=cuda)
    gen = torch.Generator().manual_seed(n_clusters)
    labels = torch.stack([torch.arange(n) % n_clusters, torch.randint(0, n_clusters, (n,), generator=gen),
                          torch.randperm(n, generator=gen) % n_clusters])
    weights = torch.rand(n, generator=gen, dtype=torch.float64) * 9 + 1
    _check_tree_reduce(x, offsets, labels, weights, cuda, x_dev=x_dev)


@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
def test_tree_reduce_forced_workspace_is_bit_identical(cuda, monkeypatch, layout):
    """With the shared-memory budget capped (FEDTREELORA_CUDA_SHARED_BYTES), small C takes the
    workspace path; the sums run in the same order either way, so the outputs are the same bits."""
    x, x_dev, offsets = _tree_reduce_layout(layout, 50, torch.float32, seed=3, device=cuda)
    labels = _labels(3, 50, 6, seed=3)
    weights = torch.rand(50, dtype=torch.float64) + 1
    args = (offsets.to(cuda), labels.to(cuda), weights.to(cuda))
    in_shared = ops.tree_reduce(x_dev, *args, n_clusters=int(labels.max()) + 1)
    monkeypatch.setenv("FEDTREELORA_CUDA_SHARED_BYTES", "4096")  # < 6 clusters x 256 threads x 8 bytes
    in_workspace = _check_tree_reduce(x, offsets, labels, weights, cuda, x_dev=x_dev)
    for a, b in zip(in_shared, in_workspace):
        assert torch.equal(a, b)


def test_tree_reduce_and_silhouette_are_deterministic(cuda):
    x, offsets = _rows(300, [1000, 77], seed=21)
    labels = _labels(2, 300, 9, seed=21)
    weights = torch.rand(300, dtype=torch.float64) + 1
    args = [t.to(cuda) for t in (x, offsets, labels, weights)]
    first, second = ops.tree_reduce(*args), ops.tree_reduce(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    d, _ = ops.layer_distances(args[0], args[1])
    part = torch.stack([_labels(4, 300, 12, seed=22 + l) for l in range(2)]).to(cuda)
    assert torch.equal(ops.silhouette(d, part), ops.silhouette(d, part))


# ------------------------------------------------------------------------------- silhouette's paths
def _planar_distances(n: int, n_layers: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        pts = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        d = torch.cdist(pts, pts)
        out.append(((d + d.T) / 2).fill_diagonal_(0))
    return torch.stack(out).to(dtype)


def test_silhouette_many_classes_opt_in_shared_memory(cuda):
    """About 6,400 refinement classes: their float64 sums (> 48 KiB) need the shared-memory opt-in.
    Label values spread over [0, N) (the kernel renumbers them), one partition of few large clusters
    whose classes cross many threads' slices."""
    n = 6500
    d = _planar_distances(n, 1, seed=13)
    gen = torch.Generator().manual_seed(13)
    labels = torch.stack([torch.arange(n) % 6400, torch.randint(0, 4, (n,), generator=gen) * 1300,
                          torch.zeros(n, dtype=torch.int64)])[None]  # the last: one cluster, NaN
    got = ops.silhouette(d.to(cuda), labels.to(cuda)).cpu()
    torch.testing.assert_close(got, ops.silhouette(d, labels), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert bool(got[0, 2].isnan()) and not bool(got[0, :2].isnan().any())


def test_silhouette_large_clusters_cross_slices(cuda):
    """N = 3000 in 2-7 clusters: every class spans dozens of the 256 threads' slices."""
    n = 3000
    d = _planar_distances(n, 2, seed=14, dtype=torch.float64)
    gen = torch.Generator().manual_seed(14)
    labels = torch.stack([torch.randint(0, k, (2, n), generator=gen) for k in (2, 3, 7)], dim=1)
    torch.testing.assert_close(ops.silhouette(d.to(cuda), labels.to(cuda)).cpu(), ops.silhouette(d, labels),
                               rtol=1e-5, atol=1e-5)


def test_silhouette_forced_workspace_is_bit_identical(cuda, monkeypatch):
    """FEDTREELORA_CUDA_SHARED_BYTES caps the shared memory: the class sums go to the global
    workspace, with a grid smaller than the L * N rows (the blocks loop over rows). The sums run in
    the same order either way: the same bits."""
    n, n_layers = 300, 16
    d = _planar_distances(n, n_layers, seed=15)
    gen = torch.Generator().manual_seed(15)
    labels = torch.stack([torch.stack([torch.arange(n) % 290, torch.randint(0, 5, (n,), generator=gen)])
                          for _ in range(n_layers)])
    d_dev, labels_dev = d.to(cuda), labels.to(cuda)
    in_shared = ops.silhouette(d_dev, labels_dev)
    monkeypatch.setenv("FEDTREELORA_CUDA_SHARED_BYTES", "2048")  # < 290 class sums
    in_workspace = ops.silhouette(d_dev, labels_dev)
    assert torch.equal(in_shared, in_workspace)
    torch.testing.assert_close(in_workspace.cpu(), ops.silhouette(d, labels), rtol=1e-5, atol=1e-5)


def test_silhouette_nan_in_d(cuda):
    """The wrapper refuses a NaN with the CPU path's message; the kernel itself (no checks, as under
    torch.compile) scores NaN instead of dropping it."""
    d = _planar_distances(20, 2, seed=16)
    d[0, 3, 5] = float("nan")
    labels = torch.stack([_labels(2, 20, 3, seed=16 + l) for l in range(2)])
    message = r"NaN or Inf entry at layer 0, \[3, 5\]"
    with pytest.raises(ValueError, match=message):
        ops.silhouette(d, labels)
    with pytest.raises(ValueError, match=message):
        ops.silhouette(d.to(cuda), labels.to(cuda))
    raw = torch.ops.fedtreelora.silhouette(d.to(cuda), labels.to(cuda)).cpu()
    assert bool(raw[0].isnan().all()), raw
    clean = ops.silhouette(d[1:], labels[1:])
    torch.testing.assert_close(raw[1:], clean, rtol=1e-5, atol=1e-5)
