"""extend_tree(): late clients placed into a stored tree, layer by layer, without re-clustering.

The rule (average linkage, restricted to the nested partitions): at layer l, shallow to deep, a new
client is already in cluster p of layer l - 1 (everyone is in the single cluster "above" layer 0);
the candidates are the clusters of layer l inside p (partitions of one tree cut deeper are nested, so
each cluster of layer l lies inside exactly one of layer l - 1); the client joins the candidate whose
clustered members are at the smallest mean distance from it under layer l's distance (the tree's
metric on the layer's B factors); ties go to the smaller label. Only the clients in the linkage (the
clustered ones) are members for this purpose: a placement never depends on other placed clients, so
the order of the new clients does not matter, and extending in two steps equals extending once.
"""
from __future__ import annotations

from collections import Counter

import torch

from . import adapters
from .adapters import layer_rows
from .tree import AggregationTree, layer_keys

__all__ = ["extend_tree"]

_NORM_BLOCK = 4096  # rows per float64 normalisation (bounds the float64 temporaries)


def extend_tree(tree: AggregationTree, client_states, new_states, names=None) -> AggregationTree:
    """Place new clients into a stored tree without rebuilding it.

    Layer by layer, shallow to deep, each new client joins, among the sub-clusters of its cluster
    at the layer above (so the partitions stay nested), the cluster with the smallest mean B-factor
    distance to it under that layer's distances (`tree.config.metric`): the average-linkage rule.
    The old clients keep their labels, the cluster counts and the linkage Z stay as they are (Z is
    over the clustered clients only; see `AggregationTree`), and the new clients are appended, in
    order, and listed in `placed`.

    Parameters
    ----------
    tree : AggregationTree
        The stored tree (from `build_tree`, or an earlier `extend_tree`).
    client_states : list of dict or dict of str to dict
        The current PEFT LoRA state dicts of the tree's clients, all `tree.n_clients` of them in the
        tree's order (a dict: keyed by the tree's client names, in that order). Only the B factors of
        the clustered clients at the layers where a new client has a choice are read. Never modified.
    new_states : list of dict or dict of str to dict
        The new clients' state dicts (same keys, shapes, dtype and device). Never modified.
    names : list of str, optional
        Names of the new clients when `new_states` is a list (a dict's keys are its names). When the
        tree or either input has names, the extended tree has names for every client: old clients
        without one are called ``"k"``, new ones ``"N + j"``.

    Returns
    -------
    AggregationTree
        N + M clients: labels [L, N + M] (the first N columns unchanged), the same linkage,
        n_clusters, scores and config, `placed` = the earlier placed clients and N .. N + M - 1.
        `aggregate(states + new, tree=extended)` takes the clients in this order.

    Raises
    ------
    ValueError
        `client_states` does not hold the tree's clients (count, names or order), the new clients'
        layers differ from the tree's, keys/shapes differ, NaN/Inf values, names that clash or
        repeat, no new clients: the message names the argument, client and key.
    TypeError
        Arguments of the wrong type.

    Notes
    -----
    Distances are computed for the pairs (new client, clustered member of its parent cluster) only,
    and only at layers where the parent cluster has more than one sub-cluster: one [m, n_p] float32
    GEMM on the centred (Frobenius) or unit (cosine) rows (float32 centre and norms, combined in float64); cost at most
    M * N_linked * P_B multiply-adds, usually far less. Frobenius distances are
    sqrt(max(0, |a|^2 + |b|^2 - 2 a.b)) after subtracting the members' column mean (the distance is
    translation invariant); cosine distances are 1 - a.b / (|a| |b|), a zero slice at similarity 0.

    Examples
    --------
    >>> import fedtreelora as ftl
    >>> from fedtreelora.core.synthetic import planted_states
    >>> states, truth = planted_states(n_layers=3, groups=(1, 2, 4), n_clients=12)
    >>> late = [2, 7]                                   # held out, join later
    >>> old = [s for k, s in enumerate(states) if k not in late]
    >>> tree = ftl.build_tree(old)
    >>> ext = ftl.extend_tree(tree, old, [states[k] for k in late])
    >>> ext.n_clients, ext.n_linked, ext.placed
    (12, 10, [10, 11])
    >>> ext.groups(2)                                   # 10 joins {0, 1}, 11 joins {5, 6}
    [[0, 1, 10], [2, 3, 4], [5, 6, 11], [7, 8, 9]]
    >>> bool((ext.labels[:, :10] == tree.labels).all())
    True
    """
    if not isinstance(tree, AggregationTree):
        raise TypeError(f"tree must be a fedtreelora.AggregationTree, got {type(tree).__name__}")
    tree.validate()
    old, old_names = adapters.normalise_clients(client_states)
    try:
        new, new_dict_names = adapters.normalise_clients(new_states)
    except (TypeError, ValueError) as e:
        raise type(e)(f"new_states: {e}") from None
    n, m = len(old), len(new)
    if n != tree.n_clients:
        raise ValueError(f"client_states has {n} clients, the tree has {tree.n_clients} ({tree.n_linked} clustered + "
                         f"{len(tree.placed)} placed): pass every client of the tree, in the tree's order")
    if old_names is not None and tree.client_names is not None and list(old_names) != list(tree.client_names):
        raise ValueError(f"client_states names {_short(old_names)} differ from the tree's clients "
                         f"{_short(tree.client_names)} (same names, same order needed)")
    new_names = _new_names(names, new_dict_names, m)
    base_names = list(tree.client_names or old_names or []) or None
    if base_names is not None or new_names is not None:
        base_names = base_names or [str(k) for k in range(n)]
        new_names = new_names or [str(n + j) for j in range(m)]
        clash = sorted(set(base_names) & set(new_names))
        if clash:
            raise ValueError(f"new client name(s) {clash[:5]} already name clients of the tree")
    all_names = base_names + new_names if base_names is not None else None

    layout = adapters.parse_layout(old + new, all_names)  # new client j is client n + j in the messages
    if list(layout.layers) != list(tree.layers):
        raise ValueError(f"the clients' layers {_short(list(layout.layers))} ({len(layout.layers)}) differ from the "
                         f"tree's {_short(list(tree.layers))} ({len(tree.layers)})")
    b_layout = layout.b_layout()
    keys = layer_keys(b_layout)
    n_layers, n_linked = len(tree.layers), tree.n_linked
    offsets = b_layout.layer_offsets.tolist()

    # the new clients' B factors [M, P_B] (M is small), checked once at every layer
    new_b = layer_rows(new, [key for layer in keys for key in layer], b_layout.dtype)
    if not adapters.all_finite(new_b):
        problem = adapters.first_nonfinite(new_b, b_layout, all_names, row_offset=n)
        if problem:
            raise ValueError(f"new_states: {problem}")
    new_rows = [new_b[:, offsets[l]:offsets[l + 1]] for l in range(n_layers)]

    old_labels = tree.labels[:, :n_linked]
    new_labels = torch.zeros(n_layers, m, dtype=torch.int64)
    parent_old = torch.zeros(n_linked, dtype=torch.int64)
    parent_new = torch.zeros(m, dtype=torch.int64)
    for l in range(n_layers):
        lab = old_labels[l]
        for p in torch.unique(parent_new).tolist():
            js = (parent_new == p).nonzero().flatten()
            members = (parent_old == p).nonzero().flatten()
            subs = torch.unique(lab[members])  # sorted: argmin's first minimum is the smaller label
            if subs.numel() == 1:
                new_labels[l, js] = subs[0]
                continue
            member_rows = layer_rows([old[i] for i in members.tolist()], keys[l], b_layout.dtype)
            d = cross_distances(new_rows[l][js], member_rows, tree.config.metric)  # [m_p, n_p] float64
            if not bool(torch.isfinite(d).all()):  # a NaN/Inf member poisons the distances: name it
                bad = (~torch.isfinite(member_rows)).any(1).nonzero().flatten()
                if bad.numel():
                    k = int(bad[0])  # the tree's client index, not the position among the members
                    problem = adapters.first_nonfinite(member_rows[k:k + 1], b_layout, all_names,
                                                       column_offset=offsets[l], row_offset=int(members[k]))
                    raise ValueError(f"client_states: {problem}")
                raise ValueError(f"extend_tree: the distances at layer {l} ({tree.layers[l]}) overflowed")
            del member_rows
            which = torch.searchsorted(subs, lab[members])
            sums = torch.zeros(js.numel(), subs.numel(), dtype=torch.float64).index_add_(1, which, d)
            means = sums / torch.bincount(which, minlength=subs.numel()).to(torch.float64)
            new_labels[l, js] = subs[means.argmin(dim=1)]
        parent_old, parent_new = lab, new_labels[l]

    extended = AggregationTree(layers=list(tree.layers), linkage=tree.linkage.clone(), n_clusters=tree.n_clusters.clone(),
                               labels=torch.cat([tree.labels, new_labels], dim=1),
                               scores=[dict(s) for s in tree.scores], config=tree.config, client_names=all_names,
                               placed=list(tree.placed) + list(range(n, n + m)))
    extended.validate()
    return extended


