"""`FedTreeLoRA`: a Flower `Strategy` that gives every node its own LoRA experts.

Drop-in for `FedAvg` in a PEFT ServerApp (the FlowerTune template): the inherited
`Strategy.start(grid, initial_arrays, num_rounds, ...)` drives it and returns flwr's `Result`.

Rounds 1..warmup_rounds (warm-up): every available node trains from its own last upload (round 1:
`initial_arrays`); nothing is shared. At the end of warm-up the global client tree is built over the
uploads (`fedtreelora.build_tree`, client names = node ids). Every later round each sampled node
receives its own cluster expert under "arrays" and its frozen external expert under "external"
(absent where its cluster is everyone at every layer); the replies are aggregated with
`fedtreelora.aggregate(..., tree=strategy.tree)` over every node's latest upload (a node not
sampled this round is represented by its last upload). `aggregate_train` returns the weighted mean
of the latest uploads as its ArrayRecord (what `Result.arrays` and `evaluate_fn` see) and the
weighted train metrics. The server rule itself (build the tree, experts with the stored tree, place
late nodes' clusters) is `fedtreelora.federation.methods.FedTreeLoRA`, the object `fedtreelora
simulate` runs too.

Failures: a node whose reply is an error, or that does not reply within `start`'s timeout, keeps
its previous experts and its last upload (logged on the `flwr.fedtreelora` logger). A node first
seen after warm-up starts from the global mean (logged); once it has uploaded it is placed into the
tree by `fedtreelora.extend_tree` where that exists, and otherwise keeps receiving the global mean.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords, sample_nodes

import fedtreelora

from ..core import AggregationTree, TreeConfig
from ..core.aggregation import ROBUST_METHODS
from ..federation import methods
from ..federation.checkpoints import CheckpointError, RunFolderError, commit_tensors, load_tensors
from ..federation.draws import EVALUATE_DRAW, TRAIN_DRAW, draw_clients
from .arrays import DTYPE_RECORD, from_arrayrecord, read_dtypes, to_arrayrecord

__all__ = ["FedTreeLoRA", "WARMUP", "FEDERATED", "CHECKPOINT_FOLDER", "RunFolderError", "CheckpointError"]

logger = logging.getLogger("flwr").getChild("fedtreelora")

WARMUP, FEDERATED = "warmup", "federated"
CHECKPOINT_FOLDER = Path("checkpoints") / "strategy"   # under run_dir: state.json + round_XXX.safetensors
CHECKPOINT_FORMAT = "fedtreelora.flower.FedTreeLoRA/1"
# the settings a resumed run must share with the run it continues (the server rule); sampling and keys may change
RULE_SETTINGS = ("tree_config", "warmup_rounds", "clip_norm", "robust", "trim_ratio", "weighted_by_key")
StateDict = dict[str, torch.Tensor]
ExpertsFn = Callable[[int, dict[int, tuple[StateDict, "StateDict | None"]]], None]


class FedTreeLoRA(Strategy):
    """Personalised federated LoRA over a global client tree, as a Flower Strategy.

    Parameters
    ----------
    tree_config : fedtreelora.TreeConfig
        Settings of the tree built at the end of warm-up (linkage, metric, window, tau, head).
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
        Called at the end of every `aggregate_train` as experts_fn(server_round, experts) with
        experts = {node id: (cluster state dict, external state dict or None)} for every node
        known so far, in each node's own dtypes: the hook to save every node's adapter
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
        if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 1:
            raise ValueError(f"warmup_rounds must be an integer >= 1 (the tree is built on warm-up uploads), "
                             f"got {warmup_rounds!r}")
        for name, value in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        for name, value in (("min_train_nodes", min_train_nodes), ("min_evaluate_nodes", min_evaluate_nodes),
                            ("min_available_nodes", min_available_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        keys = {"arrayrecord_key": arrayrecord_key, "external_key": external_key, "configrecord_key": configrecord_key,
                "weighted_by_key": weighted_by_key}
        for name, value in keys.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if arrayrecord_key == external_key:
            raise ValueError(f"arrayrecord_key and external_key must differ, both are {arrayrecord_key!r}")
        if robust not in ROBUST_METHODS:
            raise ValueError(f"robust must be one of {ROBUST_METHODS}, got {robust!r}")
        if isinstance(trim_ratio, bool) or not isinstance(trim_ratio, (int, float)) or not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be a number in [0, 0.5), got {trim_ratio!r}")
        if clip_norm is not None and clip_norm != "median" and (
                isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not clip_norm > 0):
            raise ValueError(f'clip_norm must be None, "median" or a number > 0, got {clip_norm!r}')
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if experts_fn is not None and not callable(experts_fn):
            raise TypeError(f"experts_fn must be callable, got {type(experts_fn).__name__}")
        if run_dir is not None and not isinstance(run_dir, (str, Path)):
            raise TypeError(f"run_dir must be a str or a pathlib.Path, got {type(run_dir).__name__}")
        if not isinstance(resume, bool):
            raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
        if resume and run_dir is None:
            raise ValueError("resume=True needs run_dir (the folder whose checkpoint the run continues)")
        self.tree_config = tree_config
        self.warmup_rounds = warmup_rounds
        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_train_nodes = 0 if self.fraction_train == 0.0 else min_train_nodes
        self.min_evaluate_nodes = 0 if self.fraction_evaluate == 0.0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.external_key = external_key
        self.configrecord_key = configrecord_key
        self.clip_norm = clip_norm
        self.robust = robust
        self.trim_ratio = trim_ratio
        self.seed = seed
        self.experts_fn = experts_fn
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.resume = resume
        self._in_start = False
        self._evaluate_fn_commits = False
        self._reset()

    @property
    def tree(self) -> AggregationTree | None:
        """The client tree (client names: the node ids as strings); None during warm-up."""
        return self._rule.tree

    def _reset(self) -> None:
        # the server rule: the same object `fedtreelora simulate` runs (federation.methods.FedTreeLoRA)
        self._rule = methods.FedTreeLoRA(clip_norm=self.clip_norm, robust=self.robust, trim_ratio=self.trim_ratio)
        self.failures: list[dict] = []
        self.train_metrics: dict[int, dict[int, dict]] = {}
        self.evaluate_metrics: dict[int, dict[int, dict]] = {}
        self._initial: StateDict | None = None
        self._uploads: dict[int, StateDict] = {}          # node -> latest upload (wire dtypes)
        self._weights: dict[int, float] = {}              # node -> latest weight
        self._dtypes: dict[int, dict[str, torch.dtype]] = {}   # node -> keys cast for the wire, own dtype
        self._experts: dict[int, tuple[StateDict, StateDict | None]] = {}
        self._global: StateDict | None = None
        self._outside: set[int] = set()                   # nodes with an upload but no place in the tree
        self._warned_late: set[int] = set()
        self._sent: dict[str, set[int]] = {}
        self.resumed_round = 0
        self._aggregated: dict[str, dict[int, dict]] = {"train": {}, "evaluate": {}, "serverapp": {}}

    # -- public ---------------------------------------------------------------------------------
    def experts(self, node_id: int) -> tuple[StateDict, StateDict | None]:
        """(cluster expert, external expert or None) of a node, as state dicts in its own dtypes.

        Raises
        ------
        KeyError
            A node the strategy has no experts for (never answered a training round).
        """
        node_id = int(node_id)
        if node_id not in self._experts:
            raise KeyError(f"node {node_id} has no experts (nodes with experts: {sorted(self._experts)[:20]})")
        cluster, external = self._experts[node_id]
        dtypes = self._dtypes.get(node_id, {})
        return _restore(cluster, dtypes), (None if external is None else _restore(external, dtypes))

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
        logger.info("\t└──> Checkpoints: %s", "none" if self.run_dir is None else
                    f"{self.run_dir / CHECKPOINT_FOLDER}{' (resume)' if self.resume else ''}")

    # -- the run ------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """flwr's `Strategy.start`, after loading `run_dir`'s checkpoint when resuming.

        Parameters and return value are flwr's (see `flwr.serverapp.strategy.Strategy.start`);
        `num_rounds` counts the warm-up rounds and, on resume, the committed ones. When resuming,
        the committed rounds are replayed from the checkpoint (no node is contacted, `evaluate_fn`
        is not called for them) so that `Result` covers every round.
        """
        self._begin(initial_arrays)
        if self.resumed_round >= num_rounds:
            logger.warning("run_dir %s has round %d committed, num_rounds is %d: nothing left to train",
                           self.run_dir, self.resumed_round, num_rounds)
        self._in_start, self._evaluate_fn_commits = True, evaluate_fn is not None
        try:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                 None if evaluate_fn is None else self._replaying(evaluate_fn))
        finally:
            self._in_start, self._evaluate_fn_commits = False, False

    def _begin(self, initial_arrays: ArrayRecord) -> None:
        """A run's start: fresh state, then `run_dir`'s checkpoint when resuming."""
        self._reset()
        self._initial = from_arrayrecord(initial_arrays)
        if self.run_dir is None:
            return
        folder = self.run_dir / CHECKPOINT_FOLDER
        loaded = load_tensors(folder)
        if loaded is None:
            if self.resume:
                logger.info("run_dir %s holds no committed round: the run starts fresh", self.run_dir)
            return
        info, tensors = loaded
        if info.get("format") != CHECKPOINT_FORMAT:
            raise RunFolderError(f"{folder} holds a checkpoint of another kind (format {info.get('format')!r}, "
                                 f"expected {CHECKPOINT_FORMAT!r}); use another run_dir")
        if not self.resume:
            raise RunFolderError(f"run_dir {self.run_dir} already holds a FedTreeLoRA run (round {info['round']} "
                                 "committed): pass resume=True to continue it, or use another run_dir")
        self._load_state(info, tensors, folder)

    def _replaying(self, evaluate_fn):
        """`evaluate_fn` that answers committed rounds from the checkpoint, records the others and commits them."""
        def wrapped(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if self.resumed_round and server_round <= self.resumed_round:
                stored = self._aggregated["serverapp"].get(server_round)
                return None if stored is None else MetricRecord(stored)
            res = evaluate_fn(server_round, arrays)
            if res is not None:
                self._aggregated["serverapp"][server_round] = dict(res)
            if server_round >= 1:
                self._commit(server_round)
            return res
        return wrapped

    def _replayed(self, server_round: int) -> bool:
        return server_round <= self.resumed_round

    # -- train ----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Messages of a training round: warm-up, every available node its own last upload; later, every
        sampled node its own cluster expert (and external expert). None for a round replayed from
        the checkpoint."""
        if (server_round == 1 and not self._in_start) or self._initial is None:
            self._begin(arrays)
        if self._replayed(server_round):
            logger.info("configure_train: round %d was committed before the restart: replayed from %s", server_round,
                        self.run_dir / CHECKPOINT_FOLDER)
            return []
        warmup = server_round <= self.warmup_rounds
        if warmup:
            available = len(list(grid.get_node_ids()))
            node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(available, self.min_train_nodes))
            node_ids = sorted(node_ids)
        else:
            node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, server_round, TRAIN_DRAW)
        logger.info("configure_train: round %d (%s), %d node(s)", server_round, WARMUP if warmup else FEDERATED,
                    len(node_ids))
        self._sent["train"] = set(node_ids)
        return [self._message(node, server_round, config, MessageType.TRAIN) for node in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store the uploads, build the tree (end of warm-up) or aggregate with it; return the weighted
        global mean of the latest uploads and the weighted train metrics."""
        if self._replayed(server_round):
            list(replies)
            stored = self._aggregated["train"].get(server_round)
            arrays = to_arrayrecord(self._global) if server_round == self.resumed_round and self._global else None
            return arrays, None if stored is None else MetricRecord(stored)
        arrived, contents = self._collect(server_round, replies, "train")
        for node, content in arrived.items():
            record = _one_arrayrecord(content, node)
            self._uploads[node] = from_arrayrecord(record)
            self._dtypes[node] = read_dtypes(content.config_records.get(DTYPE_RECORD))
            self._weights[node] = _weight(content, node, self.weighted_by_key)
        failed = self._sent.pop("train", set()) - set(arrived)
        if not self._uploads:
            logger.warning("round %d: no node has uploaded anything yet; nothing to aggregate", server_round)
            return None, None
        self._global = self._weighted_mean(self._uploads)
        if server_round < self.warmup_rounds:
            self._experts = {node: (upload, None) for node, upload in self._uploads.items()}   # local: its own
        else:
            if self.tree is None:
                self._build_tree(server_round)
            self._place_late_nodes()
            # a failed node keeps its personalised experts; in the round that builds the tree it had only its own
            self._aggregate(failed if server_round > self.warmup_rounds else set())
        if self.experts_fn is not None:
            self.experts_fn(server_round, {node: self.experts(node) for node in sorted(self._experts)})
        metrics = aggregate_metricrecords(contents, self.weighted_by_key) if contents else None
        if metrics is not None:
            self._aggregated["train"][server_round] = dict(metrics)
        return to_arrayrecord(self._global), metrics

    def _build_tree(self, server_round: int) -> None:
        nodes = sorted(self._uploads)
        self._rule.decide({str(n): self._uploads[n] for n in nodes}, self.tree_config)
        self._outside = set()
        logger.info("round %d: client tree built over %d node(s); clusters per layer %s", server_round, len(nodes),
                    [int(c) for c in self.tree.n_clusters.tolist()])

    def _tree_nodes(self) -> list[int]:
        return [int(name) for name in self.tree.client_names]

    def _place_late_nodes(self) -> None:
        inside = set(self._tree_nodes())
        late = sorted(set(self._uploads) - inside)
        if not late:
            return
        extend = getattr(fedtreelora, "extend_tree", None)
        if extend is None:
            for node in late:
                if node not in self._outside:
                    logger.warning("node %d first uploaded after warm-up: fedtreelora has no extend_tree, so it "
                                   "gets the global mean (no cluster, no external expert)", node)
            self._outside.update(late)
            return
        self._rule.use_tree(extend(self.tree, {str(n): self._uploads[n] for n in self._tree_nodes()},
                                   {str(n): self._uploads[n] for n in late}))
        self._outside.difference_update(late)
        for node in late:
            logger.info("node %d placed into the tree (clusters %s)", node,
                        self.tree.labels[:, self.tree.client_names.index(str(node))].tolist())

    def _aggregate(self, failed: set[int]) -> None:
        nodes = self._tree_nodes()
        states = _common_dtypes({str(n): self._uploads[n] for n in nodes})
        res = self._rule.expert_result(states, {str(n): self._weights[n] for n in nodes})
        for node in nodes:
            if node in failed and node in self._experts:
                continue                                         # keeps its previous experts
            self._experts[node] = (res.cluster_states[str(node)], res.external_states[str(node)])
        for node in self._outside:
            if node not in failed or node not in self._experts:
                self._experts[node] = (self._global, None)

    # -- evaluate -------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Messages of an evaluation round: every sampled node its own current experts."""
        if self._replayed(server_round):
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, EVALUATE_DRAW)
        self._sent["evaluate"] = set(node_ids)
        return [self._message(node, server_round, config, MessageType.EVALUATE) for node in node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The weighted mean of the nodes' (personalised) evaluation metrics; per node in `evaluate_metrics`.
        The end of the round: with `run_dir`, the round is committed here (or after `start`'s
        `evaluate_fn`, when there is one)."""
        if self._replayed(server_round):
            list(replies)
            stored = self._aggregated["evaluate"].get(server_round)
            return None if stored is None else MetricRecord(stored)
        arrived, contents = self._collect(server_round, replies, "evaluate")
        self._sent.pop("evaluate", None)
        metrics = aggregate_metricrecords(contents, self.weighted_by_key) if contents else None
        if metrics is not None:
            self._aggregated["evaluate"][server_round] = dict(metrics)
        if not self._evaluate_fn_commits:
            self._commit(server_round)
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"tree_config": asdict(self.tree_config), "warmup_rounds": self.warmup_rounds,
                "clip_norm": self.clip_norm, "robust": self.robust, "trim_ratio": self.trim_ratio,
                "weighted_by_key": self.weighted_by_key}

    def _commit(self, server_round: int) -> None:
        """Commit the strategy's whole state after `server_round` to run_dir (nothing without one)."""
        if self.run_dir is None or self._initial is None:
            return
        tensors = {f"initial/{k}": v for k, v in self._initial.items()}
        if self._global is not None:
            tensors.update({f"global/{k}": v for k, v in self._global.items()})
        for node, upload in self._uploads.items():
            tensors.update({f"upload/{node}/{k}": v for k, v in upload.items()})
        for node, (cluster, external) in self._experts.items():
            tensors.update({f"cluster/{node}/{k}": v for k, v in cluster.items()})
            tensors.update({f"external/{node}/{k}": v for k, v in (external or {}).items()})
        table = lambda t: {str(r): {str(n): m for n, m in per.items()} for r, per in t.items()}   # noqa: E731
        info = {"format": CHECKPOINT_FORMAT, "settings": self._settings(),
                "tree": None if self.tree is None else self.tree.to_dict(),
                "weights": {str(n): w for n, w in self._weights.items()},
                "dtypes": {str(n): {k: str(d).removeprefix("torch.") for k, d in dt.items()}
                           for n, dt in self._dtypes.items()},
                "experts": {str(n): external is not None for n, (_, external) in self._experts.items()},
                "uploads": sorted(self._uploads), "outside": sorted(self._outside),
                "warned_late": sorted(self._warned_late), "failures": self.failures,
                "train_metrics": table(self.train_metrics), "evaluate_metrics": table(self.evaluate_metrics),
                "aggregated": {kind: {str(r): m for r, m in per.items()} for kind, per in self._aggregated.items()}}
        commit_tensors(self.run_dir / CHECKPOINT_FOLDER, server_round, tensors, info)

    def _load_state(self, info: dict, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        """The state `_commit` wrote, after checking that this run may continue it."""
        saved, now = info.get("settings", {}), json_round_trip(self._settings())
        differ = [name for name in RULE_SETTINGS if saved.get(name) != now[name]]
        if differ:
            detail = "; ".join(f"{name}: committed {saved.get(name)!r}, now {now[name]!r}" for name in differ)
            raise RunFolderError(f"run_dir {self.run_dir} holds a run with other settings ({detail}); resume it with "
                                 "the settings it was started with, or use another run_dir")
        parts: dict[str, dict] = {}
        try:
            for name, v in tensors.items():
                kind, rest = name.split("/", 1)
                if kind in ("upload", "cluster", "external"):
                    node, key = rest.split("/", 1)
                    parts.setdefault(kind, {}).setdefault(int(node), {})[key] = v
                else:
                    parts.setdefault(kind, {})[rest] = v
            initial = parts.get("initial", {})
            for key, value in self._initial.items():
                if key not in initial:
                    raise RunFolderError(f"initial_arrays has key {key!r} that the run in {self.run_dir} did not have")
                if initial[key].shape != value.shape or initial[key].dtype != value.dtype:
                    raise RunFolderError(f"initial_arrays key {key!r} is {value.dtype} {tuple(value.shape)}, the run in "
                                         f"{self.run_dir} had {initial[key].dtype} {tuple(initial[key].shape)}")
            extra = sorted(set(initial) - set(self._initial))
            if extra:
                raise RunFolderError(f"initial_arrays lacks key {extra[0]!r} of the run in {self.run_dir} "
                                     f"({len(extra)} missing)")
            if any(not torch.equal(initial[k], self._initial[k]) for k in initial):
                logger.warning("initial_arrays differ in value from the committed run's: the committed ones are kept")
            self._initial = initial
            self._global = parts.get("global") or None
            self._uploads = {int(n): parts["upload"][int(n)] for n in info["uploads"]}
            self._weights = {int(n): float(w) for n, w in info["weights"].items()}
            self._dtypes = {int(n): {k: getattr(torch, d) for k, d in dt.items()} for n, dt in info["dtypes"].items()}
            self._experts = {int(n): (parts.get("cluster", {}).get(int(n), {}),
                                      parts["external"][int(n)] if has_external else None)
                             for n, has_external in info["experts"].items()}
            self._rule.use_tree(None if info["tree"] is None else AggregationTree.from_dict(info["tree"]))
            self._outside, self._warned_late = set(info["outside"]), set(info["warned_late"])
            self.failures = list(info["failures"])
            self.train_metrics, self.evaluate_metrics = (
                {int(r): {int(n): m for n, m in per.items()} for r, per in info[t].items()}
                for t in ("train_metrics", "evaluate_metrics"))
            self._aggregated = {kind: {int(r): m for r, m in per.items()} for kind, per in info["aggregated"].items()}
            self.resumed_round = int(info["round"])
        except (KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, RunFolderError):
                raise
            raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt ({type(exc).__name__}: {exc}); "
                                  "delete it to start over") from exc
        logger.info("resuming from %s: round %d committed (%d node(s), tree %s)", folder, self.resumed_round,
                    len(self._uploads), "built" if self.tree is not None else "not built yet")

    # -- helpers --------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, stream: int) -> list[int]:
        """FedAvg's count (and its wait for enough nodes), drawn as `fedtreelora simulate` draws."""
        if fraction == 0.0:
            return []
        size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        _, connected = sample_nodes(grid, self.min_available_nodes, size)   # waits until enough are connected
        return draw_clients(self.seed, server_round - 1, sorted(int(n) for n in connected), size, stream)

    def _start_state(self, node: int, server_round: int) -> tuple[StateDict, StateDict | None]:
        if server_round <= self.warmup_rounds:                   # warm-up: its own last upload, or initial_arrays
            return self._uploads.get(node, self._initial), None
        if node in self._experts:
            return self._experts[node]
        if self._global is None:                                 # nobody has uploaded yet
            return self._initial, None
        if node not in self._warned_late:
            self._warned_late.add(node)
            logger.warning("node %d was first seen in round %d, after warm-up: it starts from the global mean", node,
                           server_round)
        return self._global, None

    def _message(self, node: int, server_round: int, config: ConfigRecord, kind: str) -> Message:
        cluster, external = self._start_state(node, server_round)
        node_config = ConfigRecord(dict(config))
        node_config["server-round"] = server_round
        node_config["phase"] = WARMUP if server_round <= self.warmup_rounds else FEDERATED
        node_config["run-seed"] = self.seed
        content = RecordDict({self.arrayrecord_key: to_arrayrecord(cluster), self.configrecord_key: node_config})
        if external is not None:
            content[self.external_key] = to_arrayrecord(external)
        return Message(content=content, message_type=kind, dst_node_id=node, group_id=str(server_round))

    def _collect(self, server_round: int, replies: Iterable[Message], kind: str) -> tuple[dict[int, RecordDict], list]:
        """The replies that carry content, by node; errors and missing replies logged as failures."""
        arrived: dict[int, RecordDict] = {}
        reasons: dict[int, str] = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                reasons[node] = str(msg.error.reason)
            else:
                arrived[node] = msg.content
        for node in sorted(self._sent.get(kind, set()) - set(arrived)):
            reason = reasons.get(node, "no reply before the round's timeout")
            keeps = "keeps its previous experts and last upload" if kind == "train" else "has no metrics this round"
            logger.warning("node %d failed to %s in round %d: %s; it %s", node, kind, server_round, reason, keeps)
            self.failures.append({"round": server_round, "node": node, "kind": kind, "reason": reason})
        for node, content in arrived.items():
            _weight(content, node, self.weighted_by_key)
        table = self.train_metrics if kind == "train" else self.evaluate_metrics
        table[server_round] = {node: {k: v for r in c.metric_records.values() for k, v in r.items()}
                               for node, c in arrived.items()}
        contents = [arrived[node] for node in sorted(arrived)]
        return arrived, contents

    def _weighted_mean(self, states: Mapping[int, StateDict]) -> StateDict:
        nodes = sorted(states)
        total = sum(self._weights[n] for n in nodes)
        first = states[nodes[0]]
        mean = {}
        for key, value in first.items():
            acc = torch.zeros(value.shape, dtype=torch.float64)
            for n in nodes:
                if key not in states[n]:
                    raise ValueError(f"node {n}'s upload lacks key {key!r} (node {nodes[0]} has it)")
                acc += states[n][key].double() * (self._weights[n] / total)
            mean[key] = acc.to(value.dtype)
        return mean


def json_round_trip(value):
    """`value` as it reads back from state.json (tuples become lists, ...), for comparing settings."""
    import json
    return json.loads(json.dumps(value))


def _one_arrayrecord(content: RecordDict, node: int) -> ArrayRecord:
    records = content.array_records
    if len(records) != 1:
        raise ValueError(f"node {node}'s train reply must carry exactly one ArrayRecord (its adapter), "
                         f"got {len(records)}: {sorted(records)}")
    return next(iter(records.values()))


def _weight(content: RecordDict, node: int, key: str) -> float:
    records = content.metric_records
    if len(records) != 1:
        raise ValueError(f"node {node}'s reply must carry exactly one MetricRecord, got {len(records)}: {sorted(records)}")
    metrics = next(iter(records.values()))
    if key not in metrics:
        raise ValueError(f"node {node}'s MetricRecord lacks the weight {key!r} (it has {sorted(metrics)})")
    value = metrics[key]
    if isinstance(value, list) or not math.isfinite(float(value)) or not float(value) > 0:
        raise ValueError(f"node {node}'s weight {key!r} must be a finite number > 0, got {value!r}")
    return float(value)


def _restore(state: StateDict, dtypes: Mapping[str, torch.dtype]) -> StateDict:
    return {k: (v.to(dtypes[k]) if k in dtypes else v) for k, v in state.items()}


def _common_dtypes(states: dict[str, StateDict]) -> dict[str, StateDict]:
    """Nodes that upload one key in different dtypes (fp16 here, fp32 there) are aggregated in the promoted dtype."""
    first = next(iter(states.values()))
    promoted = {}
    for key, value in first.items():
        dtype = value.dtype
        for state in states.values():
            if key in state:
                dtype = torch.promote_types(dtype, state[key].dtype)
        if any(key in s and s[key].dtype != dtype for s in states.values()):
            promoted[key] = dtype
    if not promoted:
        return states
    return {name: {k: (v.to(promoted[k]) if k in promoted else v) for k, v in s.items()} for name, s in states.items()}

