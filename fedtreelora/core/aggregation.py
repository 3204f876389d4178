"""aggregate(): per-client cluster and external experts from the clients' LoRA state dicts.

The per-round path (a stored tree, plain weighted means, no clipping, no local head) never packs the
clients: one segment (transformer layer) at a time, it gathers that segment's columns [N, w] from the
state dicts (each client tensor read once), runs `ops.tree_reduce` on them and writes the weighted
cluster and external means into the [C, P] experts, so its memory is the inputs + the experts + one
segment. Clipping, trimmed means and a local head pack x [N, P] once (they need every column of a
client together). Both hand back state dicts of *views* into the [C, P] results: clients of one
cluster share the storage of their expert (clone before modifying a result in place, and before
`safetensors.torch.save_file`, which refuses shared storage).
"""
from __future__ import annotations

import warnings
from bisect import bisect_right
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from . import adapters, ops
from .adapters import layer_rows
from .tree import AggregationTree, TreeConfig, build_tree, build_tree_from_rows

__all__ = ["aggregate", "AggregationResult", "group_experts", "ROBUST_METHODS"]

ROBUST_METHODS = ("mean", "trimmed_mean")


@dataclass
class AggregationResult:
    """What `aggregate` returns.

    Attributes
    ----------
    tree : AggregationTree
        The tree used (built, or the one passed in).
    cluster_states : list of dict or dict of str to dict
        Client k's cluster expert: a state dict with the input's keys, shapes, dtypes and device
        (a list, or a dict keyed by client name when the clients came as a dict).
    external_states : list or dict, of dict or None
        Client k's external expert, None when k's cluster holds every client at every layer;
        otherwise, at a layer where it does, the external expert is zero there (a zero LoRA adds
        nothing).
    """

    tree: AggregationTree
    cluster_states: list | dict
    external_states: list | dict


