"""The methods compared by `fedtreelora simulate`: one small class per server rule.

Every method starts from the same warm-up (local training of every client), then each round turns
the clients' uploaded adapters into, per client, a cluster expert (what the client trains, loaded
into PEFT's adapter) and an optional frozen external expert mixed in by `ExpertMixer`. Training and
evaluation are shared (`client.LocalTrainer`); only `setup` (after warm-up), `aggregate` and
`extend` (clients that join later) differ. `fedtreelora.flower.strategy.PersonalisedStrategy` runs
any of them, in `fedtreelora simulate` and on Flower alike; the clients come in a fixed order (a
list), named by `names` where a rule keeps names (FedTreeLoRA's tree).
"""
from __future__ import annotations

import numpy as np
import torch

from ..core import AggregationTree, aggregate, build_tree, choose_cuts, client_distances, group_experts, ops
from ..core.adapters import parse_layout
from .data import super_group_of

Experts = list[tuple[dict, "dict | None"]]


class Method:
    name = ""
    description = ""
    fixed_lam: float | None = None   # lam held at this value instead of learnt (the mixing ablation)
    mixing = True                    # the clients receive an external expert to mix in
    searches_cuts = False            # reads tau (and window, but per-layer clustering): a cut search decides its partitions

    @property
    def learns_lam(self) -> bool:
        """Whether the clients learn lam (so `mixing_lr` and `mixing_init` matter to the method)."""
        return self.mixing and self.fixed_lam is None

    def setup(self, warm_states: list[dict], weights: np.ndarray, config, groups: np.ndarray,
              names: list[str] | None = None) -> None:
        """Called after warm-up with the clients' adapters (and the true groups, for oracles only);
        `names` are the clients' names, in order."""

    def aggregate(self, states: list[dict], weights: np.ndarray) -> Experts:
        raise NotImplementedError

    def extend(self, old_states: list[dict], new_states: list[dict], weights: np.ndarray, groups: np.ndarray,
               names: list[str] | None = None) -> None:
        """Clients that join after set-up (`late_clients`): place them without deciding again.
        `weights` and `groups` cover the old clients, then the new; `names` are the new clients'."""
        raise NotImplementedError(f"method {self.name!r} cannot take clients that join late")

    def summary(self) -> dict:
        return {}

    def state(self) -> dict:
        """What setup() decided, JSON-able: a resumed run reloads it instead of re-deciding."""
        return {}

    def load_state(self, state: dict, config) -> None:
        self.config = config


