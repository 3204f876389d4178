"""aggregate(): per-client cluster and external experts from the clients' LoRA state dicts.

The per-round path (a stored tree) packs the clients once into x [N, P] in their own dtype and
device, runs one `ops.tree_reduce` (the weighted cluster and external means of every layer at once,
accumulated in float32 or better), and hands back state dicts of *views* into the [C, P] results:
clients of one cluster share the storage of their expert (clone before modifying a result in place,
and before `safetensors.torch.save_file`, which refuses shared storage).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import adapters, ops
from .tree import AggregationTree, TreeConfig, build_tree_from_rows

__all__ = ["aggregate", "AggregationResult", "ROBUST_METHODS"]

ROBUST_METHODS = ("mean", "trimmed_mean")


@dataclass
class AggregationResult:
    """tree: the AggregationTree used; cluster_states[k] / external_states[k]: client k's cluster
    expert and external expert, state dicts with the input's keys, shapes, dtypes and device
    (a list, or a dict keyed by client name when the clients came as a dict). external_states[k]
    is None when k's cluster holds every client at every layer; otherwise, at a layer where it
    does, the external expert is zero there (a zero LoRA adds nothing)."""

    tree: AggregationTree
    cluster_states: list | dict
    external_states: list | dict


def aggregate(client_states, weights=None, tree: AggregationTree | None = None, config: TreeConfig | None = None,
              clip_norm: float | str | None = None, robust: str = "mean", trim_ratio: float = 0.1) -> AggregationResult:
    """Cluster and external experts for every client (DESIGN.md section 1, steps 4 and 5).

    client_states: a list of PEFT LoRA state dicts (`peft.get_peft_model_state_dict`), or a dict
        client name -> state dict; all clients share keys, shapes, dtype and device. Never modified.
    weights: per-client aggregation weights (sample counts, say): a sequence, tensor, or a dict
        name -> weight; default equal. Finite and > 0.
    tree: a stored AggregationTree (the per-round path: no distances, no linkage); built from these
        states with `config` when None.
    config: TreeConfig for building the tree (default TreeConfig()); its `head` field decides what the
        non-layer tensors share (default: the tree's config).
    clip_norm: None, a positive float, or "median": each client's slice of each segment (a layer, or the
        non-layer tensors) is scaled down to at most this L2 norm ("median": per segment, the median
        of the clients' norms) before the tree and the means.
    robust: "mean" (weighted mean, `ops.tree_reduce`) or "trimmed_mean": coordinate-wise weighted
        trimmed mean inside each cluster and over each external set, dropping `trim_ratio` of the
        weight from each end (fractionally at the boundary; with equal weights and trim_ratio * m an
        integer it is scipy.stats.trim_mean).
    With one client: nothing to share, its state comes back unchanged (as a copy) with a warning.
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
    head_policy = (config or tree.config).head

    if n == 1:
        warnings.warn("aggregate() got a single client: nothing to share, returning its state unchanged", stacklevel=2)

    labels = tree.labels
    if layout.has_head:  # the non-layer segment's partition
        head_row = labels[-1] if head_policy == "deepest" else torch.zeros_like(labels[-1])
        labels = torch.cat([labels, head_row[None]], dim=0)
    labels = labels.to(x.device)
    n_clusters = int(tree.n_clusters.max())
    offsets = layout.layer_offsets.to(x.device)
    if robust == "mean":
        with _name_nonfinite(x, layout, names):  # the op checks its outputs: no extra pass over x when all is well
            cluster, external = ops.tree_reduce(x, offsets, labels, w, n_clusters=n_clusters)
    else:
        cluster, external = _trimmed_reduce(x, layout.layer_offsets.tolist(), labels, w, n_clusters, trim_ratio)

    local_head = layout.has_head and head_policy == "local"
    anyone_outside = int(tree.n_clusters.max()) > 1  # else every external expert would be all zeros
    cluster_out, external_out = _per_client_views(cluster, external if anyone_outside else None, labels.cpu(),
                                                  layout, x if local_head else None)
    if names is not None:
        cluster_out = dict(zip(names, cluster_out))
        external_out = dict(zip(names, external_out))
    return AggregationResult(tree=tree, cluster_states=cluster_out, external_states=external_out)


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


def _per_client_views(cluster, external, labels, layout, x_local_head):
    """Per-client state dicts of views into the cluster/external rows, in the clients' key order.

    Clients with the same label at every segment share one template dict (copied per client, so
    replacing a key affects one client only). x_local_head: the packed rows when the non-layer
    tensors stay local (then each client gets its own, and zeros as their external part)."""
    specs = layout.specs()
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
                    clus[key] = _view(cluster[path[s], lo:hi], shape, dtype)
                    ext_value = _view(external[path[s], lo:hi], shape, dtype) if ext is not None else None
                if ext is not None:
                    ext[key] = ext_value
            templates[path] = (clus, ext)
        clus, ext = templates[path]
        clus, ext = dict(clus), (dict(ext) if ext is not None else None)
        for key, shape, dtype, lo, hi, _ in local_specs:
            clus[key] = _view(x_local_head[k, lo:hi], shape, dtype)
            if ext is not None:
                ext[key] = torch.zeros(shape, dtype=dtype, device=x_local_head.device)
        cluster_out.append(clus)
        external_out.append(ext)
    return cluster_out, external_out


def _view(row: torch.Tensor, shape, dtype) -> torch.Tensor:
    t = row.view(shape)
    return t if t.dtype == dtype else t.to(dtype)


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
