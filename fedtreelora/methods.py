"""The methods compared by `fedtreelora simulate`: one small class per server rule.

Every method starts from the same warm-up (local training of every client), then each round turns
the clients' uploaded adapters into, per client, a cluster expert (what the client trains, loaded
into PEFT's adapter) and an optional frozen external expert mixed in by `ExpertMixer`. Training and
evaluation are shared (`client.LocalTrainer`); only `setup` (after warm-up) and `aggregate` differ.
"""
from __future__ import annotations

import numpy as np
import torch

from . import ops
from .adapters import is_b_factor
from .experts import b_distances, group_experts, layer_keys

Experts = list[tuple[dict, "dict | None"]]


class Method:
    name = ""
    description = ""

    def setup(self, warm_states: list[dict], weights: np.ndarray, config, groups: np.ndarray) -> None:
        """Called once after warm-up with the clients' adapters (and the true groups, for oracles only)."""

    def aggregate(self, states: list[dict], weights: np.ndarray) -> Experts:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}

    def state(self) -> dict:
        """What setup() decided, JSON-able: a resumed run reloads it instead of re-deciding."""
        return {}

    def load_state(self, state: dict, config) -> None:
        self.config = config


class _Segmented(Method):
    """Methods defined by a partition of the clients per transformer layer (and one for the head)."""
    mixing = False

    def layer_labels(self, n_layers: int, n: int) -> np.ndarray:
        raise NotImplementedError

    def setup(self, warm_states, weights, config, groups):
        self.config = config
        self.layers, self.head = layer_keys(warm_states[0])
        self.labels = np.asarray(self.layer_labels(len(self.layers), len(warm_states)), dtype=np.int64)

    def segments_and_labels(self):
        segments, labels = list(self.layers), list(self.labels)
        if self.head:   # non-layer tensors follow the deepest layer's partition (DESIGN.md step 5)
            segments.append(self.head)
            labels.append(self.labels[-1])
        return segments, np.stack(labels)

    def aggregate(self, states, weights):
        segments, labels = self.segments_and_labels()
        experts = group_experts(states, segments, labels, weights)
        return experts if self.mixing else [(cluster, None) for cluster, _ in experts]

    def summary(self):
        return {"n_clusters": [int(len(set(row))) for row in self.labels], "labels": self.labels.tolist()}

    def state(self):
        return {"layers": self.layers, "head": self.head, "labels": self.labels.tolist()}

    def load_state(self, state, config):
        self.config = config
        self.layers, self.head, self.labels = state["layers"], state["head"], np.asarray(state["labels"], dtype=np.int64)


class LocalOnly(_Segmented):
    name, description = "local", "every client keeps its own LoRA and head (no sharing)"

    def layer_labels(self, n_layers, n):
        return np.tile(np.arange(n), (n_layers, 1))


class FedIT(_Segmented):
    name, description = "fedit", "FedIT: FedAvg of LoRA and head over all clients"

    def layer_labels(self, n_layers, n):
        return np.zeros((n_layers, n))


class OracleGroups(_Segmented):
    name, description = "oracle-groups", "FedAvg inside the true planted groups (told the groups; a reference)"

    def setup(self, warm_states, weights, config, groups):
        self.groups = np.asarray(groups)
        super().setup(warm_states, weights, config, groups)

    def layer_labels(self, n_layers, n):
        return np.tile(self.groups, (n_layers, 1))


class FedSA(_Segmented):
    name, description = "fedsa", "FedSA-LoRA: A factors averaged over all clients, B factors and head local"

    def layer_labels(self, n_layers, n):
        return np.tile(np.arange(n), (n_layers, 1))

    def segments_and_labels(self):
        a_keys = [k for seg in self.layers for k in seg if not is_b_factor(k)]
        own = [k for seg in self.layers for k in seg if is_b_factor(k)] + self.head
        n = self.labels.shape[1]
        return [a_keys, own], np.stack([np.zeros(n, dtype=np.int64), np.arange(n)])


class FedALT(_Segmented):
    name, description = "fedalt", "FedALT-style: own LoRA plus a frozen rest-of-world LoRA, learnable mixing"
    mixing = True

    def layer_labels(self, n_layers, n):
        return np.tile(np.arange(n), (n_layers, 1))


def _global_linkage(states, config):
    per_layer, mean = b_distances(states, config.metric)
    return per_layer, mean, ops.linkage(mean.double(), config.linkage)


