"""Typed wrappers of the native ops (torch.ops.fedtreelora.*), their input checks and fake kernels.

Every function checks its arguments and raises ValueError/TypeError naming the argument (and the
client or layer) at fault, then runs the native kernel for the tensors' device, or the reference
implementation when the native core is unavailable. Inputs are never modified. Under torch.compile
only the checks that need no data (shapes, dtypes, devices) run; the kernels still refuse bad values.
"""
from __future__ import annotations

import torch

from . import build, reference

__all__ = ["layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows", "native_available",
           "LINKAGE_METHODS", "METRICS"]

LINKAGE_METHODS = ("single", "complete", "average", "weighted", "ward")
METRICS = ("frobenius", "cosine")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)



def native_available() -> bool:
    """Whether the compiled kernels are in use; builds or loads them on the first call.

    Returns
    -------
    bool
        True when torch.ops.fedtreelora.* are loaded; False when every op runs through
        `fedtreelora.core.reference` (the build failed or FEDTREELORA_DISABLE_NATIVE=1).

    Examples
    --------
    >>> import fedtreelora as ftl
    >>> isinstance(ftl.ops.native_available(), bool)
    True
    """
    if build.load_native():
        _register_fakes()
        return True
    return False


def _impl(name: str):
    """The kernel behind op `name`: torch.ops.fedtreelora.<name>, or its reference implementation."""
    return getattr(torch.ops.fedtreelora, name) if native_available() else getattr(reference, name)


def _checking_values() -> bool:
    return not torch.compiler.is_compiling()


def _tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_rows(x: torch.Tensor, name: str = "x") -> None:
    _tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [clients, parameters], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has no clients (shape {tuple(x.shape)})")


def _check_offsets(layer_offsets: torch.Tensor, p: int) -> None:
    _tensor(layer_offsets, "layer_offsets")
    if layer_offsets.dim() != 1 or layer_offsets.numel() < 2:
        raise ValueError(f"layer_offsets must be 1-D with at least 2 entries (L+1), got shape {tuple(layer_offsets.shape)}")
    if layer_offsets.dtype != torch.int64:
        raise TypeError(f"layer_offsets must be int64, got {layer_offsets.dtype}")
    if not _checking_values():
        return
    off = layer_offsets.tolist()
    if off[0] != 0:
        raise ValueError(f"layer_offsets must start at 0, got {off[0]}")
    if off[-1] != p:
        raise ValueError(f"layer_offsets must end at the number of columns P={p}, got {off[-1]}")
    for l in range(len(off) - 1):
        if off[l + 1] <= off[l]:
            raise ValueError(f"layer_offsets must be strictly increasing: layer {l} spans [{off[l]}, {off[l + 1]})")


