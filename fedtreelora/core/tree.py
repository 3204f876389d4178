"""The global client tree and its layer-wise cuts (the method's steps 2 and 3, docs/design.md).

build_tree(client_states) packs the clients' LoRA B factors, measures per-layer distances
(`ops.layer_distances`), clusters the mean distance (`ops.linkage`), and walks the layers shallow to
deep choosing how many clusters each layer is cut into:

    c*_0 = 1,  c*_l = argmax_{c in [c*_{l-1}, min(N-1, c*_{l-1} + K - 1)]} score(c, D^(l))

with score(1) = tau (the bias towards full sharing, a constant) and score(c >= 2) = the mean
silhouette of the cut of the tree into exactly c clusters (scipy cut_tree semantics) under the
layer's distances; ties go to the smaller c. Counts never decrease with depth, and partitions are
nested because every layer cuts the same tree.

Small federations: with one client there is nothing to cluster (one layer count of 1, an empty
linkage); with two clients a split would leave only singletons, whose silhouette is undefined, so
c <= N - 1 = 1 and both clients share every layer.
"""
from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import asdict, dataclass, field

import torch

from . import adapters, ops
from .adapters import layer_rows
from .files import atomic_write_text
from .spill import LayerSpill

__all__ = ["TreeConfig", "AggregationTree", "build_tree", "choose_cuts", "client_distances", "memory_estimates",
           "IN_MEMORY_LIMIT_BYTES", "HEAD_POLICIES"]

HEAD_POLICIES = ("deepest", "local", "global")