def cross_distances(a: torch.Tensor, b: torch.Tensor, metric: str = "frobenius") -> torch.Tensor:
    """float64 [m, n]: the distance between each row of a [m, w] and each row of b [n, w].

    Frobenius: Euclidean distance, computed on rows centred by b's column mean (float32 mean, norms
    and GEMM, combined in float64). Cosine: 1 - cosine similarity, a zero row at similarity 0 with every row.
    """
    if metric == "frobenius":
        # Any centre near the mean removes the cancellation (the distance is translation invariant), so
        # a float32 mean does; sum(dtype=float64) would convert element by element, 4x the GEMM's time.
        b32 = b.to(torch.float32, copy=True)  # our own copy: centred in place, the caller's rows untouched
        centre = b32.mean(0)
        b32.sub_(centre)
        a32 = a.to(torch.float32) - centre
        na, nb = _sq_norms(a32), _sq_norms(b32)
        gram = torch.mm(a32, b32.T).to(torch.float64)
        return (na[:, None] + nb[None, :] - 2.0 * gram).clamp_min_(0.0).sqrt_()
    if metric == "cosine":
        ua, ub = _unit_rows(a), _unit_rows(b)
        return (1.0 - torch.mm(ua, ub.T).to(torch.float64)).clamp_(0.0, 2.0)
    raise ValueError(f"metric must be 'frobenius' or 'cosine', got {metric!r}")


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """float64 squared row norms of float32 x: float32 norms (torch's cascade sum, as accurate as the
    float32 GEMM they are combined with), squared in float64."""
    return torch.linalg.vector_norm(x, dim=1).to(torch.float64).square_()


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], _NORM_BLOCK):
        blk = x[i:i + _NORM_BLOCK].to(torch.float64)
        norm = blk.norm(dim=1, keepdim=True)
        out[i:i + _NORM_BLOCK] = torch.where(norm > 0, blk / norm.clamp_min(1e-300), torch.zeros_like(blk))
    return out


def _new_names(names, dict_names, m: int):
    if names is None:
        return list(dict_names) if dict_names is not None else None
    if dict_names is not None:
        raise ValueError("names: pass names only with new_states as a list (a dict's keys are the names)")
    if isinstance(names, (str, bytes)) or not hasattr(names, "__len__"):
        raise TypeError(f"names must be a list of str, one per new client, got {type(names).__name__}")
    names = [str(x) for x in names]
    if len(names) != m:
        raise ValueError(f"names has {len(names)} entries for {m} new clients")
    repeated = sorted(x for x, c in Counter(names).items() if c > 1)
    if repeated:
        raise ValueError(f"names repeats {repeated[:5]}")
    return names


def _short(items) -> str:
    items = list(items)
    return str(items[:3])[:-1] + (", ...]" if len(items) > 3 else "]")