def aggregate(client_states, weights=None, tree: AggregationTree | None = None, config: TreeConfig | None = None,
              clip_norm: float | str | None = None, robust: str = "mean", trim_ratio: float = 0.1) -> AggregationResult:
    """Cluster and external experts for every client: the server step of FedTreeLoRA.

    For client k and layer l, the cluster expert is the weighted mean of the LoRA factors over the
    members of k's cluster at l (the tree cut into n_clusters[l] clusters), the external expert the
    weighted mean over everyone else. A and B are averaged separately.

    Parameters
    ----------
    client_states : list of dict or dict of str to dict
        PEFT LoRA state dicts (`peft.get_peft_model_state_dict`), one per client, or a dict client
        name -> state dict; all clients share keys, shapes, dtype and device. Never modified.
        Tensors that require grad (parameters passed as they are) are read as values: the
        experts carry no autograd history.
    weights : sequence, tensor or dict of str to float, optional
        Per-client aggregation weights (sample counts, say), finite and > 0; default equal.
    tree : AggregationTree, optional
        A stored tree (the per-round path: no distances, no linkage); built from these states
        with `config` when None.
    config : TreeConfig, optional
        Settings for building the tree (default `TreeConfig()`); its `head` field decides what the
        non-layer tensors share (default: the tree's config).
    clip_norm : float or "median", optional
        Each client's slice of each segment (a layer, or the non-layer tensors) is scaled down to
        at most this L2 norm ("median": per segment, the median of the clients' norms) before the
        tree and the means.
    robust : {"mean", "trimmed_mean"}
        Weighted mean (`ops.tree_reduce`), or a coordinate-wise weighted trimmed mean inside each
        cluster and over each external set, dropping `trim_ratio` of the weight from each end
        (fractionally at the boundary; with equal weights and trim_ratio * m an integer it is
        scipy.stats.trim_mean).
    trim_ratio : float
        In [0, 0.5), for robust="trimmed_mean".

    Returns
    -------
    AggregationResult
        Views into shared [C, P] results: clients of one cluster share the storage of their expert
        (clone before modifying a result in place, and before `safetensors.torch.save_file`).

    Raises
    ------
    ValueError
        Mismatched keys, shapes, ranks or devices, NaN/Inf values, bad weights, a tree built for
        other clients or layers: the message names the client and key or argument.
    TypeError
        Arguments of the wrong type.

    Notes
    -----
    With one client there is nothing to share: its state comes back unchanged (as a copy) with a
    warning. Results are in the input dtype, accumulated in float64 (on CPU and CUDA alike).

    Examples
    --------
    >>> import fedtreelora as ftl
    >>> from fedtreelora.core.synthetic import planted_states
    >>> states, truth = planted_states(n_layers=2, groups=(1, 2), n_clients=4, head=False)
    >>> res = ftl.aggregate(states, weights=[10, 10, 20, 20])
    >>> res.tree.n_clusters.tolist()
    [1, 2]
    >>> key = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight"
    >>> bool(res.cluster_states[0][key].allclose((states[0][key] + states[1][key]) / 2))
    True
    >>> bool(res.external_states[0][key].allclose((states[2][key] + states[3][key]) / 2))
    True
    """
    states, names = adapters.normalise_clients(client_states)
    layout = adapters.parse_layout(states, names)
    n = len(states)
    if robust not in ROBUST_METHODS:
        raise ValueError(f"robust must be one of {ROBUST_METHODS}, got {robust!r}")
    if isinstance(trim_ratio, bool) or not isinstance(trim_ratio, (int, float)) or not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be a number in [0, 0.5), got {trim_ratio!r}")
    if config is not None and not isinstance(config, TreeConfig):
        raise TypeError(f"config must be a fedtreelora.TreeConfig, got {type(config).__name__}")
    head_policy = (config or (tree.config if isinstance(tree, AggregationTree) else TreeConfig())).head
    if clip_norm is None and robust == "mean" and not (layout.has_head and head_policy == "local"):
        # The streamed path: no packed copy of the clients; one segment (layer) at a time.
        device = states[0][layout.keys[0]].device
        w = _weights(weights, n, names, device)
        if tree is None:
            tree = build_tree(client_states, config or TreeConfig())
        else:
            _check_tree(tree, layout, n, names)
        if n == 1:
            warnings.warn("aggregate() got a single client: nothing to share, returning its state unchanged", stacklevel=2)
        labels = _segment_labels(tree.labels, layout, head_policy)
        cluster_out, external_out = _streamed_experts(states, layout, labels, w, int(tree.n_clusters.max()), names)
    else:
        x = adapters.pack(states, layout)
        w = _weights(weights, n, names, x.device)
        if clip_norm is not None or robust != "mean":  # paths whose ops do not scan x for NaN/Inf themselves
            _raise_nonfinite(x, layout, names)
        if clip_norm is not None:
            _clip_(x, layout, clip_norm)
        if tree is None:
            b_layout = layout.b_layout()
            xb = _columns(x, layout.layer_offsets.tolist(), layout.b_ends)
            with _name_nonfinite(x, layout, names):
                tree = build_tree_from_rows(xb, b_layout.layer_offsets, layout.layers, config or TreeConfig(), names)
        else:
            _check_tree(tree, layout, n, names)
        if n == 1:
            warnings.warn("aggregate() got a single client: nothing to share, returning its state unchanged", stacklevel=2)
        labels = _segment_labels(tree.labels, layout, head_policy)
        local_head = layout.has_head and head_policy == "local"
        cluster_out, external_out = _experts(x, layout, layout.layer_offsets, labels, w, int(tree.n_clusters.max()),
                                             names, robust, trim_ratio, x_local_head=x if local_head else None)
    if names is not None:
        cluster_out = dict(zip(names, cluster_out))
        external_out = dict(zip(names, external_out))
    return AggregationResult(tree=tree, cluster_states=cluster_out, external_states=external_out)


def _segment_labels(labels: torch.Tensor, layout, head_policy: str) -> torch.Tensor:
    """[S, N]: the tree's layer labels, plus the non-layer segment's partition when there is one."""
    if layout.has_head:
        head_row = labels[-1] if head_policy == "deepest" else torch.zeros_like(labels[-1])
        labels = torch.cat([labels, head_row[None]], dim=0)
    return labels


_BLOCK_BYTES = 256 << 20
"""The streamed aggregate gathers consecutive segments up to this many bytes of columns per op call."""


