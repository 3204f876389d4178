"""The global client tree and its layer-wise cuts (DESIGN.md section 1, steps 2 and 3).

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

__all__ = ["TreeConfig", "AggregationTree", "build_tree", "choose_cuts", "HEAD_POLICIES"]

HEAD_POLICIES = ("deepest", "local", "global")


@dataclass(frozen=True)
class TreeConfig:
    """Settings of the tree and the cut search.

    linkage: agglomerative method (single, complete, average, weighted, ward).
    metric: per-layer distance between clients' B factors ("frobenius" as in the paper, or "cosine").
    window: K, a layer may use at most K - 1 more clusters than the layer before it.
    tau: score of the single cluster (c = 1); a split must reach a mean silhouette above tau.
    head: what the trainable tensors outside the transformer layers (a classification head in
        `modules_to_save`) share: "deepest" (the deepest layer's partition, the default),
        "local" (each client keeps its own) or "global" (averaged over everyone).
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

    layers: layer names, shallow -> deep; linkage: Z [N-1, 4] float64 (scipy format);
    n_clusters: int64 [L], never decreasing; labels: int64 [L, N], client k's cluster at layer l
    (scipy cut_tree numbering); scores: per layer, {c: score} for the candidates examined;
    client_names: the clients' names when given; config: the TreeConfig used.
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
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
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
        from .viz import plot_tree

        return plot_tree(self, path, title=title)


# ----------------------------------------------------------------------------------------------
def choose_cuts(per_layer: torch.Tensor, z: torch.Tensor, window: int, tau: float):
    """The cut search of DESIGN.md section 1 step 3 on precomputed distances.

    per_layer: [L, N, N] layer distances; z: the tree. Returns (n_clusters int64 [L], labels int64
    [L, N], scores: per layer {c: score}). Silhouettes of all candidates of a layer come from one
    batched `ops.silhouette` call; the partitions from one `ops.cut_tree` call.
    """
    n_layers, n = per_layer.shape[0], per_layer.shape[1]
    top = max(1, min(n - 1, 1 + n_layers * (window - 1)))  # the largest count any layer can reach
    cuts = ops.cut_tree(z, torch.arange(1, top + 1, dtype=torch.int64, device=z.device)).cpu()  # row c-1: c clusters
    d = per_layer
    counts, scores = [], []
    prev = 1
    for l in range(n_layers):
        candidates = list(range(prev, min(n - 1, prev + window - 1) + 1)) or [1]
        splits = [c for c in candidates if c >= 2]
        layer_scores = {1: float(tau)} if 1 in candidates else {}
        if splits:
            labels = cuts[[c - 1 for c in splits]].to(d.device)
            sil = ops.silhouette(d[l:l + 1], labels.unsqueeze(0))[0].tolist()
            layer_scores.update(zip(splits, sil))
        best = max(candidates, key=lambda c: (layer_scores[c], -c))  # ties -> the smaller c
        counts.append(best)
        scores.append(layer_scores)
        prev = best
    n_clusters = torch.tensor(counts, dtype=torch.int64)
    labels = cuts[n_clusters - 1]
    return n_clusters, labels, scores


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

    client_states: a list of PEFT state dicts (`peft.get_peft_model_state_dict`), or a dict
    client name -> state dict. Only the B factors are used (DESIGN.md section 1 step 2).
    """
    config = config or TreeConfig()
    states, names = adapters.normalise_clients(client_states)
    layout = adapters.parse_layout(states, names)
    b_layout = layout.b_layout()
    xb = adapters.pack(states, b_layout)
    problem = adapters.first_nonfinite(xb, b_layout, names)
    if problem:
        raise ValueError(problem)
    return build_tree_from_rows(xb, b_layout.layer_offsets, layout.layers, config, names)