def _best_silhouette_cut(z, d: torch.Tensor, candidates: list[int], tau: float | None):
    """Cluster count in `candidates` with the best silhouette of the cut of z under d (score(1) = tau)."""
    n = d.shape[0]
    multi = [c for c in candidates if 2 <= c <= n - 1]
    scores = {}
    if multi:
        labels = ops.cut_tree(z, torch.tensor(multi, dtype=torch.int64))
        sil = ops.silhouette(d.float()[None], labels[None])[0]
        scores.update({c: float(s) for c, s in zip(multi, sil)})
    if tau is not None and 1 in candidates:
        scores[1] = tau
    if not scores:
        return 1, np.zeros(n, dtype=np.int64)
    best = max(sorted(scores), key=lambda c: scores[c])      # ties: the smaller count (sorted, first max)
    return best, ops.cut_tree(z, torch.tensor([best], dtype=torch.int64))[0].numpy()


class _OnePartition(_Segmented):
    """Methods that decide one partition of the clients (`self.partition`) and use it at every layer."""

    def layer_labels(self, n_layers, n):
        return np.tile(self.partition, (n_layers, 1))


class FlatClusters(_OnePartition):
    name, description = "flat", "FedLEASE-style flat clustering: one partition (best silhouette) for all layers"

    def setup(self, warm_states, weights, config, groups):
        _, mean, z = _global_linkage(warm_states, config)
        n = len(warm_states)
        self.partition = _best_silhouette_cut(z, mean, list(range(2, n)), None)[1] if n > 2 else np.zeros(n, dtype=np.int64)
        super().setup(warm_states, weights, config, groups)


class FixedClusters(_OnePartition):
    name, description = "ablation-fixed", "ablation: the global tree cut into `fixed_clusters` clusters at every layer, with experts"
    mixing = True

    def setup(self, warm_states, weights, config, groups):
        _, _, z = _global_linkage(warm_states, config)
        c = min(max(config.fixed_clusters, 1), len(warm_states))
        self.partition = ops.cut_tree(z, torch.tensor([c], dtype=torch.int64))[0].numpy()
        super().setup(warm_states, weights, config, groups)


class PerLayerClusters(_Segmented):
    name, description = "ablation-perlayer", "ablation: each layer clustered on its own distances (no global tree, no nesting), with experts"
    mixing = True

    def setup(self, warm_states, weights, config, groups):
        per_layer, _, _ = _global_linkage(warm_states, config)
        n = len(warm_states)
        rows = []
        for d in per_layer:
            z = ops.linkage(d.double(), config.linkage)
            rows.append(_best_silhouette_cut(z, d, list(range(1, n)), config.tau)[1])
        self.per_layer = np.stack(rows)
        super().setup(warm_states, weights, config, groups)

    def layer_labels(self, n_layers, n):
        return self.per_layer


class FedTreeLoRA(Method):
    name, description = "fedtreelora", "FedTreeLoRA: one global tree, cut deeper at deeper layers; cluster + external experts"

    def setup(self, warm_states, weights, config, groups):
        import fedtreelora as ftl
        self.tree_config = ftl.TreeConfig(linkage=config.linkage, metric=config.metric, window=config.window, tau=config.tau)
        self.tree = ftl.build_tree(warm_states, config=self.tree_config)

    def aggregate(self, states, weights):
        import fedtreelora as ftl
        res = ftl.aggregate(states, weights=torch.as_tensor(weights, dtype=torch.float64), tree=self.tree,
                            config=self.tree_config)
        return list(zip(res.cluster_states, res.external_states))

    def summary(self):
        return {"n_clusters": [int(c) for c in np.asarray(self.tree.n_clusters).reshape(-1)],
                "labels": np.asarray(self.tree.labels).tolist()}

    def state(self):
        return {"tree": self.tree.to_dict()}

    def load_state(self, state, config):
        import fedtreelora as ftl
        self.tree = ftl.AggregationTree.from_dict(state["tree"])
        self.tree_config = self.tree.config


METHODS = {cls.name: cls for cls in (FedTreeLoRA, LocalOnly, FedIT, FedSA, FlatClusters, FedALT,
                                     FixedClusters, PerLayerClusters, OracleGroups)}
DEFAULT_METHODS = [name for name in METHODS if name != "oracle-groups"]


def make_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]()