def _streamed_experts(states, layout, labels, w, n_clusters: int, names):
    """_experts' outputs without packing: consecutive segments (layers) at a time, their columns
    [N, w_block] gathered from the state dicts (at most `_BLOCK_BYTES`, at least one segment), one
    `ops.tree_reduce` per block, the results written into the [C, P] experts. Each client tensor is read
    once; besides the inputs only the experts and one block of columns are held. Equal to the packed
    path to the bit (the reduction of a column never depends on the other columns)."""
    off = layout.layer_offsets.tolist()
    n_segments = len(off) - 1
    seg_keys: list[list[str]] = [[] for _ in range(n_segments)]
    for key, (lo, _) in zip(layout.keys, layout.columns):
        seg_keys[bisect_right(off, lo) - 1].append(key)
    device = states[0][layout.keys[0]].device
    item = torch.empty(0, dtype=layout.dtype).element_size()
    cluster = torch.empty(n_clusters, off[-1], dtype=layout.dtype, device=device)
    external = torch.empty(n_clusters, off[-1], dtype=layout.dtype, device=device)
    labels = labels.to(device)
    blocks, first = [], 0
    while first < n_segments:
        last = first + 1  # the block is segments first .. last - 1
        while last < n_segments and len(states) * (off[last + 1] - off[first]) * item <= _BLOCK_BYTES:
            last += 1
        blocks.append((first, last))
        first = last
    buffer = torch.empty(len(states), max(off[b] - off[a] for a, b in blocks), dtype=layout.dtype, device=device)
    for first, last in blocks:
        lo, hi = off[first], off[last]
        rows = layer_rows(states, [k for s_ in range(first, last) for k in seg_keys[s_]], layout.dtype, buffer)
        offsets = torch.tensor([o - lo for o in off[first:last + 1]], dtype=torch.int64, device=device)
        try:
            c, e = ops.tree_reduce(rows, offsets, labels[first:last], w, n_clusters=n_clusters)
        except ValueError:
            problem = adapters.first_nonfinite(rows, layout, names, column_offset=lo)
            if problem:
                raise ValueError(problem) from None
            raise
        cluster[:, lo:hi] = c
        external[:, lo:hi] = e
        del rows, c, e
    del buffer
    labels = labels.cpu()
    anyone_outside = bool((labels != labels[:, :1]).any())
    return _per_client_views(cluster, external if anyone_outside else None, labels, layout, layout.layer_offsets, None)


def group_experts(client_states, layer_labels, weights=None, *, a_labels=None, head_labels=None) -> list[tuple]:
    """Cluster and external experts under any partition per layer (the baselines' server rule).

    The same packing and reduction as `aggregate`, with the partitions given instead of cut from a
    tree: FedAvg is one cluster everywhere, local training a cluster per client, FedSA-LoRA the A
    factors shared and the B factors local, flat clustering one partition at every layer.

    Parameters
    ----------
    client_states : list of dict or dict of str to dict
        PEFT LoRA state dicts, as for `aggregate`. Never modified.
    layer_labels : array-like of int
        [L, N]: the cluster of each client at each transformer layer (any integers).
    weights : sequence or tensor, optional
        Per-client weights, finite and > 0; default equal.
    a_labels : array-like of int, optional
        [L, N] partitions for the layers' A factors (every non-B tensor of a layer) when they
        differ from the B factors'; default: `layer_labels`.
    head_labels : array-like of int, optional
        [N] partition of the tensors outside the layers; default: the deepest layer's.

    Returns
    -------
    list of tuple
        Per client (cluster expert, external expert or None); the external expert is None for
        every client when every segment has a single cluster.

    Examples
    --------
    >>> import torch
    >>> from fedtreelora.core.aggregation import group_experts
    >>> from fedtreelora.core.synthetic import planted_states
    >>> states, _ = planted_states(n_layers=2, groups=(1, 2), n_clients=4, head=False)
    >>> fedavg = group_experts(states, torch.zeros(2, 4, dtype=torch.int64))
    >>> key = "base_model.model.bert.encoder.layer.0.attention.self.value.lora_A.weight"
    >>> bool(fedavg[3][0][key].allclose(sum(s[key] for s in states) / 4)), fedavg[3][1] is None
    (True, True)
    """
    states, names = adapters.normalise_clients(client_states)
    layout = adapters.parse_layout(states, names)
    n, n_layers = len(states), len(layout.layers)
    b_rows = _label_rows(layer_labels, (n_layers, n), "layer_labels")
    a_rows = b_rows if a_labels is None else _label_rows(a_labels, (n_layers, n), "a_labels")
    head_row = b_rows[-1:] if head_labels is None else _label_rows(head_labels, (n,), "head_labels")[None]
    starts, ends = layout.layer_offsets.tolist(), layout.b_ends
    offsets, rows = [0], []
    for l in range(n_layers):  # a layer is one segment, or two (B, then A) when their partitions differ
        if a_labels is not None and ends[l] < starts[l + 1]:
            offsets += [ends[l], starts[l + 1]]
            rows += [b_rows[l], a_rows[l]]
        else:
            offsets.append(starts[l + 1])
            rows.append(b_rows[l])
    if layout.has_head:
        offsets.append(starts[-1])
        rows.append(head_row[0])
    labels = torch.stack([torch.unique(row, return_inverse=True)[1] for row in rows])  # 0..C-1 keeps C small
    x = adapters.pack(states, layout)
    w = _weights(weights, n, names, x.device)
    cluster, external = _experts(x, layout, torch.tensor(offsets, dtype=torch.int64), labels, w,
                                 int(labels.max()) + 1, names)
    return list(zip(cluster, external))