@dataclass(frozen=True)
class TreeConfig:
    """Settings of the tree and the cut search (frozen; the single home of their defaults).

    Parameters
    ----------
    linkage : {"average", "single", "complete", "weighted", "ward"}
        Agglomerative method of the global tree.
    metric : {"frobenius", "cosine"}
        Per-layer distance between clients' B factors ("frobenius" as in the paper).
    window : int
        K >= 1: a layer may use at most K - 1 more clusters than the layer before it.
    tau : float
        Score of the single cluster (c = 1), in [-1, 1]: a split must reach a mean silhouette
        above tau.
    head : {"deepest", "local", "global"}
        What the trainable tensors outside the transformer layers (a classification head in
        `modules_to_save`) share: the deepest layer's partition, nothing (each client keeps its
        own), or everything (averaged over everyone).

    Raises
    ------
    ValueError
        A setting outside its allowed values, naming the field.

    Examples
    --------
    >>> import fedtreelora as ftl
    >>> ftl.TreeConfig(tau=0.2)
    TreeConfig(linkage='average', metric='frobenius', window=3, tau=0.2, head='deepest')
    >>> ftl.TreeConfig(linkage="avrage")
    Traceback (most recent call last):
    ...
    ValueError: TreeConfig.linkage must be one of ('single', 'complete', 'average', 'weighted', 'ward'), got 'avrage'
    """

    linkage: str = "average"
    metric: str = "frobenius"
    window: int = 3
    tau: float = 0.1
    head: str = "deepest"

    def __post_init__(self):
        if self.linkage not in ops.LINKAGE_METHODS:
            raise ValueError(f"TreeConfig.linkage must be one of {ops.LINKAGE_METHODS}, got {self.linkage!r}")
        if self.metric not in ops.METRICS:
            raise ValueError(f"TreeConfig.metric must be one of {ops.METRICS}, got {self.metric!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"TreeConfig.window must be an integer >= 1, got {self.window!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"TreeConfig.tau must be a number in [-1, 1] (a silhouette level), got {self.tau!r}")
        if self.head not in HEAD_POLICIES:
            raise ValueError(f"TreeConfig.head must be one of {HEAD_POLICIES}, got {self.head!r}")


@dataclass
class AggregationTree:
    """One global client tree and the cluster count chosen for every layer.

    Attributes
    ----------
    layers : list of str
        Layer names, shallow to deep (PEFT module prefixes such as `...encoder.layer.3`).
    linkage : torch.Tensor
        Z [N-1, 4] float64 in scipy's linkage format.
    n_clusters : torch.Tensor
        int64 [L], the cluster count of each layer, never decreasing with depth.
    labels : torch.Tensor
        int64 [L, N]: client k's cluster at layer l (scipy `cut_tree` numbering).
    scores : list of dict
        Per layer, {c: score} for the candidate counts examined.
    config : TreeConfig
        The settings used.
    client_names : list of str or None
        The clients' names when they came as a dict.
    placed : list of int
        Clients placed into the tree by `extend_tree` rather than clustered: always the last
        ``len(placed)`` clients, in tree order. Empty for a tree from `build_tree`.

    Notes
    -----
    `n_clients` counts every client of the tree (the columns of `labels`); the linkage `linkage`
    is over the first `n_linked` = n_clients - len(placed) of them only (its leaf ids 0 ..
    n_linked - 1 are those clients): `extend_tree` gives late clients a label at every layer
    without re-clustering, so Z stays the one `build_tree` computed, and `validate` checks
    ``linkage.shape == (n_linked - 1, 4)``. Serialised trees without placed clients keep the
    format ``fedtreelora.AggregationTree/1`` (byte for byte what older versions wrote); trees with
    placed clients are written as ``/2`` with a ``placed`` list; `from_dict` reads both.

    Examples
    --------
    >>> import fedtreelora as ftl
    >>> from fedtreelora.core.synthetic import planted_states
    >>> states, _ = planted_states(n_layers=2, groups=(1, 2), n_clients=4)
    >>> tree = ftl.build_tree(states)
    >>> tree.groups(1)
    [[0, 1], [2, 3]]
    >>> ftl.AggregationTree.from_json(tree.to_json()).labels.tolist()
    [[0, 0, 0, 0], [0, 0, 1, 1]]
    """

    layers: list[str]
    linkage: torch.Tensor
    n_clusters: torch.Tensor
    labels: torch.Tensor
    scores: list[dict[int, float]]
    config: TreeConfig = field(default_factory=TreeConfig)
    client_names: list[str] | None = None
    placed: list[int] = field(default_factory=list)

    @property
    def n_clients(self) -> int:
        """Every client of the tree (clustered and placed): the columns of `labels`."""
        return int(self.labels.shape[1])

    @property
    def n_linked(self) -> int:
        """The clients in the linkage Z (the first n_linked in tree order); the others were placed."""
        return self.n_clients - len(self.placed)

    def groups(self, layer: int) -> list[list[int]]:
        """The clusters of a layer as lists of client indices, in label order."""
        lab = self.labels[layer].tolist()
        return [[k for k, c in enumerate(lab) if c == g] for g in range(int(self.n_clusters[layer]))]

    def _name(self, k: int) -> str:
        return self.client_names[k] if self.client_names else str(k)

    def __str__(self) -> str:
        placed = set(self.placed)
        lines = [f"AggregationTree: {self.n_clients} clients, {len(self.layers)} layers, {self.config.linkage} linkage, "
                 f"{self.config.metric} distance, window {self.config.window}, tau {self.config.tau}"]
        if placed:
            lines[0] += (f"; {len(placed)} placed by extend_tree (marked *, not in the linkage): "
                         + ", ".join(self._name(k) for k in self.placed))
        width = max(len(name) for name in self.layers)
        for l, name in enumerate(self.layers):
            c = int(self.n_clusters[l])
            groups = " ".join("{" + ", ".join(self._name(k) + ("*" if k in placed else "") for k in g) + "}"
                              for g in self.groups(l))
            lines.append(f"  {name:<{width}}  {c} cluster{'s' if c != 1 else ' '}  {groups}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-able data; AggregationTree.from_dict(tree.to_dict()) gives the tree back."""
        data = {
            "format": "fedtreelora.AggregationTree/2" if self.placed else "fedtreelora.AggregationTree/1",
            "layers": list(self.layers),
            "client_names": list(self.client_names) if self.client_names else None,
            "config": asdict(self.config),
            "linkage": self.linkage.tolist(),
            "n_clusters": [int(c) for c in self.n_clusters.tolist()],
            "labels": self.labels.tolist(),
            "scores": [[[int(c), float(s)] for c, s in sorted(layer.items())] for layer in self.scores],
        }
        if self.placed:
            data["placed"] = [int(k) for k in self.placed]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "AggregationTree":
        fmt = data.get("format")
        if fmt not in ("fedtreelora.AggregationTree/1", "fedtreelora.AggregationTree/2"):
            raise ValueError(f"not a serialised AggregationTree (format {fmt!r})")
        placed = [int(k) for k in data.get("placed", [])] if fmt.endswith("/2") else []
        n = len(data["labels"][0]) if data["labels"] else 0
        n_linked = n - len(placed)
        tree = cls(layers=list(data["layers"]),
                   linkage=_linkage_from_list(data["linkage"], n_linked),
                   n_clusters=torch.tensor(data["n_clusters"], dtype=torch.int64),
                   labels=torch.tensor(data["labels"], dtype=torch.int64),
                   scores=[{int(c): float(s) for c, s in layer} for layer in data["scores"]],
                   config=TreeConfig(**data["config"]),
                   client_names=list(data["client_names"]) if data.get("client_names") else None,
                   placed=placed)
        tree.validate()
        return tree

    def to_json(self, path=None, indent: int | None = 1) -> str:
        """The tree as JSON text; also written (atomically) to `path` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "AggregationTree":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        """Check the fields agree with each other (shapes, monotone counts, labels within counts).

        The linkage must be over the clustered clients only: [n_linked - 1, 4] with n_linked =
        n_clients - len(placed), and `placed` must be the last clients, in order.
        """
        n_layers, n = len(self.layers), self.n_clients
        placed = [int(k) for k in self.placed]
        if placed != list(range(n - len(placed), n)) or len(placed) >= max(n, 1):
            raise ValueError(f"AggregationTree.placed must list the last clients in order (at least one client "
                             f"clustered), got {placed[:5]}{' ...' if len(placed) > 5 else ''} for {n} clients")
        n_linked = n - len(placed)
        if tuple(self.labels.shape) != (n_layers, n):
            raise ValueError(f"AggregationTree.labels must be [L, N] = [{n_layers}, {n}], got {tuple(self.labels.shape)}")
        if tuple(self.n_clusters.shape) != (n_layers,):
            raise ValueError(f"AggregationTree.n_clusters must be [L] = [{n_layers}], got {tuple(self.n_clusters.shape)}")
        if tuple(self.linkage.shape) != (max(n_linked - 1, 0), 4):
            raise ValueError(f"AggregationTree.linkage must be [n_linked-1, 4] = [{max(n_linked - 1, 0)}, 4] "
                             f"({n_linked} clustered clients of {n}), got {tuple(self.linkage.shape)}")
        for l in range(n_layers):
            c = int(self.n_clusters[l])
            if sorted(set(self.labels[l].tolist())) != list(range(c)):
                raise ValueError(f"AggregationTree layer {l} ({self.layers[l]}): labels must use exactly 0..{c - 1}")
        if bool((self.n_clusters[1:] < self.n_clusters[:-1]).any()):
            raise ValueError("AggregationTree.n_clusters must never decrease from shallow to deep layers")
        if self.client_names is not None and len(self.client_names) != n:
            raise ValueError(f"AggregationTree.client_names has {len(self.client_names)} names for {n} clients")

    def plot(self, path, title: str | None = None):
        """Draw the dendrogram with each layer's cut as a labelled horizontal line; save to path."""
        from ..report import plot_tree

        return plot_tree(self, path, title=title)


def _linkage_from_list(rows, n_linked: int) -> torch.Tensor:
    z = torch.tensor(rows, dtype=torch.float64)
    if z.numel() == 0:
        return z.reshape(0, 4)
    if z.dim() != 2 or z.shape[1] != 4:
        raise ValueError(f"AggregationTree linkage must be rows of 4 numbers, got shape {tuple(z.shape)}")
    return z  # validate() checks it has n_linked - 1 rows


# ----------------------------------------------------------------------------------------------
def choose_cuts(per_layer: torch.Tensor, z: torch.Tensor, window: int | None, tau: float | None):
    """The layer-wise cut search on precomputed distances (also the baselines' cut search).

    Walks the layers shallow to deep; layer l picks, among the counts c_{l-1} .. c_{l-1} + K - 1
    (capped at N - 1), the one with the best score: tau for c = 1, the mean silhouette of the cut
    of z into c clusters under per_layer[l] for c >= 2; ties go to the smaller count.

    Parameters
    ----------
    per_layer : torch.Tensor
        [L, N, N] distances, one matrix per layer.
    z : torch.Tensor
        The tree, [N-1, 4] in scipy's linkage format.
    window : int or None
        K; None: no bound (every count up to N - 1 is a candidate at every layer).
    tau : float or None
        Score of one cluster; None: one cluster only when no split is possible (N <= 2).

    Returns
    -------
    n_clusters : torch.Tensor
        int64 [L], never decreasing.
    labels : torch.Tensor
        int64 [L, N], the cut of z into n_clusters[l] clusters.
    scores : list of dict
        Per layer, {c: score} of the candidates examined.

    Examples
    --------
    >>> import torch
    >>> from fedtreelora.core import ops
    >>> from fedtreelora.core.tree import choose_cuts
    >>> x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1]])
    >>> per_layer, mean = ops.layer_distances(x, torch.tensor([0, 2]))
    >>> n_clusters, labels, _ = choose_cuts(per_layer, ops.linkage(mean), window=3, tau=0.1)
    >>> n_clusters.tolist(), labels.tolist()
    ([2], [[0, 0, 1, 1]])
    """
    n_layers, n = per_layer.shape[0], per_layer.shape[1]
    return _cut_search((per_layer[l:l + 1] for l in range(n_layers)), n_layers, n, z, window, tau)


def _cut_search(layer_distances, n_layers: int, n: int, z: torch.Tensor, window: int | None, tau: float | None):
    """choose_cuts on an iterable of the layers' [1, N, N] distances, read once, in layer order."""
    window = n if window is None else window
    top = max(1, min(n - 1, 1 + n_layers * (window - 1)))  # the largest count any layer can reach
    cuts = ops.cut_tree(z, torch.arange(1, top + 1, dtype=torch.int64, device=z.device)).cpu()  # row c-1: c clusters
    counts, scores = [], []
    prev = 1
    for l, d in zip(range(n_layers), layer_distances):
        candidates = list(range(prev, min(n - 1, prev + window - 1) + 1)) or [prev]
        splits = [c for c in candidates if c >= 2]
        layer_scores = {1: float(tau)} if 1 in candidates and tau is not None else {}
        if splits:
            labels = cuts[[c - 1 for c in splits]].to(d.device)
            sil = ops.silhouette(d, labels.unsqueeze(0))[0].tolist()
            layer_scores.update(zip(splits, sil))
        del d  # a streamed layer's [N, N] buffer is freed before the next one is computed
        scored = [c for c in candidates if c in layer_scores] or candidates[:1]
        best = max(scored, key=lambda c: (layer_scores.get(c, 0.0), -c))  # ties -> the smaller c
        counts.append(best)
        scores.append(layer_scores)
        prev = best
    n_clusters = torch.tensor(counts, dtype=torch.int64)
    labels = cuts[n_clusters - 1]
    return n_clusters, labels, scores


# ----------------------------------------------------------------------------------------------
# The mean distance over layers, accumulated on the strict upper triangle (scipy's condensed order)
# in float64, one layer at a time: the same arithmetic whether the layers come from one op call
# (in memory) or one call per layer (streaming), so both paths give the same mean to the bit.
_ROW_BLOCK = 256


def _row_blocks(n: int):
    """(first row, end row, first condensed index, end condensed index) of blocks of rows."""
    for i0 in range(0, max(n - 1, 0), _ROW_BLOCK):
        i1 = min(n - 1, i0 + _ROW_BLOCK)
        yield i0, i1, i0 * n - i0 * (i0 + 1) // 2, i1 * n - i1 * (i1 + 1) // 2


def _upper_mask(i0: int, i1: int, n: int, device) -> torch.Tensor:
    """[i1 - i0, n] bool: True at (r, j) with j > i0 + r (the strict upper triangle of rows i0..i1)."""
    return torch.ones(i1 - i0, n, dtype=torch.bool, device=device).triu_(i0 + 1)


def _add_upper(acc: torch.Tensor, d: torch.Tensor) -> None:
    """acc (float64, condensed [N(N-1)/2]) += the strict upper triangle of d [N, N], row after row."""
    n = d.shape[0]
    for i0, i1, c0, c1 in _row_blocks(n):
        acc[c0:c1] += torch.masked_select(d[i0:i1], _upper_mask(i0, i1, n, d.device))


def _square_from_upper(cond: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric float32 [N, N] matrix with zero diagonal whose strict upper triangle is cond."""
    upper = torch.zeros(n, n, dtype=torch.float32, device=cond.device)
    for i0, i1, c0, c1 in _row_blocks(n):
        upper[i0:i1].masked_scatter_(_upper_mask(i0, i1, n, cond.device), cond[c0:c1].to(torch.float32))
    return upper + upper.T  # x + 0 = x exactly: exactly symmetric, diagonal 0


def _mean_over_layers(layer_distances, n: int, n_layers: int, device) -> torch.Tensor:
    """float32 [N, N]: the float64 sum of the layers' float32 distances, in layer order, over L."""
    acc = torch.zeros(n * (n - 1) // 2, dtype=torch.float64, device=device)
    for d in layer_distances:
        _add_upper(acc, d[0])
        del d
    acc.div_(n_layers)
    return _square_from_upper(acc, n)


# ----------------------------------------------------------------------------------------------
def _b_rows(client_states):
    """(packed B-factor rows xb [N, P_B], their layout, the full layout, client names), finite."""
    states, names = adapters.normalise_clients(client_states)
    layout = adapters.parse_layout(states, names)
    b_layout = layout.b_layout()
    xb = adapters.pack(states, b_layout)
    problem = adapters.first_nonfinite(xb, b_layout, names)
    if problem:
        raise ValueError(problem)
    return xb, b_layout, layout, names


def client_distances(client_states, metric: str = "frobenius"):
    """Per-layer and mean distances between the clients' B factors (the columns `build_tree` reads).

    Parameters
    ----------
    client_states : list of dict or dict of str to dict
        PEFT LoRA state dicts, as for `build_tree`.
    metric : {"frobenius", "cosine"}
        The per-layer distance.

    Returns
    -------
    per_layer : torch.Tensor
        float32 [L, N, N].
    mean : torch.Tensor
        float32 [N, N], the mean over layers (`ops.layer_distances`' own: accumulated from the
        float64 layer distances; `build_tree` accumulates the float32 ones, so the two may differ
        in the last bit).

    Examples
    --------
    >>> from fedtreelora.core.synthetic import planted_states
    >>> from fedtreelora.core.tree import client_distances
    >>> per_layer, mean = client_distances(planted_states(n_layers=2, groups=(1, 2), n_clients=4)[0])
    >>> tuple(per_layer.shape), bool(per_layer[1, 0, 2] > 10 * per_layer[1, 0, 1])
    ((2, 4, 4), True)
    """
    xb, b_layout, _, _ = _b_rows(client_states)
    return ops.layer_distances(xb, b_layout.layer_offsets.to(xb.device), metric)


def _single_client_tree(layers, config, client_names) -> AggregationTree:
    return AggregationTree(layers=list(layers), linkage=torch.zeros(0, 4, dtype=torch.float64),
                           n_clusters=torch.ones(len(layers), dtype=torch.int64),
                           labels=torch.zeros(len(layers), 1, dtype=torch.int64),
                           scores=[{1: float(config.tau)} for _ in layers], config=config,
                           client_names=client_names)


def build_tree_from_rows(xb: torch.Tensor, b_offsets: torch.Tensor, layers, config: TreeConfig,
                         client_names=None) -> AggregationTree:
    """build_tree on packed B-factor rows xb [N, P_B] whose layer l spans b_offsets[l]:b_offsets[l+1] (in memory)."""
    n = xb.shape[0]
    if n == 1:
        return _single_client_tree(layers, config, client_names)
    per_layer, _ = ops.layer_distances(xb, b_offsets.to(xb.device), config.metric)
    n_layers = per_layer.shape[0]
    mean = _mean_over_layers((per_layer[l:l + 1] for l in range(n_layers)), n, n_layers, xb.device)
    z = ops.linkage(mean, config.linkage)
    del mean
    n_clusters, labels, scores = choose_cuts(per_layer, z, config.window, config.tau)
    return AggregationTree(layers=list(layers), linkage=z.cpu(), n_clusters=n_clusters, labels=labels,
                           scores=scores, config=config, client_names=client_names)


# ----------------------------------------------------------------------------------------------
# Streaming: one layer's B columns at a time, straight from the state dicts.
IN_MEMORY_LIMIT_BYTES = 2 << 30
"""build_tree's automatic rule: the in-memory path when its estimated extra memory is at most this."""


def layer_keys(b_layout: adapters.AdapterLayout) -> list[list[str]]:
    """Per layer, its B-factor keys in packing order (their columns are contiguous, in this order)."""
    off = b_layout.layer_offsets.tolist()
    out: list[list[str]] = [[] for _ in range(len(off) - 1)]
    for key, (lo, _) in zip(b_layout.keys, b_layout.columns):
        out[bisect_right(off, lo) - 1].append(key)
    return out


def _layer_error(rows, b_layout, layer: int, names) -> ValueError | None:
    """The error naming the client and key of a NaN/Inf in one layer's rows, if there is one."""
    problem = adapters.first_nonfinite(rows, b_layout, names, column_offset=int(b_layout.layer_offsets[layer]))
    return ValueError(problem) if problem else None


def _checked_layer_rows(states, keys, b_layout, layer: int, names):
    rows = layer_rows(states, keys, b_layout.dtype)
    if not adapters.all_finite(rows):
        error = _layer_error(rows, b_layout, layer, names)
        if error:
            raise error
    return rows


def memory_estimates(n: int, b_layout: adapters.AdapterLayout) -> dict[str, int]:
    """Estimated bytes build_tree adds over its inputs, in memory and streaming (peaks, roughly).

    In memory: the packed B rows N * P_B, the [L, N, N] float32 distances, the op's float64 sum,
    one layer's float32 rows and Gram matrix, the condensed float64 mean. Streaming: one layer's
    rows (input dtype and float32), the op's [N, N] float32 distances, float64 sum, Gram matrix and
    output mean, and the condensed float64 mean: independent of L and P_B beyond one layer.
    """
    off = b_layout.layer_offsets.tolist()
    n_layers, p_b = len(off) - 1, off[-1]
    w = max(b - a for a, b in zip(off[:-1], off[1:]))
    item = torch.empty(0, dtype=b_layout.dtype).element_size()
    nn = n * n
    in_memory = n * p_b * item + 4 * n_layers * nn + 8 * nn + 4 * n * w + 4 * nn + 4 * nn
    streaming = n * w * item + 4 * n * w + (4 + 8 + 4 + 4) * nn + 4 * nn
    return {"in_memory": int(in_memory), "streaming": int(streaming)}


def _build_streaming(states, b_layout, layers, config: TreeConfig, names) -> AggregationTree:
    """build_tree without the packed copy or the [L, N, N] distances: two passes over the layers
    (the second reads pass 1's distances back from a scratch file where it can: see `LayerSpill`)."""
    n, n_layers = len(states), len(layers)
    keys = layer_keys(b_layout)
    widths = (b_layout.layer_offsets[1:] - b_layout.layer_offsets[:-1]).tolist()

    def distances():
        device = states[0][keys[0][0]].device
        buffer = torch.empty(n, max(widths), dtype=b_layout.dtype, device=device)  # reused by every layer
        for l in range(n_layers):
            rows = layer_rows(states, keys[l], b_layout.dtype, buffer)
            try:  # the op checks its output for NaN/Inf (no extra pass over the rows when all is well)
                d = ops.layer_distances(rows, torch.tensor([0, widths[l]], dtype=torch.int64, device=rows.device),
                                        config.metric)[0]
            except ValueError:
                error = _layer_error(rows, b_layout, l, names)
                if error:
                    raise error from None
                raise
            del rows
            yield d
            del d

    device = states[0][keys[0][0]].device
    spill = LayerSpill.open(n, n_layers, device)

    def spilled(layers):
        for d in layers:
            spill.write(d[0])
            yield d

    try:
        first = distances() if spill is None else spilled(distances())
        mean = _mean_over_layers(first, n, n_layers, device)        # pass 1: mean -> tree
        z = ops.linkage(mean, config.linkage)
        del mean
        # pass 2: the same distances again, read back from the scratch file or recomputed
        again = distances() if spill is None else (d.unsqueeze(0) for d in spill.layers())
        n_clusters, labels, scores = _cut_search(again, n_layers, n, z, config.window, config.tau)
    finally:
        if spill is not None:
            spill.close()
    return AggregationTree(layers=list(layers), linkage=z.cpu(), n_clusters=n_clusters, labels=labels,
                           scores=scores, config=config, client_names=names)


def build_tree(client_states, config: TreeConfig | None = None, *, streaming: bool | None = None) -> AggregationTree:
    """The global client tree and per-layer cluster counts from the clients' LoRA state dicts.

    Per-layer Frobenius (or cosine) distances between the clients' B factors, their mean over
    layers clustered into one tree (`config.linkage`), then the cut search of `choose_cuts`
    from shallow to deep layers. Only the B factors are read.

    Parameters
    ----------
    client_states : list of dict or dict of str to dict
        PEFT LoRA state dicts (`peft.get_peft_model_state_dict`), one per client, or a dict
        client name -> state dict. Every client has the same keys, shapes, dtype and device.
        Never modified.
    config : TreeConfig, optional
        Settings of the tree; default `TreeConfig()`.
    streaming : bool, optional
        False: pack every client's B factors into one [N, P_B] copy and compute all [L, N, N]
        distances in one op call (one GEMM pass; memory ~ N * P_B + 4 L N^2 bytes). True: never
        hold more than one layer: pass 1 computes each layer's distances from its columns (read
        from the state dicts) and accumulates their mean, which gives the tree; pass 2 reads
        them back for the cut search from an unlinked scratch file in the temporary folder
        (4 L N^2 bytes on disk, 9.6 GB at N = 10,000; `FEDTREELORA_SCRATCH_DIR` names another
        folder), or computes them again on CUDA, with `FEDTREELORA_SCRATCH_DIR=none`, or where
        the disk lacks the room (a second GEMM pass). Memory ~ 24 N^2 bytes + one layer's
        columns, e.g. ~2.5 GB at N = 10,000. None (default): in memory when its estimate
        (`memory_estimates`) is at most `IN_MEMORY_LIMIT_BYTES` (2 GiB; e.g. N <= ~2,000 at
        L = 24, P_B = 196,608 in bf16), else streaming. Both give the same tree to the bit (same
        distances per layer, same float64 accumulation of their mean, same linkage and cuts).

    Returns
    -------
    AggregationTree

    Raises
    ------
    ValueError
        Clients whose keys, shapes or LoRA ranks differ, NaN/Inf values, no LoRA layers: the
        message names the client and key.
    TypeError
        A state dict that is not a mapping of tensors, or a non-float tensor.

    Notes
    -----
    The mean distance is the float64 sum of the layers' float32 distances (the op's outputs), in
    layer order, divided by L and rounded to float32; the linkage of that matrix is exact
    (scipy's, to the bit, through `ops.linkage`).

    Examples
    --------
    >>> import fedtreelora as ftl
    >>> from fedtreelora.core.synthetic import planted_states
    >>> states, truth = planted_states(n_layers=3, groups=(1, 2, 4), n_clients=8)
    >>> tree = ftl.build_tree(states, config=ftl.TreeConfig(window=3))
    >>> tree.n_clusters.tolist()
    [1, 2, 4]
    >>> bool((tree.labels == truth).all())
    True
    >>> torch.equal(ftl.build_tree(states, streaming=True).linkage, ftl.build_tree(states, streaming=False).linkage)
    True
    """
    config = config or TreeConfig()
    if streaming is not None and not isinstance(streaming, bool):
        raise TypeError(f"streaming must be True, False or None, got {streaming!r}")
    states, names = adapters.normalise_clients(client_states)
    layout = adapters.parse_layout(states, names)
    b_layout = layout.b_layout()
    n = len(states)
    if n == 1:
        _checked_layer_rows(states, [k for ks in layer_keys(b_layout) for k in ks], b_layout, 0, names)
        return _single_client_tree(layout.layers, config, names)
    if streaming is None:
        streaming = memory_estimates(n, b_layout)["in_memory"] > IN_MEMORY_LIMIT_BYTES
    if streaming:
        return _build_streaming(states, b_layout, layout.layers, config, names)
    xb = adapters.pack(states, b_layout)
    problem = adapters.first_nonfinite(xb, b_layout, names)
    if problem:
        raise ValueError(problem)
    return build_tree_from_rows(xb, b_layout.layer_offsets, layout.layers, config, names)
