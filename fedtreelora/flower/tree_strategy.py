"""`FedTreeLoRA`: the drop-in for `FedAvg` in a PEFT ServerApp (the FlowerTune template).

It is `strategy.PersonalisedStrategy` (the round loop every FedTreeLoRA run shares) with FedTreeLoRA's
server rule, `federation.methods.FedTreeLoRA`, and FedAvg's argument names: the inherited
`Strategy.start(grid, initial_arrays, num_rounds, ...)` drives it and returns flwr's `Result`.

Rounds 1..warmup_rounds (warm-up): every available node trains from its own last upload (round 1:
`initial_arrays`); nothing is shared. After the last warm-up round's evaluation (which sees the
warm-up adapters) the global client tree is built over the latest uploads (`fedtreelora.build_tree`,
client names = node ids). Every later round each sampled node
receives its own cluster expert under "arrays" and its frozen external expert under "external"
(absent where its cluster is everyone at every layer); the replies are aggregated with
`fedtreelora.aggregate(..., tree=strategy.tree)` over every node's latest upload (a node not
sampled this round is represented by its last upload). `aggregate_train` returns the weighted mean
of the latest uploads as its ArrayRecord (what `Result.arrays` and `evaluate_fn` see) and the
weighted train metrics.

Failures: a node whose reply is an error, or that does not reply within `start`'s timeout, keeps
its previous experts and its last upload (logged on the `flwr.fedtreelora` logger). A node first
seen after warm-up starts from the global mean (logged); once it has uploaded it is placed into the
tree by `fedtreelora.extend_tree` where that exists, and otherwise keeps receiving the global mean.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..core import AggregationTree, TreeConfig
from ..core.aggregation import ROBUST_METHODS
from ..federation import methods
from ..federation.checkpoints import CheckpointError, RunFolderError
from .strategy import FEDERATED, WARMUP, ExpertsFn, PersonalisedStrategy, logger

__all__ = ["FedTreeLoRA", "WARMUP", "FEDERATED", "CHECKPOINT_FOLDER", "RunFolderError", "CheckpointError"]

CHECKPOINT_FOLDER = Path("checkpoints") / "strategy"   # under run_dir: state.json + round_XXX.safetensors


class FedTreeLoRA(PersonalisedStrategy):
    """Personalised federated LoRA over a global client tree, as a Flower Strategy.

    `PersonalisedStrategy` with the rule `federation.methods.FedTreeLoRA` (its `tree_config`,
    `clip_norm`, `robust`, `trim_ratio`), each node its own client, FedAvg's sample count.

    Parameters
    ----------
    tree_config : fedtreelora.TreeConfig
        Settings of the tree built after the last warm-up round (linkage, metric, window, tau, head).
    warmup_rounds : int
        Rounds of local training (>= 1) before the tree is built; `num_rounds` of `start` counts
        them too.
    fraction_train, fraction_evaluate : float
        Fraction of the connected nodes sampled for a federated training / evaluation round
        (FedAvg's meaning and count; warm-up training always uses every available node).
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        FedAvg's meaning: at least this many nodes sampled / connected before a round starts.
    weighted_by_key : str
        The MetricRecord key of every reply that weights its arrays and metrics.
    arrayrecord_key : str
        Message key of the node's cluster expert (and of its reply's adapter).
    external_key : str
        Message key of the node's frozen external expert.
    configrecord_key : str
        Message key of the ConfigRecord (with "server-round" and "phase" added).
    clip_norm : float or "median", optional
        Passed to `fedtreelora.aggregate` (per-segment norm clipping of the uploads).
    robust : {"mean", "trimmed_mean"}
        Passed to `fedtreelora.aggregate`.
    trim_ratio : float
        Passed to `fedtreelora.aggregate` for robust="trimmed_mean".
    seed : int
        Seed of the node sampling: the nodes of round r are drawn from (seed, r - 1) by
        `fedtreelora.federation.draws.draw_clients` over the sorted connected node ids, the draw
        `fedtreelora simulate` makes over its clients (FedAvg draws with Python's unseeded
        `random`). Sent to every node as "run-seed" in the ConfigRecord, from which
        `fedtreelora.flower.training_seed` derives the node's seed for the round.
    experts_fn : callable, optional
        Called at the end of every round (after its evaluation) as experts_fn(server_round, experts)
        with experts = {node id: (cluster state dict, external state dict or None)} for every node
        known so far (its own adapter during warm-up, the tree's experts from the end of warm-up on), in each node's own dtypes: the hook to save every node's adapter
        (FlowerTune's `evaluate_fn` sees only the global mean).
    run_dir : str or pathlib.Path, optional
        Folder of the run's checkpoint: at the end of every round (after evaluation, and after
        `start`'s `evaluate_fn`) the strategy commits its whole state to
        `run_dir/checkpoints/strategy/` (`fedtreelora.federation.checkpoints.commit_tensors`:
        SHA-256-checked safetensors, state.json replaced atomically). None: no checkpoints.
    resume : bool
        Continue the run committed in `run_dir` (a ServerApp restarted after a crash, or a run
        given more rounds): the stored tree, every node's experts, last upload, weight and dtypes,
        the metrics and the round counter are reloaded, not decided again. `start` then replays
        the committed rounds without contacting any node (their `Result` entries come from the
        checkpoint, `evaluate_fn` is not called for them) and trains from the next round on. The
        run's server-rule settings (`tree_config`, `warmup_rounds`, `clip_norm`, `robust`,
        `trim_ratio`, `weighted_by_key`) and the keys and shapes of `initial_arrays` must be the
        committed run's. With nothing committed yet, the run starts fresh.

    Attributes
    ----------
    tree : fedtreelora.AggregationTree or None
        The tree (client names: the node ids as strings); None during warm-up.
    failures : list of dict
        {"round", "node", "kind", "reason"} of every failed or missing reply.
    train_metrics, evaluate_metrics : dict
        Per round, {node id: metrics dict} of the replies that arrived (personalised evaluation).
    resumed_round : int
        The last round reloaded from `run_dir` (0: the run started fresh).

    Raises
    ------
    ValueError
        An argument outside its range (the message names it).
    fedtreelora.federation.checkpoints.RunFolderError
        From `start` (or round 1's `configure_train`): `run_dir` holds a run but `resume` is
        False, or it holds a run with other server-rule settings or other initial arrays (the
        message names the settings or the key).
    fedtreelora.federation.checkpoints.CheckpointError
        The committed checkpoint is truncated or corrupt (names the file).

    Examples
    --------
    >>> from fedtreelora import TreeConfig
    >>> from fedtreelora.flower import FedTreeLoRA
    >>> strategy = FedTreeLoRA(tree_config=TreeConfig(tau=0.2), warmup_rounds=2, fraction_train=0.5)
    >>> strategy.tree is None
    True

    In a ServerApp, exactly where FedAvg was::

        result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(get_peft_model_state_dict(model)),
                                num_rounds=10, train_config=ConfigRecord({"lr": 1e-4}))
        cluster, external = strategy.experts(node_id)

    A ServerApp that can be restarted: the same line with a run folder; after a crash, start it
    again with `resume=True` (the same `num_rounds`, or more)::

        strategy = FedTreeLoRA(tree_config=TreeConfig(), warmup_rounds=2, run_dir="runs/flower", resume=True)
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=10)   # continues after the last commit
    """

    # pylint: disable=too-many-arguments
    def __init__(self, tree_config: TreeConfig = TreeConfig(), warmup_rounds: int = 2, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, min_train_nodes: int = 2, min_evaluate_nodes: int = 2,
                 min_available_nodes: int = 2, weighted_by_key: str = "num-examples", arrayrecord_key: str = "arrays",
                 external_key: str = "external", configrecord_key: str = "config", clip_norm: float | str | None = None,
                 robust: str = "mean", trim_ratio: float = 0.1, seed: int = 0, experts_fn: ExpertsFn | None = None,
                 run_dir: str | Path | None = None, resume: bool = False) -> None:
        if not isinstance(tree_config, TreeConfig):
            raise TypeError(f"tree_config must be a fedtreelora.TreeConfig, got {type(tree_config).__name__}")
        if robust not in ROBUST_METHODS:
            raise ValueError(f"robust must be one of {ROBUST_METHODS}, got {robust!r}")
        if isinstance(trim_ratio, bool) or not isinstance(trim_ratio, (int, float)) or not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be a number in [0, 0.5), got {trim_ratio!r}")
        if clip_norm is not None and clip_norm != "median" and (
                isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not clip_norm > 0):
            raise ValueError(f'clip_norm must be None, "median" or a number > 0, got {clip_norm!r}')
        if run_dir is not None and not isinstance(run_dir, (str, Path)):
            raise TypeError(f"run_dir must be a str or a pathlib.Path, got {type(run_dir).__name__}")
        if resume is True and run_dir is None:
            raise ValueError("resume=True needs run_dir (the folder whose checkpoint the run continues)")
        self.tree_config = tree_config
        self.clip_norm, self.robust, self.trim_ratio = clip_norm, robust, trim_ratio
        self.run_dir = None if run_dir is None else Path(run_dir)
        rule = methods.FedTreeLoRA(tree_config, clip_norm=clip_norm, robust=robust, trim_ratio=trim_ratio)
        super().__init__(rule, warmup_rounds=warmup_rounds, fraction_train=fraction_train,
                         fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=min_evaluate_nodes, min_available_nodes=min_available_nodes,
                         weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key, external_key=external_key,
                         configrecord_key=configrecord_key, seed=seed, experts_fn=experts_fn,
                         checkpoint_dir=None if run_dir is None else Path(run_dir) / CHECKPOINT_FOLDER, resume=resume)

    @property
    def tree(self) -> AggregationTree | None:
        """The client tree (client names: the node ids as strings); None during warm-up."""
        return self.rule.tree

    def _settings(self) -> dict:
        return {"tree_config": asdict(self.tree_config), **super()._settings(), "clip_norm": self.clip_norm,
                "robust": self.robust, "trim_ratio": self.trim_ratio}

    def _extra_info(self) -> dict:
        return {"tree": None if self.tree is None else self.tree.to_dict()}

    def _decision_note(self) -> str:
        return f"; clusters per layer {[int(c) for c in self.tree.n_clusters.tolist()]}"

    def summary(self) -> None:
        """Log the strategy's settings."""
        cfg = self.tree_config
        logger.info("\t├──> FedTreeLoRA: %d warm-up round(s), then personalised rounds", self.warmup_rounds)
        logger.info("\t│\t├── Tree: %s linkage, %s distance, window %d, tau %s, head %s", cfg.linkage, cfg.metric,
                    cfg.window, cfg.tau, cfg.head)
        logger.info("\t│\t└── Aggregation: %s%s, clip_norm %s", self.robust,
                    f" (trim {self.trim_ratio})" if self.robust != "mean" else "", self.clip_norm)
        logger.info("\t├──> Sampling: fraction train %.2f | evaluate %.2f; min nodes train %d | evaluate %d | "
                    "available %d", self.fraction_train, self.fraction_evaluate, self.min_train_nodes,
                    self.min_evaluate_nodes, self.min_available_nodes)
        logger.info("\t├──> Keys: weighted by '%s', arrays '%s', external '%s', config '%s'", self.weighted_by_key,
                    self.arrayrecord_key, self.external_key, self.configrecord_key)
        logger.info("\t└──> Checkpoints: %s", "none" if self.checkpoint_dir is None else
                    f"{self.checkpoint_dir}{' (resume)' if self.resume else ''}")