def _label_rows(labels, shape: tuple, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(np.asarray(labels), dtype=torch.int64).cpu()
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be integers: {e}") from None
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (layers, clients), got {list(t.shape)}")
    return t


def _experts(x, layout, offsets, labels, w, n_clusters: int, names, robust: str = "mean", trim_ratio: float = 0.1,
             x_local_head=None):
    """Per-client (cluster, external) state dicts from x under labels [S, N] of the segments `offsets`."""
    labels = labels.to(x.device)
    if robust == "mean":
        with _name_nonfinite(x, layout, names):  # the op checks its outputs: no extra pass over x when all is well
            cluster, external = ops.tree_reduce(x, offsets.to(x.device), labels, w, n_clusters=n_clusters)
    else:
        cluster, external = _trimmed_reduce(x, offsets.tolist(), labels, w, n_clusters, trim_ratio)
    labels = labels.cpu()
    anyone_outside = bool((labels != labels[:, :1]).any())  # else every external expert would be all zeros
    return _per_client_views(cluster, external if anyone_outside else None, labels, layout, offsets, x_local_head)


# ----------------------------------------------------------------------------------------------
def _raise_nonfinite(x, layout, names) -> None:
    problem = adapters.first_nonfinite(x, layout, names)
    if problem:
        raise ValueError(problem)


@contextmanager
def _name_nonfinite(x, layout, names):
    """Turn an op's NaN/Inf error (client index, column) into one naming the client and key."""
    try:
        yield
    except ValueError:
        _raise_nonfinite(x, layout, names)
        raise


def _weights(weights, n: int, names, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=torch.float64, device=device)
    if isinstance(weights, Mapping):
        if names is None:
            raise TypeError("weights given as a dict need client_states as a dict of client name -> state dict")
        unknown = sorted(set(map(str, weights)) - set(names))
        if unknown:
            raise ValueError(f"weights name clients that are not in client_states: {unknown}")
        by_name = {str(k): v for k, v in weights.items()}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise ValueError(f"weights has no entry for client(s) {missing}")
        weights = [by_name[name] for name in names]
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().to("cpu").reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"weights must be numbers, one per client: {e}") from None
    if w.numel() != n:
        raise ValueError(f"weights must have one entry per client: got {w.numel()} for {n} clients")
    bad = ~torch.isfinite(w) | (w <= 0)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        who = f"{k} ({names[k]!r})" if names else str(k)
        raise ValueError(f"weights must be finite and > 0: client {who} has weight {float(w[k])}")
    return w.to(device)


def _columns(x: torch.Tensor, starts: list[int], ends) -> torch.Tensor:
    """The columns starts[l]:ends[l] of every layer l, side by side (a copy)."""
    return torch.cat([x[:, starts[l]:end] for l, end in enumerate(ends)], dim=1)


def _clip_(x: torch.Tensor, layout: adapters.AdapterLayout, clip_norm) -> None:
    """Scale each client's slice of each segment of x (our packed copy) to at most the clip norm."""
    norms = adapters.segment_norms(x, layout)  # [N, S] float64
    if isinstance(clip_norm, str):
        if clip_norm != "median":
            raise ValueError(f"clip_norm must be a positive number or 'median', got {clip_norm!r}")
        limit = norms.quantile(0.5, dim=0, keepdim=True)
    else:
        if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not clip_norm > 0 \
                or clip_norm == float("inf"):
            raise ValueError(f"clip_norm must be a positive number or 'median', got {clip_norm!r}")
        limit = torch.full_like(norms[:1], float(clip_norm))
    scale = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
    lo = layout.layer_offsets.tolist()
    for s in range(len(lo) - 1):
        if bool((scale[:, s] < 1).any()):
            x[:, lo[s]:lo[s + 1]].mul_(scale[:, s:s + 1].to(x.dtype))