def nonfinite_entry(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(first row holding NaN/Inf, its first such column, how many rows hold any) of a 2-D x, or None."""
    bad = ~torch.isfinite(x)
    rows = bad.any(dim=1).nonzero().flatten()
    if rows.numel() == 0:
        return None
    k = int(rows[0])
    return k, int(bad[k].nonzero()[0]), int(rows.numel())


def _raise_nonfinite(x: torch.Tensor, layer_offsets: torch.Tensor | None, what: str) -> None:
    """Name the first client (and layer) holding NaN/Inf, or report an overflow in the computation."""
    found = nonfinite_entry(x)
    if found is None:
        raise ValueError(f"{what} overflowed: x is finite but its magnitudes are too large for the accumulation")
    k, col, rows = found
    where = f"column {col}"
    if layer_offsets is not None:
        layer = int(torch.searchsorted(layer_offsets.cpu(), torch.tensor([col]), right=True)[0]) - 1
        where = f"layer {layer}, column {col}"
    raise ValueError(f"x has NaN or Inf values in client {k} ({where}); {rows} client(s) affected")


# ----------------------------------------------------------------------------------------------
def layer_distances(x: torch.Tensor, layer_offsets: torch.Tensor, metric: str = "frobenius"):
    """Pairwise client distances per layer and their mean over layers.

    x: [N, P] float32/bfloat16/float16/float64; columns layer_offsets[l]:layer_offsets[l+1] are layer l.
    metric: "frobenius" (euclidean distance of the flattened slices) or "cosine" (1 - cosine
    similarity; a zero slice has similarity 0 with every other slice).
    Returns (per_layer [L, N, N] float32, mean [N, N] float32): exact zero diagonal, exactly
    symmetric, never negative.

    Accuracy: the slices are centred (frobenius) or scaled to unit rows (cosine) in float64, then the
    Gram matrix is a library GEMM: float64 for float64 x (distances within float32 rounding of the
    exact ones: 6e-8 relative on the iris data), float32 otherwise (full float32 on CUDA too: TF32 is
    switched off around it), with the epilogue sqrt(|a|^2 + |b|^2 - 2 a.b) in float64. The float32
    GEMM bounds the relative error of a distance d between centred rows a, b by about
    sqrt(w) * 2**-24 * (|a|^2 + |b|^2) / d**2 for a layer of width w: small for clients that differ
    as much as they vary, larger for near-duplicates among spread-out clients (2.4e-5 on iris in
    float32, where scipy computes a - b directly). Pass float64 x where that matters.

    Examples
    --------
    >>> import torch, fedtreelora as ftl
    >>> x = torch.tensor([[0.0, 0.0, 1.0], [3.0, 4.0, 1.0], [0.0, 0.0, 0.0]])
    >>> per_layer, mean = ftl.ops.layer_distances(x, torch.tensor([0, 2, 3]))
    >>> per_layer
    tensor([[[0., 5., 0.],
             [5., 0., 5.],
             [0., 5., 0.]],
    <BLANKLINE>
            [[0., 0., 1.],
             [0., 0., 1.],
             [1., 1., 0.]]])
    >>> mean
    tensor([[0.0000, 2.5000, 0.5000],
            [2.5000, 0.0000, 3.0000],
            [0.5000, 3.0000, 0.0000]])
    """
    _check_rows(x)
    _same_device(x=x, layer_offsets=_tensor(layer_offsets, "layer_offsets"))
    _check_offsets(layer_offsets, x.shape[1])
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    impl = _impl("layer_distances")
    per_layer, mean = impl(x, layer_offsets, metric)
    # A client with NaN/Inf makes its off-diagonal distances non-finite; a lone client has none.
    if _checking_values() and not (bool(torch.isfinite(mean).all()) and (x.shape[0] > 1 or bool(torch.isfinite(x).all()))):
        _raise_nonfinite(x, layer_offsets, "layer_distances")
    return per_layer, mean


def _check_square(d: torch.Tensor, name: str = "d") -> None:
    _tensor(d, name)
    if d.dim() != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"{name} must be a square [N, N] distance matrix, got shape {tuple(d.shape)}")


def _as_distances(d: torch.Tensor, name: str = "d") -> torch.Tensor:
    """d itself when floating point; an integer d converted (exactly, below 2**53) to float64."""
    if d.is_floating_point():
        return d
    if d.dtype == torch.bool or d.is_complex():
        raise TypeError(f"{name} must be a floating-point or integer tensor, got {d.dtype}")
    return d.to(torch.float64)


def _check_distance_values(d: torch.Tensor, diagonal_atol: float, exactly_symmetric: bool) -> None:
    """The distance-matrix contract, for the paths whose kernel does not check it in its own pass.

    d [..., N, N]: finite, >= 0, |diagonal| <= diagonal_atol, and, when `exactly_symmetric`, equal
    to its transpose (scipy's is_valid_dm with tol=0).
    """
    def where(idx) -> str:
        *layer, i, j = idx
        return (f"layer {layer[0]}, " if layer else "") + f"[{i}, {j}]"

    bad = ~torch.isfinite(d)
    if bool(bad.any()):
        raise ValueError(f"d has a NaN or Inf entry at {where(bad.nonzero()[0].tolist())}")
    bad = d < 0
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"d has a negative distance at {where(idx)}: {float(d[tuple(idx)])}")
    diag = torch.diagonal(d, dim1=-2, dim2=-1)
    bad = diag.abs() > diagonal_atol
    if bool(bad.any()):
        *layer, i = bad.nonzero()[0].tolist()
        raise ValueError(f"d must have a zero diagonal (|d[i, i]| <= {diagonal_atol:.3g}): "
                         + (f"layer {layer[0]}, " if layer else "") + f"d[{i}, {i}] = {float(diag[tuple(layer) + (i,)])}")
    if not exactly_symmetric:
        return
    dt = d.transpose(-1, -2)
    bad = d != dt
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        *layer, i, j = idx
        raise ValueError("d must be exactly symmetric: " + (f"layer {layer[0]}, " if layer else "")
                         + f"d[{i}, {j}] = {float(d[tuple(idx)])} but d[{j}, {i}] = {float(dt[tuple(idx)])}")


def linkage(d: torch.Tensor, method: str = "average") -> torch.Tensor:
    """Agglomerative clustering of a square distance matrix, in scipy's Z format.

    Parameters
    ----------
    d : torch.Tensor
        [N, N] distances, floating point or integer (converted to float64, so integers are exact
        below 2**53). The contract is scipy's for a square distance matrix (`squareform` with its
        default checks, `is_valid_dm` with tol=0) plus non-negativity: finite, >= 0, an exactly zero
        diagonal and exactly symmetric. Anything else is a ValueError naming the entry; bool and
        complex tensors are a TypeError.
    method : str
        single, complete, average, weighted or ward.

    Returns
    -------
    torch.Tensor
        Z [N-1, 4] float64 on d's device, identical to
        scipy.cluster.hierarchy.linkage(squareform(d), method) for inputs without ties (an empty
        [0, 4] for N = 1). On a CUDA tensor the clustering runs on the host.

    Examples
    --------
    >>> import torch, fedtreelora as ftl
    >>> d = torch.tensor([[0, 1, 4], [1, 0, 5], [4, 5, 0]])    # integers: converted to float64
    >>> ftl.ops.linkage(d, "single")
    tensor([[0., 1., 1., 2.],
            [2., 3., 4., 3.]], dtype=torch.float64)
    >>> ftl.ops.linkage(torch.tensor([[0.0, 1.0], [1.5, 0.0]]))
    Traceback (most recent call last):
    ...
    ValueError: ...d must be exactly symmetric...
    """
    _check_square(d)
    if method not in LINKAGE_METHODS:
        raise ValueError(f"method must be one of {LINKAGE_METHODS}, got {method!r}")
    d64 = _as_distances(d).to(torch.float64)
    # The native kernel makes these checks itself in one pass while it copies d; the reference cannot.
    if _checking_values() and not native_available():
        _check_distance_values(d64, diagonal_atol=0.0, exactly_symmetric=True)
    impl = _impl("linkage")
    return impl(d64, method)


def _check_linkage_matrix(z: torch.Tensor) -> None:
    _tensor(z, "z")
    if z.dim() != 2 or z.shape[1] != 4:
        raise ValueError(f"z must be a linkage matrix [N-1, 4], got shape {tuple(z.shape)}")
    if z.dtype != torch.float64:  # scipy's is_valid_linkage: "Linkage matrix 'Z' must contain doubles."
        raise TypeError(f"z must be a float64 linkage matrix (as scipy's is_valid_linkage requires), got {z.dtype}")
    if not _checking_values() or z.shape[0] == 0:
        return
    n = z.shape[0] + 1
    ids = z[:, :2].to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z has NaN or Inf entries")
    if bool((ids != ids.round()).any()) or bool((ids < 0).any()):
        raise ValueError("z[:, :2] must hold non-negative integer cluster ids")
    step = torch.arange(z.shape[0], device=z.device, dtype=torch.float64)
    if bool((ids >= n + step[:, None]).any()):
        i = int((ids >= n + step[:, None]).any(1).nonzero()[0])
        raise ValueError(f"z row {i} refers to a cluster not formed before it (ids must be < {n + i})")


def cut_tree(z: torch.Tensor, n_clusters) -> torch.Tensor:
    """Labels of the partitions of the tree z into exactly n_clusters[m] clusters.

    Parameters
    ----------
    z : torch.Tensor
        float64 [N-1, 4] linkage matrix, validated as scipy's is_valid_linkage does: float64 (any
        other dtype is a TypeError, as scipy's "must contain doubles"), shape [N-1, 4], ids that are
        integers naming a leaf or a cluster formed in an earlier row, each cluster merged at most
        once, finite non-negative heights, and counts equal to the leaves under each row (ValueError
        naming the row otherwise). Heights need not be monotone: like scipy's cut_tree, merges are
        applied in order of height (scipy's is_valid_linkage does not ask for monotone heights
        either; is_monotonic is a separate check).
    n_clusters : torch.Tensor, list or int
        int64 [M] with values in [1, N].

    Returns
    -------
    torch.Tensor
        int64 [M, N], equal to scipy.cluster.hierarchy.cut_tree(z, n_clusters=n_clusters).T (merges
        applied in Z's order, labels numbered by first appearance as scipy does).

    Examples
    --------
    >>> import torch, fedtreelora as ftl
    >>> z = torch.tensor([[0, 1, 1.0, 2], [2, 3, 4.0, 3]], dtype=torch.float64)
    >>> ftl.ops.cut_tree(z, [1, 2, 3])
    tensor([[0, 0, 0],
            [0, 0, 1],
            [0, 1, 2]])
    >>> ftl.ops.cut_tree(z.to(torch.int64), [2])
    Traceback (most recent call last):
    ...
    TypeError: z must be a float64 linkage matrix (as scipy's is_valid_linkage requires), got torch.int64
    """
    _check_linkage_matrix(z)
    if not isinstance(n_clusters, torch.Tensor):
        n_clusters = torch.as_tensor(n_clusters, dtype=torch.int64, device=z.device).reshape(-1)
    if n_clusters.dim() != 1:
        raise ValueError(f"n_clusters must be 1-D [M], got shape {tuple(n_clusters.shape)}")
    if n_clusters.dtype != torch.int64:
        raise TypeError(f"n_clusters must be int64, got {n_clusters.dtype}")
    _same_device(z=z, n_clusters=n_clusters)
    n = z.shape[0] + 1
    if _checking_values() and n_clusters.numel() and (bool((n_clusters < 1).any()) or bool((n_clusters > n).any())):
        bad = [c for c in n_clusters.tolist() if not 1 <= c <= n]
        raise ValueError(f"n_clusters must lie in [1, {n}] for a tree over {n} clients, got {bad}")
    impl = _impl("cut_tree")
    return impl(z, n_clusters)


def _check_labels(labels: torch.Tensor, n: int, name: str = "labels", values: bool = True) -> None:
    """dtype and shape; and, with `values` (for kernels that do not check them), every label in [0, N)."""
    _tensor(labels, name)
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {labels.dtype}")
    if labels.shape[-1] != n:
        raise ValueError(f"{name} must have one entry per client (last dimension {n}), got shape {tuple(labels.shape)}")
    if not (values and _checking_values() and labels.numel()):
        return
    lo, hi = torch.aminmax(labels)  # one pass (two compares and two any() cost 8x more at [24, 3, 1000])
    if bool(lo < 0) or bool(hi >= n):
        bad = labels[(labels < 0) | (labels >= n)][0]
        raise ValueError(f"{name} must lie in [0, N) with N={n} clients, found {int(bad)}")


def silhouette(d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean silhouette of many partitions under many distance matrices, batched.

    Parameters
    ----------
    d : torch.Tensor
        [L, N, N] (or [N, N]) precomputed distances, floating point or integer (converted to float64).
        Each d[l] must be what sklearn's silhouette_score(metric="precomputed") accepts: finite; no
        negative entry; a diagonal within 100 machine epsilons of its dtype of 0 (sklearn's tolerance;
        an integer diagonal must be 0). Anything else is a ValueError naming the layer and entry.
        Like sklearn, client i's distances are read from row d[l, i, :] and symmetry is not required
        (an asymmetric d gets sklearn's score for it; checking symmetry would cost a second,
        transposed read of d).
    labels : torch.Tensor
        int64 [L, M, N] (or [M, N]) in [0, N): M partitions of the N clients per layer.

    Returns
    -------
    torch.Tensor
        float32 [L, M] (or [M]): entry (l, m) equals
        sklearn.metrics.silhouette_score(d[l], labels[l, m], metric="precomputed") to 1e-5 (the row
        sums of d are accumulated in float64; on the CPU, float32 d whose partitions refine to at
        most 6 classes is first summed in float32 lanes of at most 16 entries, which bounds the error
        of a score by 2e-6), a singleton scoring 0; NaN where sklearn raises instead (fewer than 2
        or more than N-1 distinct labels).

    Examples
    --------
    >>> import torch, fedtreelora as ftl
    >>> d = torch.tensor([[0, 1, 4, 5], [1, 0, 4, 5], [4, 4, 0, 2], [5, 5, 2, 0]])
    >>> ftl.ops.silhouette(d, torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]))
    tensor([0.6639,    nan])
    >>> ftl.ops.silhouette(d - 1, torch.tensor([[0, 0, 1, 1]]))
    Traceback (most recent call last):
    ...
    ValueError: ...d has a negative distance at layer 0, [0, 0]: -1...
    """
    _tensor(d, "d")
    _tensor(labels, "labels")
    squeeze = d.dim() == 2
    if squeeze:
        d, labels = d.unsqueeze(0), labels.unsqueeze(0)
    if d.dim() != 3 or d.shape[1] != d.shape[2]:
        raise ValueError(f"d must be [L, N, N] (or [N, N]), got shape {tuple(d.shape)}")
    d = _as_distances(d)
    if labels.dim() != 3 or labels.shape[0] != d.shape[0]:
        raise ValueError(f"labels must be [L, M, N] with L={d.shape[0]} (or [M, N] with a 2-D d), got shape {tuple(labels.shape)}")
    _same_device(d=d, labels=labels)
    # The CPU kernel checks d in its single pass over it, and the labels' range as it renumbers them
    # (naming the first bad one by [layer, partition, client]).
    kernel_checks_values = native_available() and d.device.type == "cpu"
    _check_labels(labels, d.shape[1], values=not kernel_checks_values)
    if _checking_values() and not kernel_checks_values:
        _check_distance_values(d, diagonal_atol=100 * torch.finfo(d.dtype).eps, exactly_symmetric=False)
    impl = _impl("silhouette")
    out = impl(d, labels)
    return out[0] if squeeze else out


def tree_reduce(x: torch.Tensor, layer_offsets: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                n_clusters: int | None = None):
    """Weighted cluster and external means of client rows, with a partition per layer, in one read of x.

    x: [N, P]; layer_offsets: int64 [L+1]; labels: int64 [L, N], the cluster of each client in each
    layer; weights: [N] finite and > 0 (sample counts, say); n_clusters: C, default 1 + max label
    (pass it to avoid a device sync and under torch.compile).
    Returns (cluster_mean [C, P], external_mean [C, P]) in x's dtype, accumulated in float64 (the CPU
    and CUDA kernels alike): in the columns of layer l, row c is the weighted mean over the clients with
    labels[l] == c, and the weighted mean over all the others; an external row whose cluster holds
    every client is 0, and so are the rows of a label absent from layer l.

    NaN or Inf in x (or a float64 overflow) raises a ValueError naming the first client and layer
    that holds one. Under torch.compile the wrapper's checks are skipped (they need host syncs): the
    CPU kernel still refuses non-finite sums, with a message that names no client, while on CUDA
    NaN and Inf pass through into the outputs.
    """
    _check_rows(x)
    n, p = x.shape
    _same_device(x=x, layer_offsets=_tensor(layer_offsets, "layer_offsets"), labels=_tensor(labels, "labels"),
                 weights=_tensor(weights, "weights"))
    _check_offsets(layer_offsets, p)
    n_layers = layer_offsets.numel() - 1
    _tensor(labels, "labels")
    if labels.dim() != 2 or labels.shape[0] != n_layers:
        raise ValueError(f"labels must be [L, N] = [{n_layers}, {n}], got shape {tuple(labels.shape)}")
    _check_labels(labels, n)
    _tensor(weights, "weights")
    if weights.dim() != 1 or weights.shape[0] != n:
        raise ValueError(f"weights must be [N] = [{n}], got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if _checking_values():
        bad = ~torch.isfinite(weights) | (weights <= 0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise ValueError(f"weights must be finite and > 0, client {k} has weight {float(weights[k])}")
    if n_clusters is None:
        n_clusters = int(labels.max()) + 1
    elif _checking_values() and int(labels.max()) >= n_clusters:
        raise ValueError(f"labels hold cluster {int(labels.max())} but n_clusters={n_clusters}")
    impl = _impl("tree_reduce")
    kernel_checks_values = native_available() and x.device.type == "cpu"   # the CPU kernel checks its sums
    try:
        cluster, external = impl(x, layer_offsets, labels, weights.to(torch.float64), int(n_clusters))
    except ValueError as exc:
        if kernel_checks_values and "NaN or Inf" in str(exc):
            _raise_nonfinite(x, layer_offsets, "tree_reduce")
        raise
    if (_checking_values() and not kernel_checks_values
            and not (bool(torch.isfinite(cluster).all()) and bool(torch.isfinite(external).all()))):
        _raise_nonfinite(x, layer_offsets, "tree_reduce")
    return cluster, external


def _check_pack_parts(parts, out: torch.Tensor, n: int) -> None:
    """The kernel's per-part checks (op_checks.h), with its messages, for the reference path."""
    cols = 0
    for j in range(len(parts) // n):
        width = parts[j * n].numel()
        for i in range(n):
            p, where = parts[j * n + i], f"parts[{j * n + i}] (key {j}, client {i})"
            if p.dtype != out.dtype:
                raise TypeError(f"pack_rows: {where} is {p.dtype} but out is {out.dtype}")
            if p.device != out.device:
                raise ValueError(f"pack_rows: {where} is on {p.device} but out is on {out.device}")
            if not p.is_contiguous():
                raise ValueError(f"pack_rows: {where} is not contiguous (strides {p.stride()})")
            if p.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"pack_rows: {where} requires grad, and pack_rows does not support autograd: "
                                 f"pass detached tensors or call it under torch.no_grad()")
            if p.numel() != width:
                raise ValueError(f"pack_rows: {where} has {p.numel()} elements but key {j} has {width} "
                                 f"(client 0's, parts[{j * n}])")
        cols += width
    if cols != out.shape[1]:
        raise ValueError(f"pack_rows: the {len(parts) // n} keys' widths sum to {cols} but out has W={out.shape[1]} columns")


def pack_rows(parts, out: torch.Tensor) -> None:
    """Copy many tensors into the columns of one row-major buffer, in one parallel pass.

    Gathers N clients' tensors into their rows of out, key after key: what a torch.stack per key
    into out's columns computes (torch.cat per client into its row), bit for bit, with one memcpy per
    piece on the CPU instead of a few microseconds of torch dispatch per piece.

    Parameters
    ----------
    parts : sequence of torch.Tensor
        Key-major: ``parts[j * N + i]`` is key j of client i (written to row i), N = out.shape[0], so
        len(parts) is a multiple of N. Every part contiguous (any shape: it is read flattened), of
        out's dtype and device; key j's parts all hold w_j = parts[j * N].numel() elements and fill
        columns w_0 + ... + w_(j-1) up to w_0 + ... + w_j; the w_j sum to W. Only read.
    out : torch.Tensor
        [N, W], N >= 1, columns unit-stride; rows may be strided (a view of the first W columns of a
        wider buffer), as long as they do not overlap. No part may lie inside the memory out spans
        (its first row's start to its last row's end). Written in place; nothing else is.

    Returns
    -------
    None

    Raises
    ------
    ValueError, TypeError
        A part of another dtype (TypeError), on another device, not contiguous, or with another
        number of elements than its key's first part, named by its index, key and client; a count of
        parts that is not a multiple of N, widths that do not sum to W, an out that is not 2-D with
        unit-stride columns, an out that is a conjugate or negative view, a part that requires grad
        while grad mode is on (no autograd through the write: pass detached tensors or use
        torch.no_grad()), and rows of out that overlap or a part inside out's span (ValueError).
    RuntimeError
        From torch's in-place checks, as for any in-place op: out a leaf that requires grad, or an
        inference tensor outside inference mode. out's version counter is bumped, so a backward
        through its earlier value raises instead of using the overwritten one.

    Examples
    --------
    >>> import torch, fedtreelora as ftl
    >>> a = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]         # key 0 (width 2), clients 0 and 1
    >>> b = [torch.tensor([[5.0]]), torch.tensor([[6.0]])]               # key 1 (width 1)
    >>> out = torch.zeros(2, 3)
    >>> ftl.ops.pack_rows(a + b, out)
    >>> out
    tensor([[1., 2., 5.],
            [3., 4., 6.]])
    >>> wide = torch.zeros(2, 5)
    >>> ftl.ops.pack_rows(a + b, wide[:, :3])                            # rows of a wider buffer
    >>> wide
    tensor([[1., 2., 5., 0., 0.],
            [3., 4., 6., 0., 0.]])
    >>> ftl.ops.pack_rows(a + [torch.zeros(1), torch.zeros(2)], out)
    Traceback (most recent call last):
    ...
    ValueError: ...parts[3] (key 1, client 1) has 2 elements but key 1 has 1...
    """
    _tensor(out, "out")
    if out.dim() != 2 or out.shape[0] < 1:
        raise ValueError(f"pack_rows: out must be [N, W] with N >= 1, got shape {tuple(out.shape)}")
    n, w = out.shape
    # torch's conj/neg fallback cannot write back through such a view (Dynamo cannot trace the test;
    # a compiled graph is functionalised and never writes through one)
    if not torch.compiler.is_compiling() and (out.is_conj() or out.is_neg()):
        raise ValueError("pack_rows: out must not be a conjugate or negative view (out.is_conj() or "
                         "out.is_neg()); pass a plain tensor (resolve_conj() / resolve_neg() make one)")
    if w > 1 and out.stride(1) != 1:
        raise ValueError(f"pack_rows: out's columns must be unit-stride, got strides {out.stride()}")
    if not isinstance(parts, (list, tuple)):
        parts = list(parts)
    if len(parts) % n:
        raise ValueError(f"pack_rows: got {len(parts)} parts, not a multiple of N={n} (out's rows): "
                         f"parts[j * N + i] must be key j of client i")
    if not native_available():  # the native kernels check every part in C++; here, one pass in Python
        for k, p in enumerate(parts):
            _tensor(p, f"pack_rows: parts[{k}] (key {k // n}, client {k % n})")
        _check_pack_parts(parts, out, n)
        _check_pack_memory(parts, out, n)
        return reference.pack_rows(parts, out)
    try:
        torch.ops.fedtreelora.pack_rows(parts, out)
    except (TypeError, RuntimeError):
        # torch's own message for a non-tensor in the list names no index: find it (only on failure).
        for k, p in enumerate(parts):
            _tensor(p, f"pack_rows: parts[{k}] (key {k // n}, client {k % n})")
        raise


def _check_pack_memory(parts, out: torch.Tensor, n: int) -> None:
    """The native kernels' memory checks, for the reference path: rows of out that overlap, and a part
    inside out's span (first row's start to last row's end), which the copy could overwrite before
    reading it. Same words as the C++ checks."""
    w = out.shape[1]
    if n > 1 and w > 0 and out.stride(0) < w:
        raise ValueError(f"pack_rows: out's rows overlap (row stride {out.stride(0)} < W={w})")
    if w == 0:
        return
    begin = out.data_ptr()
    end = begin + ((n - 1) * out.stride(0) + w) * out.element_size()
    for k, p in enumerate(parts):
        lo = p.data_ptr()
        if p.numel() and lo < end and lo + p.numel() * p.element_size() > begin:
            raise ValueError(f"pack_rows: parts[{k}] (key {k // n}, client {k % n}) overlaps out")


# ----------------------------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes without data, so torch.compile(fullgraph=True) can trace.
_FAKES_REGISTERED = []


def _register_fakes() -> None:
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED.append(True)

    @torch.library.register_fake("fedtreelora::layer_distances")
    def _(x, layer_offsets, metric):
        n, n_layers = x.shape[0], layer_offsets.shape[0] - 1
        return x.new_empty(n_layers, n, n, dtype=torch.float32), x.new_empty(n, n, dtype=torch.float32)

    @torch.library.register_fake("fedtreelora::linkage")
    def _(d, method):
        return d.new_empty(max(d.shape[0] - 1, 0), 4, dtype=torch.float64)

    @torch.library.register_fake("fedtreelora::cut_tree")
    def _(z, n_clusters):
        return z.new_empty(n_clusters.shape[0], z.shape[0] + 1, dtype=torch.int64)

    @torch.library.register_fake("fedtreelora::silhouette")
    def _(d, labels):
        return d.new_empty(labels.shape[0], labels.shape[1], dtype=torch.float32)

    @torch.library.register_fake("fedtreelora::pack_rows")
    def _(parts, out):
        # Also what runs when a part or out is on the meta device: the kernels' layout checks, so that
        # a meta part with a real out (or the reverse) is refused instead of leaving out unwritten.
        if out.dim() != 2 or out.shape[0] < 1:
            raise ValueError(f"pack_rows: out must be [N, W] with N >= 1, got shape {tuple(out.shape)}")
        if len(parts) % out.shape[0]:
            raise ValueError(f"pack_rows: got {len(parts)} parts, not a multiple of N={out.shape[0]} (out's rows)")
        _check_pack_parts(parts, out, out.shape[0])
        return None  # writes out in place (Tensor(a!)), returns nothing

    @torch.library.register_fake("fedtreelora::tree_reduce")
    def _(x, layer_offsets, labels, weights, n_clusters):
        return x.new_empty(n_clusters, x.shape[1]), x.new_empty(n_clusters, x.shape[1])
