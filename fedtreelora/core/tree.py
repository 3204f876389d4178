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
from dataclasses import asdict, dataclass, field

import torch

from . import adapters, ops
from .files import atomic_write_text

__all__ = ["TreeConfig", "AggregationTree", "build_tree", "choose_cuts", "client_distances", "HEAD_POLICIES"]

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

    @property
    def n_clients(self) -> int:
        return int(self.labels.shape[1])

    def groups(self, layer: int) -> list[list[int]]:
        """The clusters of a layer as lists of client indices, in label order."""
        lab = self.labels[layer].tolist()
        return [[k for k, c in enumerate(lab) if c == g] for g in range(int(self.n_clusters[layer]))]

    def _name(self, k: int) -> str:
        return self.client_names[k] if self.client_names else str(k)

    def __str__(self) -> str:
        lines = [f"AggregationTree: {self.n_clients} clients, {len(self.layers)} layers, {self.config.linkage} linkage, "
                 f"{self.config.metric} distance, window {self.config.window}, tau {self.config.tau}"]
        width = max(len(name) for name in self.layers)
        for l, name in enumerate(self.layers):
            c = int(self.n_clusters[l])
            groups = " ".join("{" + ", ".join(self._name(k) for k in g) + "}" for g in self.groups(l))
            lines.append(f"  {name:<{width}}  {c} cluster{'s' if c != 1 else ' '}  {groups}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-able data; AggregationTree.from_dict(tree.to_dict()) gives the tree back."""
        return {
            "format": "fedtreelora.AggregationTree/1",
            "layers": list(self.layers),
            "client_names": list(self.client_names) if self.client_names else None,
            "config": asdict(self.config),
            "linkage": self.linkage.tolist(),
            "n_clusters": [int(c) for c in self.n_clusters.tolist()],
            "labels": self.labels.tolist(),
            "scores": [[[int(c), float(s)] for c, s in sorted(layer.items())] for layer in self.scores],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "AggregationTree":
        fmt = data.get("format")
        if fmt != "fedtreelora.AggregationTree/1":
            raise ValueError(f"not a serialised AggregationTree (format {fmt!r})")
        n = len(data["labels"][0]) if data["labels"] else 0
        tree = cls(layers=list(data["layers"]),
                   linkage=torch.tensor(data["linkage"], dtype=torch.float64).reshape(max(n - 1, 0), 4),
                   n_clusters=torch.tensor(data["n_clusters"], dtype=torch.int64),
                   labels=torch.tensor(data["labels"], dtype=torch.int64),
                   scores=[{int(c): float(s) for c, s in layer} for layer in data["scores"]],
                   config=TreeConfig(**data["config"]),
                   client_names=list(data["client_names"]) if data.get("client_names") else None)
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
        """Check the fields agree with each other (shapes, monotone counts, labels within counts)."""
        n_layers, n = len(self.layers), self.n_clients
        if tuple(self.labels.shape) != (n_layers, n):
            raise ValueError(f"AggregationTree.labels must be [L, N] = [{n_layers}, {n}], got {tuple(self.labels.shape)}")
        if tuple(self.n_clusters.shape) != (n_layers,):
            raise ValueError(f"AggregationTree.n_clusters must be [L] = [{n_layers}], got {tuple(self.n_clusters.shape)}")
        if tuple(self.linkage.shape) != (max(n - 1, 0), 4):
            raise ValueError(f"AggregationTree.linkage must be [N-1, 4] = [{max(n - 1, 0)}, 4], got {tuple(self.linkage.shape)}")
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
    window = n if window is None else window
    top = max(1, min(n - 1, 1 + n_layers * (window - 1)))  # the largest count any layer can reach
    cuts = ops.cut_tree(z, torch.arange(1, top + 1, dtype=torch.int64, device=z.device)).cpu()  # row c-1: c clusters
    d = per_layer
    counts, scores = [], []
    prev = 1
    for l in range(n_layers):
        candidates = list(range(prev, min(n - 1, prev + window - 1) + 1)) or [prev]
        splits = [c for c in candidates if c >= 2]
        layer_scores = {1: float(tau)} if 1 in candidates and tau is not None else {}
        if splits:
            labels = cuts[[c - 1 for c in splits]].to(d.device)
            sil = ops.silhouette(d[l:l + 1], labels.unsqueeze(0))[0].tolist()
            layer_scores.update(zip(splits, sil))
        scored = [c for c in candidates if c in layer_scores] or candidates[:1]
        best = max(scored, key=lambda c: (layer_scores.get(c, 0.0), -c))  # ties -> the smaller c
        counts.append(best)
        scores.append(layer_scores)
        prev = best
    n_clusters = torch.tensor(counts, dtype=torch.int64)
    labels = cuts[n_clusters - 1]
    return n_clusters, labels, scores


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
        float32 [N, N], the mean over layers.

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


def build_tree_from_rows(xb: torch.Tensor, b_offsets: torch.Tensor, layers, config: TreeConfig,
                         client_names=None) -> AggregationTree:
    """build_tree on packed B-factor rows xb [N, P_B] whose layer l spans b_offsets[l]:b_offsets[l+1]."""
    n = xb.shape[0]
    if n == 1:
        return AggregationTree(layers=list(layers), linkage=torch.zeros(0, 4, dtype=torch.float64),
                               n_clusters=torch.ones(len(layers), dtype=torch.int64),
                               labels=torch.zeros(len(layers), 1, dtype=torch.int64),
                               scores=[{1: float(config.tau)} for _ in layers], config=config,
                               client_names=client_names)
    per_layer, mean = ops.layer_distances(xb, b_offsets.to(xb.device), config.metric)
    z = ops.linkage(mean, config.linkage)
    n_clusters, labels, scores = choose_cuts(per_layer, z, config.window, config.tau)
    return AggregationTree(layers=list(layers), linkage=z.cpu(), n_clusters=n_clusters, labels=labels,
                           scores=scores, config=config, client_names=client_names)


def build_tree(client_states, config: TreeConfig | None = None) -> AggregationTree:
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
    """
    config = config or TreeConfig()
    xb, b_layout, layout, names = _b_rows(client_states)
    return build_tree_from_rows(xb, b_layout.layer_offsets, layout.layers, config, names)