def _check_tree(tree: AggregationTree, layout: adapters.AdapterLayout, n: int, names) -> None:
    if not isinstance(tree, AggregationTree):
        raise TypeError(f"tree must be a fedtreelora.AggregationTree, got {type(tree).__name__}")
    tree.validate()
    if tree.n_clients != n:
        raise ValueError(f"tree was built for {tree.n_clients} clients, got {n}")
    if list(tree.layers) != list(layout.layers):
        raise ValueError(f"tree was built for the layers {list(tree.layers)[:3]}... ({len(tree.layers)}), "
                         f"the client states have {list(layout.layers)[:3]}... ({len(layout.layers)})")
    if names is not None and tree.client_names is not None and list(tree.client_names) != list(names):
        raise ValueError(f"tree was built for the clients {tree.client_names}, got {names} (same order needed)")


def _per_client_views(cluster, external, labels, layout, offsets, x_local_head):
    """Per-client state dicts of views into the cluster/external rows, in the clients' key order.

    Clients with the same label at every segment share one template dict (copied per client, so
    replacing a key affects one client only). x_local_head: the packed rows when the non-layer
    tensors stay local (then each client gets its own, and zeros as their external part)."""
    seg_of = torch.searchsorted(offsets, torch.tensor([spec[3] for spec in layout.specs()]), right=True) - 1
    specs = [(*spec[:5], int(s)) for spec, s in zip(layout.specs(), seg_of)]  # segment of each key in `offsets`
    local = set(layout.head_keys) if x_local_head is not None else set()
    local_specs = [spec for spec in specs if spec[0] in local]
    templates: dict[tuple, tuple[dict, dict | None]] = {}
    cluster_out, external_out = [], []
    for k in range(labels.shape[1]):
        path = tuple(labels[:, k].tolist())
        if path not in templates:
            clus, ext = {}, ({} if external is not None else None)
            for key, shape, dtype, lo, hi, s in specs:
                if key in local:
                    clus[key] = ext_value = None  # filled per client below, keeps the key order
                else:
                    clus[key] = adapters.key_view(cluster[path[s], lo:hi], shape, dtype)
                    ext_value = adapters.key_view(external[path[s], lo:hi], shape, dtype) if ext is not None else None
                if ext is not None:
                    ext[key] = ext_value
            templates[path] = (clus, ext)
        clus, ext = templates[path]
        clus, ext = dict(clus), (dict(ext) if ext is not None else None)
        for key, shape, dtype, lo, hi, _ in local_specs:
            clus[key] = adapters.key_view(x_local_head[k, lo:hi], shape, dtype)
            if ext is not None:
                ext[key] = torch.zeros(shape, dtype=dtype, device=x_local_head.device)
        cluster_out.append(clus)
        external_out.append(ext)
    return cluster_out, external_out


def _trimmed_reduce(x: torch.Tensor, offsets: list[int], labels: torch.Tensor, w: torch.Tensor, n_clusters: int,
                    ratio: float):
    """tree_reduce's outputs with a coordinate-wise weighted trimmed mean in place of the mean.

    Per segment, the clients' values of every coordinate are sorted once; each client covers the
    interval of cumulative weight [W_{i-1}, W_i) of its cluster (or external set), and only the part
    inside [ratio * W, (1 - ratio) * W] counts. Accumulates in float64.
    """
    n, p = x.shape
    cluster = torch.zeros(n_clusters, p, dtype=torch.float64, device=x.device)
    external = torch.zeros(n_clusters, p, dtype=torch.float64, device=x.device)
    for s in range(len(offsets) - 1):
        lo, hi = offsets[s], offsets[s + 1]
        values, order = x[:, lo:hi].double().sort(dim=0, stable=True)   # [N, cols]
        lab = labels[s][order]                                          # cluster of each sorted entry
        wsorted = w[order]
        for c in range(n_clusters):
            inside = lab == c
            if not bool(inside[:, 0].any()):
                continue
            cluster[c, lo:hi] = _trimmed(values, torch.where(inside, wsorted, 0.0), ratio)
            if not bool(inside[:, 0].all()):
                external[c, lo:hi] = _trimmed(values, torch.where(inside, 0.0, wsorted), ratio)
    return cluster.to(x.dtype), external.to(x.dtype)


def _trimmed(values: torch.Tensor, weights: torch.Tensor, ratio: float) -> torch.Tensor:
    """Weighted trimmed mean along dim 0 of sorted values (zero weight = not a member)."""
    upper = weights.cumsum(0)
    total = upper[-1:]
    lower = upper - weights
    kept = (torch.minimum(upper, (1 - ratio) * total) - torch.maximum(lower, ratio * total)).clamp_min(0)
    return (kept * values).sum(0) / kept.sum(0)