def nearest_clusters(d: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """For each client after the first len(labels) of d [N+M, N+M], the cluster of the first N whose
    members are nearest on average (the average-linkage rule)."""
    n = len(labels)
    dd = d[n:, :n].double().numpy()
    clusters = np.unique(labels)
    means = np.stack([dd[:, labels == c].mean(1) for c in clusters], axis=1)   # [M, C]
    return clusters[means.argmin(1)]


class _Segmented(Method):
    """Methods defined by a partition of the clients per transformer layer (the head follows the
    deepest layer's, or the config's `head` setting).

    `placement` says how a late client is placed: "rule" (the method's rule for N + M clients),
    "mean" (the nearest cluster under the mean B distance, at every layer) or "layer" (the nearest
    cluster of each layer under that layer's B distance)."""
    mixing = False
    placement = "rule"

    def layer_labels(self, n_layers: int, n: int) -> np.ndarray:
        raise NotImplementedError

    def setup(self, warm_states, weights, config, groups, names=None):
        self.config = config
        n_layers = len(parse_layout(warm_states[:1]).layers)
        self.labels = np.asarray(self.layer_labels(n_layers, len(warm_states)), dtype=np.int64)

    def head_labels(self, n: int) -> np.ndarray | None:
        """The head's partition under the config's `head` setting (None: the deepest layer's)."""
        policy = getattr(self.config, "head", "deepest")
        return {"deepest": None, "local": np.arange(n), "global": np.zeros(n, dtype=np.int64)}[policy]

    def experts(self, states, weights) -> Experts:
        return group_experts(states, self.labels, torch.as_tensor(weights, dtype=torch.float64),
                             head_labels=self.head_labels(len(states)))

    def aggregate(self, states, weights):
        experts = self.experts(states, weights)
        return experts if self.mixing else [(cluster, None) for cluster, _ in experts]

    def extend(self, old_states, new_states, weights, groups, names=None):
        n_old, n = len(old_states), len(old_states) + len(new_states)
        if self.placement == "rule":
            self.groups = np.asarray(groups)
            self.labels = np.asarray(self.layer_labels(self.labels.shape[0], n), dtype=np.int64)
            return
        per_layer, mean = client_distances(list(old_states) + list(new_states), self.config.metric)
        if self.placement == "mean":
            new = np.tile(nearest_clusters(mean, self.labels[0][:n_old]), (self.labels.shape[0], 1))
        else:
            new = np.stack([nearest_clusters(d, row[:n_old]) for d, row in zip(per_layer, self.labels)])
        self.labels = np.concatenate([self.labels[:, :n_old], new], axis=1)

    def summary(self):
        return {"n_clusters": [int(len(set(row))) for row in self.labels], "labels": self.labels.tolist()}

    def state(self):
        return {"labels": self.labels.tolist()}

    def load_state(self, state, config):
        self.config = config
        self.labels = np.asarray(state["labels"], dtype=np.int64)


class LocalOnly(_Segmented):
    name, description = "local", "every client keeps its own LoRA and head (no sharing)"

    def layer_labels(self, n_layers, n):
        return np.tile(np.arange(n), (n_layers, 1))

    def head_labels(self, n):   # no sharing whatever the `head` setting says
        return None


class FedIT(_Segmented):
    name, description = "fedit", "FedIT: FedAvg of LoRA and head over all clients (the head: per the `head` setting)"

    def layer_labels(self, n_layers, n):
        return np.zeros((n_layers, n))


class OracleGroups(_Segmented):
    name, description = "oracle-groups", "FedAvg inside the true planted groups (told the groups; a reference)"

    def setup(self, warm_states, weights, config, groups, names=None):
        self.groups = np.asarray(groups)
        super().setup(warm_states, weights, config, groups)

    def layer_labels(self, n_layers, n):
        return np.tile(self.groups[:n], (n_layers, 1))


class OracleTree(_Segmented):
    """FedAvg over the true hierarchy, told it: every client shares the shallow third of the layers
    (a trunk), the planted super-groups share the middle third, the planted groups the deep third
    (6 layers: cuts 1, 1, S, S, G, G); the deepest layer always follows the groups, and so does the
    head under `head: deepest`. Without super-groups (and for prompt datasets, whose groups are not
    nested) the middle third follows the groups. A reference, like `oracle-groups`: one fixed split
    of the layers, no external expert, so FedTreeLoRA, whose trunk can be deeper, may beat it.
    `oracle-tree` minus `oracle-groups` is what this trunk is worth in a setting, apart from whether
    a method finds it."""
    name, description = "oracle-tree", ("FedAvg over the true hierarchy (told it): all clients at the shallow third "
                                        "of the layers, super-groups at the middle third, groups at the deep third "
                                        "(a reference for what a trunk is worth)")

    def setup(self, warm_states, weights, config, groups, names=None):
        self.groups = np.asarray(groups)
        super().setup(warm_states, weights, config, groups)

    def layer_labels(self, n_layers, n):
        groups = self.groups[:n]
        nested = self.config.task == "classification"   # data.partition nests groups; partition_by_group does not
        n_super = self.config.super_group_count if nested else 0
        supers = super_group_of(groups, self.config.num_groups, n_super) if n_super > 1 else groups
        levels = (np.zeros_like(groups), supers, groups)
        thirds = [3 * layer // n_layers for layer in range(n_layers)]
        thirds[-1] = 2
        return np.stack([levels[t] for t in thirds])


class FedSA(_Segmented):
    name, description = "fedsa", "FedSA-LoRA: A factors averaged over all clients, B factors and head local (the head: per the `head` setting)"

    def layer_labels(self, n_layers, n):
        return np.tile(np.arange(n), (n_layers, 1))

    def experts(self, states, weights):  # A factors of every layer shared by all, B factors and head local
        return group_experts(states, self.labels, torch.as_tensor(weights, dtype=torch.float64),
                             a_labels=np.zeros_like(self.labels), head_labels=self.head_labels(len(states)))


class FedALT(_Segmented):
    name, description = "fedalt", "FedALT-style: own LoRA plus a frozen rest-of-world LoRA, learnable mixing"
    mixing = True

    def layer_labels(self, n_layers, n):
        return np.tile(np.arange(n), (n_layers, 1))


def _global_linkage(states, config):
    per_layer, mean = client_distances(states, config.metric)
    return per_layer, mean, ops.linkage(mean, config.linkage)


class _OnePartition(_Segmented):
    """Methods that decide one partition of the clients (`self.partition`) and use it at every layer."""
    placement = "mean"

    def layer_labels(self, n_layers, n):
        return np.tile(self.partition, (n_layers, 1))


class FlatClusters(_OnePartition):
    name, description = "flat", "FedLEASE-style flat clustering: one partition (best silhouette) for all layers"

    def setup(self, warm_states, weights, config, groups, names=None):
        _, mean, z = _global_linkage(warm_states, config)   # the best-silhouette cut of the tree, any count >= 2
        self.partition = choose_cuts(mean[None], z, window=None, tau=None)[1][0].numpy()
        super().setup(warm_states, weights, config, groups)


class FixedClusters(_OnePartition):
    name, description = "ablation-fixed", "ablation: the global tree cut into `fixed_clusters` clusters at every layer, with experts"
    mixing = True

    def setup(self, warm_states, weights, config, groups, names=None):
        _, _, z = _global_linkage(warm_states, config)
        c = min(max(config.fixed_clusters, 1), len(warm_states))
        self.partition = ops.cut_tree(z, torch.tensor([c], dtype=torch.int64))[0].numpy()
        super().setup(warm_states, weights, config, groups)


class PerLayerClusters(_Segmented):
    name, description = "ablation-perlayer", "ablation: each layer clustered on its own distances (no global tree, no nesting), with experts"
    mixing = True
    searches_cuts = True

    placement = "layer"

    def setup(self, warm_states, weights, config, groups, names=None):
        per_layer, _ = client_distances(warm_states, config.metric)
        rows = [choose_cuts(d[None], ops.linkage(d, config.linkage), window=None, tau=config.tau)[1][0].numpy()
                for d in per_layer]   # each layer its own tree and best cut, one cluster scoring tau
        self.per_layer = np.stack(rows)
        super().setup(warm_states, weights, config, groups)

    def layer_labels(self, n_layers, n):
        return self.per_layer


class FedTreeLoRA(Method):
    """FedTreeLoRA's server rule: `setup` builds the global tree (after warm-up), `aggregate` turns
    the latest uploads into every client's cluster and external expert with that tree, `extend`
    places late clients into it.

    Parameters
    ----------
    tree_config : fedtreelora.TreeConfig, optional
        The tree's settings; None: the experiment config's (`ExperimentConfig.tree_config()`).
    **aggregate_options
        More arguments of `fedtreelora.aggregate` (clip_norm, robust, trim_ratio).
    """
    name, description = "fedtreelora", "FedTreeLoRA: one global tree, cut deeper at deeper layers; cluster + external experts"
    searches_cuts = True

    def __init__(self, tree_config=None, **aggregate_options):
        self.settings = tree_config                     # what `setup` builds with (None: the config's)
        self.aggregate_options = aggregate_options
        self.tree: AggregationTree | None = None
        self.tree_config = None

    def setup(self, warm_states, weights, config, groups, names=None):
        tree_config = self.settings if self.settings is not None else config.tree_config()
        self.decide(dict(zip(names, warm_states)) if names is not None else warm_states, tree_config)

    def decide(self, states, tree_config) -> AggregationTree:
        """Build the tree over `states` (a list, or a dict client name -> state dict) with `tree_config`."""
        self.tree_config = tree_config
        self.tree = build_tree(states, config=tree_config)
        return self.tree

    def expert_result(self, states, weights):
        """`core.aggregate` of `states` with the stored tree (an `AggregationResult`, keyed like `states`)."""
        return aggregate(states, weights=weights, tree=self.tree, config=self.tree_config, **self.aggregate_options)

    def aggregate(self, states, weights):
        res = self.expert_result(states, torch.as_tensor(weights, dtype=torch.float64))
        return list(zip(res.cluster_states, res.external_states))

    def extend(self, old_states, new_states, weights=None, groups=None, names=None):
        import fedtreelora   # the library's public extend_tree: a build without one cannot place late clients
        extend_tree = getattr(fedtreelora, "extend_tree", None)
        if extend_tree is None:
            raise NotImplementedError("this fedtreelora has no extend_tree")
        if names is not None and self.tree.client_names is not None:
            old_states = dict(zip(self.tree.client_names, old_states))
            new_states = dict(zip(names, new_states))
        self.tree = extend_tree(self.tree, old_states, new_states)   # each new client layer by layer, nested

    def summary(self):
        return {"n_clusters": [int(c) for c in np.asarray(self.tree.n_clusters).reshape(-1)],
                "labels": np.asarray(self.tree.labels).tolist()}

    def state(self):
        return {"tree": self.tree.to_dict()}

    def load_state(self, state, config):
        self.config = config
        self.use_tree(AggregationTree.from_dict(state["tree"]))

    def use_tree(self, tree: AggregationTree | None) -> None:
        """Continue with a stored tree (a resumed run): it is not decided again."""
        self.tree = tree
        self.tree_config = None if tree is None else tree.config


class FixedLamOne(FedTreeLoRA):
    name, description = "ablation-lam1", "ablation: FedTreeLoRA with lam fixed at 1 (the cluster expert alone, no external expert)"
    mixing = False

    def aggregate(self, states, weights):
        return [(cluster, None) for cluster, _ in super().aggregate(states, weights)]


class FixedLamHalf(FedTreeLoRA):
    name, description = "ablation-lam05", "ablation: FedTreeLoRA with lam fixed at 0.5 (cluster and external experts averaged)"
    fixed_lam = 0.5


METHODS = {cls.name: cls for cls in (FedTreeLoRA, LocalOnly, FedIT, FedSA, FlatClusters, FedALT,
                                     FixedClusters, PerLayerClusters, FixedLamOne, FixedLamHalf, OracleGroups,
                                     OracleTree)}
# `fedtreelora simulate` with no --methods: the method against no sharing and against one global
# adapter, which fits 10 minutes on 2 cores; the other baselines and ablations on request.
DEFAULT_METHODS = ["fedtreelora", "local", "fedit"]


def make_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]()
