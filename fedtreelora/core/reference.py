"""Slow, obviously-correct versions of every native op (float64 PyTorch, NumPy and SciPy).

They define what the ops compute; the tests compare the native kernels with them and with scipy and
sklearn, and `fedtreelora.ops` falls back to them when the native core cannot be built. Inputs are
assumed valid: `fedtreelora.ops` checks them before calling either implementation.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows"]


def layer_distances(x: torch.Tensor, layer_offsets: torch.Tensor, metric: str = "frobenius"):
    """Per-layer pairwise distances between client rows, and their mean over layers (float32 out)."""
    xd = x.detach().to("cpu", torch.float64)
    offsets = layer_offsets.tolist()
    n = xd.shape[0]
    per_layer = torch.zeros(len(offsets) - 1, n, n, dtype=torch.float64)
    for l, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        s = xd[:, lo:hi]
        if metric == "frobenius":
            d = (s[:, None, :] - s[None, :, :]).pow(2).sum(-1).sqrt()
        else:  # cosine: 1 - cos, a zero row is dissimilar (cos 0) to everything but itself
            peak = s.abs().amax(dim=1, keepdim=True)
            s = s / torch.where(peak == 0, torch.ones_like(peak), peak)  # no overflow in the norm; NaN stays NaN
            norms = s.norm(dim=1)
            cos = (s @ s.T) / (norms[:, None] * norms[None, :])
            zero = (norms[:, None] == 0) | (norms[None, :] == 0)
            cos = torch.where(zero, torch.zeros_like(cos), cos)
            d = (1.0 - cos).clamp(0.0, 2.0)
        d = 0.5 * (d + d.T)
        d.fill_diagonal_(0.0)
        per_layer[l] = d
    mean = per_layer.mean(0)
    return per_layer.to(device=x.device, dtype=torch.float32), mean.to(device=x.device, dtype=torch.float32)


def linkage(d: torch.Tensor, method: str = "average") -> torch.Tensor:
    """scipy.cluster.hierarchy.linkage on the condensed form of d; an empty Z for one client."""
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    dd = d.detach().to("cpu", torch.float64).numpy()
    if dd.shape[0] < 2:
        return torch.zeros(0, 4, dtype=torch.float64, device=d.device)
    z = scipy_linkage(squareform(dd, checks=False), method=method)
    return torch.from_numpy(np.ascontiguousarray(z)).to(d.device)


def cut_tree(z: torch.Tensor, n_clusters: torch.Tensor) -> torch.Tensor:
    """scipy.cluster.hierarchy.cut_tree(z, n_clusters).T as int64 [M, N].

    scipy is asked one count at a time: given several counts, its cut_tree writes the N-cluster
    partition into row 0 whatever position N has in the list (scipy 1.17), so a batched call can
    return a wrong partition.
    """
    from scipy.cluster.hierarchy import cut_tree as scipy_cut_tree

    zz = z.detach().to("cpu", torch.float64).numpy()
    counts = [int(c) for c in n_clusters.tolist()]
    n = zz.shape[0] + 1
    if n == 1:
        return torch.zeros(len(counts), 1, dtype=torch.int64, device=z.device)
    labels = np.stack([scipy_cut_tree(zz, n_clusters=[c])[:, 0] for c in counts]) if counts else np.zeros((0, n))
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(z.device)


def _silhouette_one(d: np.ndarray, labels: np.ndarray) -> float:
    n = len(labels)
    uniq, lab = np.unique(labels, return_inverse=True)
    k = len(uniq)
    if k < 2 or k > n - 1:
        return float("nan")
    sums = np.zeros((n, k))
    for c in range(k):
        sums[:, c] = d[:, lab == c].sum(1)
    sizes = np.bincount(lab, minlength=k).astype(np.float64)
    own = sizes[lab]
    a = sums[np.arange(n), lab] / np.maximum(own - 1, 1)
    means = sums / sizes[None, :]
    means[np.arange(n), lab] = np.inf
    b = means.min(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (b - a) / np.maximum(a, b)
    s = np.where(own > 1, np.nan_to_num(s), 0.0)
    return float(s.mean())


def silhouette(d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean silhouette per layer and partition, as sklearn's silhouette_score(metric="precomputed").

    NaN where sklearn would refuse: fewer than 2 or more than N-1 distinct labels.
    """
    dd = d.detach().to("cpu", torch.float64).numpy()
    ll = labels.detach().to("cpu").numpy()
    out = np.zeros(ll.shape[:2], dtype=np.float64)
    for l in range(ll.shape[0]):
        for m in range(ll.shape[1]):
            out[l, m] = _silhouette_one(dd[l], ll[l, m])
    return torch.from_numpy(out).to(device=d.device, dtype=torch.float32)


def tree_reduce(x: torch.Tensor, layer_offsets: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                n_clusters: int):
    """Weighted cluster means and external (everyone else) means per layer, in x's dtype."""
    xd = x.detach().to("cpu", torch.float64)
    w = weights.detach().to("cpu", torch.float64)
    lab = labels.detach().to("cpu")
    offsets = layer_offsets.tolist()
    p = xd.shape[1]
    cluster = torch.zeros(n_clusters, p, dtype=torch.float64)
    external = torch.zeros(n_clusters, p, dtype=torch.float64)
    for l, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        for c in range(n_clusters):
            inside = lab[l] == c
            if not bool(inside.any()):
                continue
            wi = w[inside]
            cluster[c, lo:hi] = (wi[:, None] * xd[inside, lo:hi]).sum(0) / wi.sum()
            if bool((~inside).any()):
                wo = w[~inside]
                external[c, lo:hi] = (wo[:, None] * xd[~inside, lo:hi]).sum(0) / wo.sum()
    return cluster.to(device=x.device, dtype=x.dtype), external.to(device=x.device, dtype=x.dtype)


def pack_rows(parts, out: torch.Tensor) -> None:
    """out[i, cols of key j] = parts[j * N + i].flatten(), N = out.shape[0]: a torch.stack per key."""
    n = out.shape[0]
    col = 0
    for j in range(len(parts) // n):
        width = parts[j * n].numel()
        out[:, col:col + width] = torch.stack([p.reshape(-1) for p in parts[j * n:(j + 1) * n]])
        col += width
