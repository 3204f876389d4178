"""`PersonalisedStrategy`: the one round loop of every FedTreeLoRA run, as a Flower `Strategy`.

flwr's own `Strategy.start(grid, initial_arrays, num_rounds, ...)` drives it, over any Grid: the
drop-in `fedtreelora.flower.FedTreeLoRA` (this class with FedTreeLoRA's rule) in someone's PEFT
ServerApp, the experiment app on Flower, and `fedtreelora simulate`, whose clients are the nodes
of an in-process Grid (`pool_nodes.pool_grid`). The server rule is any `federation.methods.Method`.

Rounds 1..warmup_rounds (warm-up): every available node trains from its own last upload (round 1:
`initial_arrays`; an empty ArrayRecord lets each node start from its own initial adapter) and is
evaluated on it; nothing is shared. After the last warm-up round's evaluation (so that it sees the
warm-up adapters) the rule is decided over the latest uploads (`Method.setup`; FedTreeLoRA builds
its tree) and turns them into every client's experts; a run that continues a warm-up committed
without a rule decides at the start of its first federated round. Every federated round, the
sampled clients each receive their own cluster expert under "arrays" and their frozen external
expert under "external" (absent where they have none), train and upload; the rule turns every
client's latest upload into its experts (a client not sampled is represented by its last upload)
and each sampled client is evaluated on its own.

Clients: a node is its own client, unless `client_key` names a reply metric that says which client
it serves (the experiment's "partition-id"): the rule sees the clients in the order of their ids.
A client that fails or does not answer keeps its experts and last upload (logged, in `failures`).
One first seen after warm-up starts from the global mean and, once it has uploaded, is placed by
`Method.extend` (where the rule cannot place it, it keeps the global mean). Clients listed in
`join_rounds` train in the warm-up like everyone (their own local warm-up) but are held back
(not aggregated, sampled or evaluated) until their round, at whose start the rule places them.
A client that reports its mixing logits (ConfigRecord `MIXING_RECORD`) gets them back with its
experts, so the server's checkpoint holds them.

Checkpoints: with `checkpoint_dir`, the whole state is committed after every round
(`federation.checkpoints.commit_tensors`), each client's upload and logits laid out as
`federation.checkpoints.load_checkpoint` reads them, and what the rule decided is also written to
`method.json` whenever it decides; `resume` reloads the commit (the decided rule is not decided again) and `start` replays the committed rounds without contacting any node. `start_from`
continues the commit of another run (the experiment's methods continue its shared warm-up).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords, sample_nodes

from ..federation.checkpoints import (EARLIER_LAYOUT, CheckpointError, RunFolderError, commit_tensors, load_tensors,
                                      write_json)
from ..federation.draws import EVALUATE_DRAW, TRAIN_DRAW, draw_clients, sample_size
from ..federation.methods import Method
from .arrays import DTYPE_RECORD, from_arrayrecord, read_dtypes, to_arrayrecord

__all__ = ["PersonalisedStrategy", "WARMUP", "FEDERATED", "MIXING_RECORD", "RunFolderError", "CheckpointError"]

logger = logging.getLogger("flwr").getChild("fedtreelora")

WARMUP, FEDERATED = "warmup", "federated"
MIXING_RECORD = "fedtreelora-mixing"    # ConfigRecord {layer group: lam logit} of a client that reports its lam
CHECKPOINT_FORMAT = "fedtreelora.flower.PersonalisedStrategy/2"
SCHEDULE_SETTINGS = ("warmup_rounds", "weighted_by_key")   # a continued run must share these
StateDict = dict[str, torch.Tensor]
ExpertsFn = Callable[[int, dict[int, tuple[StateDict, "StateDict | None"]]], None]


class PersonalisedStrategy(Strategy):
    """A server rule of `federation.methods` as a Flower Strategy: warm-up, the rule, personalised rounds.

    Parameters
    ----------
    rule : federation.methods.Method or None
        The server rule (copied at every `start`); None runs warm-up rounds only.
    warmup_rounds : int
        Rounds of local training (>= 1) before the rule is decided; `num_rounds` counts them.
    fraction_train, fraction_evaluate : float
        Fraction of the clients sampled for a federated training round / any evaluation round.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        FedAvg's meaning: at least this many sampled / connected before a round starts.
    count : {"fedavg", "nearest"}
        How a fraction of n clients is counted (`federation.draws.sample_size`): FedAvg's
        int(fraction * n), or round(fraction * n), the count of `fedtreelora simulate`.
    candidates : {"connected", "known"}
        Whom a round draws from. "connected" (FedAvg's): the nodes connected now, after waiting for
        `min_available_nodes` of them. "known": every client that has uploaded, connected or not
        (a fixed federation, the experiment's: its draw does not depend on who is online, and a
        client whose node has gone is sent its message and recorded as failed, never waited for).
    weighted_by_key, arrayrecord_key, external_key, configrecord_key : str
        The replies' weight metric; the messages' cluster expert, external expert and ConfigRecord.
    seed : int
        The sampling draws come from (seed, round) (`federation.draws.draw_clients`, over the
        sorted client ids); sent to every node as "run-seed".
    experts_fn : callable, optional
        experts_fn(server_round, {client: (cluster, external or None)}) at the end of every round
        (after its evaluation and any decision of the rule), in each client's own dtypes.
    rule_config : federation.config.ExperimentConfig, optional
        Given to `rule.setup` (the experiment's settings); the drop-in's rule needs none.
    client_key : str, optional
        A reply metric naming the client a node serves; None: each node is its own client.
    group_key : str, optional
        A reply metric with the client's planted group, given to the rule (the oracle baseline).
    join_rounds : mapping of int to int, optional
        Client -> the round (> warmup_rounds) from which it takes part (see the module docstring).
    rebuild_every : int
        Decide the rule again over the latest uploads after every R-th federated round (0: never).
    checkpoint_dir : str or pathlib.Path, optional
        Folder of the commits; None: none.
    start_from : str or pathlib.Path, optional
        A folder whose last commit this run continues (its rounds are replayed).
    resume : bool
        Continue the run committed in `checkpoint_dir`.

    Attributes
    ----------
    rule : federation.methods.Method
        The rule of the current run (decided once `decided` is True).
    failures : list of dict
        {"round", "node", "kind", "reason"} (and "client" with `client_key`: None for a node that
        failed before it ever replied, whose client is not known) of every failed reply.
    train_metrics, evaluate_metrics : dict
        Per round, {client: metrics dict} of the replies that arrived.
    rounds : dict
        Per round, what the record needs: "selected", "joined", "rebuilt", "wall_s".
    weights, groups, lams : dict
        Per client: its weight, planted group (with `group_key`), mixing logits (where reported).
    resumed_round : int
        The last round reloaded from a checkpoint (0: fresh).
    """

    # pylint: disable=too-many-arguments
    def __init__(self, rule: Method | None, *, warmup_rounds: int = 2, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, min_train_nodes: int = 2, min_evaluate_nodes: int = 2,
                 min_available_nodes: int = 2, count: str = "fedavg", candidates: str = "connected",
                 weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", external_key: str = "external", configrecord_key: str = "config",
                 seed: int = 0, experts_fn: ExpertsFn | None = None, rule_config=None, client_key: str | None = None,
                 group_key: str | None = None, join_rounds: Mapping[int, int] | None = None, rebuild_every: int = 0,
                 checkpoint_dir: str | Path | None = None, start_from: str | Path | None = None,
                 resume: bool = False) -> None:
        if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 1:
            raise ValueError(f"warmup_rounds must be an integer >= 1 (the rule is decided on warm-up uploads), "
                             f"got {warmup_rounds!r}")
        for name, value in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        for name, value in (("min_train_nodes", min_train_nodes), ("min_evaluate_nodes", min_evaluate_nodes),
                            ("min_available_nodes", min_available_nodes), ("rebuild_every", rebuild_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if count not in ("fedavg", "nearest"):
            raise ValueError(f'count must be "fedavg" or "nearest", got {count!r}')
        if candidates not in ("connected", "known"):
            raise ValueError(f'candidates must be "connected" or "known", got {candidates!r}')
        keys = {"arrayrecord_key": arrayrecord_key, "external_key": external_key, "configrecord_key": configrecord_key,
                "weighted_by_key": weighted_by_key}
        for name, value in keys.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if arrayrecord_key == external_key:
            raise ValueError(f"arrayrecord_key and external_key must differ, both are {arrayrecord_key!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if experts_fn is not None and not callable(experts_fn):
            raise TypeError(f"experts_fn must be callable, got {type(experts_fn).__name__}")
        if not isinstance(resume, bool):
            raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
        late = {int(c): int(r) for c, r in (join_rounds or {}).items()}
        if any(r <= warmup_rounds for r in late.values()):
            raise ValueError(f"join_rounds must lie after the warm-up (> {warmup_rounds}), got {late}")
        self.template = rule
        self.warmup_rounds = warmup_rounds
        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_train_nodes = 0 if self.fraction_train == 0.0 else min_train_nodes
        self.min_evaluate_nodes = 0 if self.fraction_evaluate == 0.0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.count = count
        self.candidates = candidates
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.external_key = external_key
        self.configrecord_key = configrecord_key
        self.seed = seed
        self.experts_fn = experts_fn
        self.rule_config = rule_config
        self.client_key, self.group_key = client_key, group_key
        self.join_rounds = late
        self.rebuild_every = rebuild_every
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.start_from = None if start_from is None else Path(start_from)
        self.resume = resume
        self._in_start = False
        self._evaluate_fn_commits = False
        self._num_rounds: int | None = None
        self._timeout: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.rule = copy.deepcopy(self.template)
        self.failures: list[dict] = []
        self.train_metrics: dict[int, dict[int, dict]] = {}
        self.evaluate_metrics: dict[int, dict[int, dict]] = {}
        self.rounds: dict[int, dict] = {}
        self.weights: dict[int, float] = {}
        self.groups: dict[int, int] = {}
        self.lams: dict[int, dict[str, float]] = {}
        self.resumed_round = 0
        self._base_round = 0                              # the round of the commit this run continued from
        self._initial: StateDict | None = None
        self._uploads: dict[int, StateDict] = {}          # client -> latest upload (wire dtypes)
        self._dtypes: dict[int, dict[str, torch.dtype]] = {}   # client -> keys cast for the wire, own dtype
        self._experts: dict[int, tuple[StateDict, StateDict | None]] = {}   # what each client holds
        self._ruled: list[int] | None = None              # the clients the rule was decided over (+ placed)
        self._global: StateDict | None = None
        self._nodes: dict[int, int] = {}                  # client -> node (with client_key)
        self._clients_by_node: dict[int, int] = {}        # node -> client (with client_key)
        self._outside: set[int] = set()                   # uploaded, but the rule could not place them
        self._warned_late: set[int] = set()
        self._sent: dict[str, set[int]] = {}
        self._aggregated: dict[str, dict[int, dict]] = {"train": {}, "evaluate": {}, "serverapp": {}}

    # -- public ---------------------------------------------------------------------------------
    @property
    def decided(self) -> bool:
        """Whether the rule has been decided (after the last warm-up round)."""
        return self._ruled is not None

    @property
    def clients(self) -> list[int]:
        """Every client that has uploaded, sorted."""
        return sorted(self._uploads)

    @property
    def holders(self) -> list[int]:
        """Every client that holds experts, sorted."""
        return sorted(self._experts)

    def experts(self, client: int) -> tuple[StateDict, StateDict | None]:
        """(cluster expert, external expert or None) a client holds, as state dicts in its own dtypes.

        Raises
        ------
        KeyError
            A client the strategy has no experts for (never answered a training round).
        """
        client = int(client)
        if client not in self._experts:
            raise KeyError(f"{self._who(client)} has no experts (with experts: {sorted(self._experts)[:20]})")
        cluster, external = self._experts[client]
        dtypes = self._dtypes.get(client, {})
        return _restore(cluster, dtypes), (None if external is None else _restore(external, dtypes))

    def upload(self, client: int) -> StateDict:
        """A client's latest upload, in its own dtypes."""
        return _restore(self._uploads[int(client)], self._dtypes.get(int(client), {}))

    def decide(self, server_round: int | None = None) -> None:
        """Decide the rule over the latest uploads of the clients taking part at the end of
        `server_round` (default: the last warm-up round) and give every one its experts. `start`
        does it after the last warm-up round; a run that never gets there may call it for its record."""
        if self.rule is None:
            raise ValueError("this strategy has no server rule: it runs warm-up rounds only")
        server_round = self.warmup_rounds if server_round is None else server_round
        clients = [c for c in sorted(self._uploads) if not self._held_back(c, server_round)]
        if not clients:
            raise RuntimeError(f"round {server_round}: no client has uploaded anything; the rule has nothing to decide on")
        states = _common_dtypes([self._uploads[c] for c in clients])
        self.rule.setup(states, self._weight_array(clients), self.rule_config, self._group_array(clients),
                        names=[str(c) for c in clients])
        self._ruled, self._outside = clients, set()
        self._experts.update(self._rule_experts())
        self._write_rule()
        logger.info("round %d: %s decided over %d client(s)%s", server_round, self.rule.name, len(clients),
                    self._decision_note())

    def _decision_note(self) -> str:
        return ""

    def _write_rule(self) -> None:
        """What the rule decided, readable beside the commits (`method.json`; a resumed run reloads
        it from the commit)."""
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.checkpoint_dir / "method.json", self.rule.state())

    def summary(self) -> None:
        """Log the strategy's settings."""
        logger.info("\t├──> %s: %d warm-up round(s), then personalised rounds", getattr(self.rule, "name", "warm-up"),
                    self.warmup_rounds)
        logger.info("\t├──> Sampling: fraction train %.2f | evaluate %.2f; min nodes train %d | evaluate %d | "
                    "available %d", self.fraction_train, self.fraction_evaluate, self.min_train_nodes,
                    self.min_evaluate_nodes, self.min_available_nodes)
        logger.info("\t└──> Checkpoints: %s", "none" if self.checkpoint_dir is None else
                    f"{self.checkpoint_dir}{' (resume)' if self.resume else ''}")

    # -- the run ------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float | None = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """flwr's `Strategy.start`, after loading the checkpoint this run continues.

        Parameters and return value are flwr's (see `flwr.serverapp.strategy.Strategy.start`);
        `num_rounds` counts the warm-up rounds and any replayed ones. Replayed rounds come from the
        checkpoint (no node is contacted, `evaluate_fn` is not called for them), so that `Result`
        covers every round.
        """
        self._begin(initial_arrays)
        # A run that continues another's rounds (start_from) with none of its own (rounds=0) is no
        # mistake; a resumed run that has nothing left, or any run asked for fewer rounds than it holds, is.
        continuing = self._continues_other and self.resumed_round == num_rounds
        if self.resumed_round >= num_rounds and not continuing:
            logger.warning("%s has round %d committed, num_rounds is %d: nothing left to train",
                           self.checkpoint_dir or self.start_from, self.resumed_round, num_rounds)
        self._in_start, self._evaluate_fn_commits = True, evaluate_fn is not None
        self._num_rounds, self._timeout = num_rounds, timeout
        try:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                 None if evaluate_fn is None else self._replaying(evaluate_fn))
        finally:
            self._in_start, self._evaluate_fn_commits = False, False

    def _begin(self, initial_arrays: ArrayRecord) -> None:
        """A run's start: fresh state, then the checkpoint it resumes or continues."""
        self._reset()
        self._initial = from_arrayrecord(initial_arrays)
        self._continues_other = False   # True: the state loaded is start_from's (this run has no round yet)
        loaded = self._checkpoint(self.checkpoint_dir)
        if loaded is not None:
            if not self.resume:
                raise RunFolderError(f"{self.checkpoint_dir} already holds a {type(self).__name__} run (round "
                                     f"{loaded[0]['round']} committed): pass resume=True to continue it, or use "
                                     "another run_dir")
            self._load_state(*loaded, self.checkpoint_dir, own=True)
            return
        if self.resume:
            logger.info("%s holds no committed round: the run starts fresh", self.checkpoint_dir)
        if self.start_from is not None:
            loaded = self._checkpoint(self.start_from)
            if loaded is None:
                raise RunFolderError(f"{self.start_from} holds no committed round to continue from")
            self._load_state(*loaded, self.start_from, own=False)
            self._continues_other = True

    def _checkpoint(self, folder: Path | None) -> tuple[dict, dict] | None:
        loaded = None if folder is None else load_tensors(folder)
        if loaded is not None and "format" not in loaded[0]:
            raise RunFolderError(f"{folder} {EARLIER_LAYOUT}")
        if loaded is not None and loaded[0].get("format") != CHECKPOINT_FORMAT:
            raise RunFolderError(f"{folder} holds a checkpoint of another kind (format {loaded[0].get('format')!r}, "
                                 f"expected {CHECKPOINT_FORMAT!r}); use another run_dir")
        return loaded

    def _replaying(self, evaluate_fn):
        """`evaluate_fn` that answers replayed rounds from the checkpoint, records the others and commits them."""
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

    def _held_back(self, client: int, server_round: int) -> bool:
        return server_round < self.join_rounds.get(client, 0)

    # -- train ----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Messages of a training round: warm-up, every available node its own last upload; later, every
        sampled client its own experts (the rule decided first, late clients placed). None for a
        replayed round."""
        if (server_round == 1 and not self._in_start) or self._initial is None:
            self._begin(arrays)
        if self._replayed(server_round):
            logger.info("configure_train: round %d is replayed from the checkpoint", server_round)
            return []
        self.rounds[server_round] = {}
        self._t0 = time.perf_counter()
        if server_round <= self.warmup_rounds:
            clients = sorted(set(map(self._client_of, self._connected(grid, self.min_train_nodes)))
                             | (set(self.clients) if self.candidates == "known" else set()))
        else:
            if not self.decided:       # this run continues a warm-up committed without the rule
                self.decide(server_round - 1)
            self._join(server_round)
            clients = self._sample(grid, self.fraction_train, self.min_train_nodes, server_round, TRAIN_DRAW)
            self.rounds[server_round]["selected"] = clients
        logger.info("configure_train: round %d (%s), %d node(s)", server_round,
                    WARMUP if server_round <= self.warmup_rounds else FEDERATED, len(clients))
        self._sent["train"] = {self._node_of(c) for c in clients}
        return [self._message(c, server_round, config, MessageType.TRAIN) for c in clients]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store the uploads and turn them into every client's experts; return the weighted global mean
        of the latest uploads and the weighted train metrics."""
        if self._replayed(server_round):
            list(replies)
            stored = self._aggregated["train"].get(server_round)
            arrays = to_arrayrecord(self._global) if server_round == self.resumed_round and self._global else None
            return arrays, None if stored is None else MetricRecord(stored)
        arrived, contents, failed = self._collect(server_round, replies, "train")
        for client, content in arrived.items():
            node = self._node_of(client)
            self._uploads[client] = from_arrayrecord(_one_arrayrecord(content, node))
            self._dtypes[client] = read_dtypes(content.config_records.get(DTYPE_RECORD))
            self.weights[client] = _weight(content, node, self.weighted_by_key)
            if self.group_key is not None and self.group_key in _metrics_of(content):
                self.groups[client] = int(_metrics_of(content)[self.group_key])
            if MIXING_RECORD in content.config_records:
                self.lams[client] = {g: float(v) for g, v in content.config_records[MIXING_RECORD].items()}
        taking_part = [c for c in sorted(self._uploads) if not self._held_back(c, server_round)]
        if not taking_part:
            logger.warning("round %d: no node has uploaded anything yet; nothing to aggregate", server_round)
            return None, None
        self._global = self._weighted_mean(taking_part)
        if server_round <= self.warmup_rounds:
            self._experts = {c: (self._uploads[c], None) for c in taking_part}   # local: its own
        else:
            new = [c for c in taking_part if c not in self._ruled and c not in self._outside]
            if new:
                self._extend(new, server_round)
            self._aggregate(failed)
        return to_arrayrecord(self._global), self._metrics(server_round, "train", contents)

    def _rule_experts(self) -> dict[int, tuple[StateDict, StateDict | None]]:
        """The rule's experts for every client it covers, over their latest uploads."""
        states = _common_dtypes([self._uploads[c] for c in self._ruled])
        return dict(zip(self._ruled, self.rule.aggregate(states, self._weight_array(self._ruled))))

    def _aggregate(self, failed: set[int]) -> None:
        for client, experts in self._rule_experts().items():
            if client in failed and client in self._experts:
                continue                                         # keeps the experts it held
            self._experts[client] = experts
        for client in self._outside:
            if client not in failed or client not in self._experts:
                self._experts[client] = (self._global, None)

    def _join(self, server_round: int) -> None:
        """The held-back clients whose round this is: placed by the rule (their local warm-up is done)."""
        joining = [c for c, r in sorted(self.join_rounds.items()) if r == server_round and c in self._uploads
                   and c not in self._ruled]
        if joining and self._extend(joining, server_round):
            self.rounds[server_round]["joined"] = joining
            self._experts.update(self._rule_experts())

    def _extend(self, new: list[int], server_round: int) -> bool:
        """Place clients that were not there when the rule was decided; False where the rule cannot."""
        everyone = self._ruled + new
        try:
            self.rule.extend(_common_dtypes([self._uploads[c] for c in self._ruled]),
                             _common_dtypes([self._uploads[c] for c in new]), self._weight_array(everyone),
                             self._group_array(everyone), names=[str(c) for c in new])
        except NotImplementedError as exc:
            for client in new:
                logger.warning("%s first uploaded after warm-up: the rule cannot place it (%s), so it gets the "
                               "global mean (no cluster, no external expert)", self._who(client), exc)
            self._outside.update(new)
            return False
        self._ruled = everyone
        self._outside.difference_update(new)
        self._write_rule()
        logger.info("round %d: %s placed by %s", server_round, ", ".join(map(self._who, new)), self.rule.name)
        return True

    # -- evaluate -------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Messages of an evaluation round: every sampled client its own current experts."""
        if self._replayed(server_round):
            return []
        clients = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, EVALUATE_DRAW)
        self._sent["evaluate"] = {self._node_of(c) for c in clients}
        return [self._message(c, server_round, config, MessageType.EVALUATE) for c in clients]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The weighted mean of the clients' (personalised) evaluation metrics; per client in
        `evaluate_metrics`. The end of the round: after the last warm-up round the rule is decided
        here (and with `rebuild_every` decided again every R federated rounds), `experts_fn` is
        called, and with a checkpoint folder the round is committed (or after `start`'s
        `evaluate_fn`, when there is one)."""
        if self._replayed(server_round):
            list(replies)
            stored = self._aggregated["evaluate"].get(server_round)
            return None if stored is None else MetricRecord(stored)
        _, contents, _ = self._collect(server_round, replies, "evaluate")
        metrics = self._metrics(server_round, "evaluate", contents)
        info = self.rounds.setdefault(server_round, {})
        federated = server_round - self.warmup_rounds
        if federated == 0 and self.rule is not None and not self.decided and self._uploads:
            self.decide(server_round)    # after the warm-up's evaluation, which saw the warm-up adapters
        elif self.rebuild_every and federated > 0 and federated % self.rebuild_every == 0 and self.decided and (
                self._num_rounds is None or server_round < self._num_rounds):
            self.decide(server_round)    # again, from the latest uploads; used from the next round on
            info["rebuilt"] = True
        if self.experts_fn is not None:
            self.experts_fn(server_round, {c: self.experts(c) for c in sorted(self._experts)})
        info["wall_s"] = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        if not self._evaluate_fn_commits:
            self._commit(server_round)
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------
    def _settings(self) -> dict:
        """What a resumed run must share with the run it continues (the schedule and the rule)."""
        return {"warmup_rounds": self.warmup_rounds, "weighted_by_key": self.weighted_by_key,
                "rule": getattr(self.template, "name", None)}

    def _commit(self, server_round: int) -> None:
        """Commit the whole state after `server_round` (nothing without a checkpoint folder)."""
        if self.checkpoint_dir is None or self._initial is None:
            return
        tensors = {f"server/initial/{k}": v for k, v in self._initial.items()}
        tensors.update({f"server/global/{k}": v for k, v in (self._global or {}).items()})
        for client, upload in self._uploads.items():
            tensors.update({f"{client}/adapter/{k}": v for k, v in upload.items()})
        for client, lams in self.lams.items():
            tensors.update({f"{client}/mixing/{g}": torch.tensor([v], dtype=torch.float64) for g, v in lams.items()})
        for client, (cluster, external) in self._experts.items():
            tensors.update({f"{client}/cluster/{k}": v for k, v in cluster.items()})
            tensors.update({f"{client}/external/{k}": v for k, v in (external or {}).items()})
        by_round = lambda t: {str(r): {str(c): m for c, m in per.items()} for r, per in t.items()}   # noqa: E731
        info = {"format": CHECKPOINT_FORMAT, "settings": self._settings(), "base_round": self._base_round,
                "clients": sorted(self._uploads), "nodes": {str(c): n for c, n in self._nodes.items()},
                "method": self.rule.state() if self.decided else None, "ruled": self._ruled,
                "weights": {str(c): w for c, w in self.weights.items()},
                "groups": {str(c): g for c, g in self.groups.items()},
                "dtypes": {str(c): {k: str(d).removeprefix("torch.") for k, d in dt.items()}
                           for c, dt in self._dtypes.items()},
                "experts": {str(c): external is not None for c, (_, external) in self._experts.items()},
                "outside": sorted(self._outside), "warned_late": sorted(self._warned_late), "failures": self.failures,
                "train_metrics": by_round(self.train_metrics), "evaluate_metrics": by_round(self.evaluate_metrics),
                "rounds": {str(r): info for r, info in self.rounds.items()},
                "aggregated": {kind: {str(r): m for r, m in per.items()} for kind, per in self._aggregated.items()},
                **self._extra_info()}
        commit_tensors(self.checkpoint_dir, server_round - self._base_round, tensors, info)

    def _extra_info(self) -> dict:
        """More of state.json, for readers of the checkpoint (reloading needs none of it)."""
        return {}

    def _load_state(self, info: dict, tensors: dict[str, torch.Tensor], folder: Path, own: bool) -> None:
        """The state `_commit` wrote, after checking that this run may continue it (all settings when
        resuming its own run, the schedule's when continuing another run's rounds)."""
        saved, now = info.get("settings", {}), _json_round_trip(self._settings())
        differ = [name for name in now if (own or name in SCHEDULE_SETTINGS) and saved.get(name) != now[name]]
        if differ:
            detail = "; ".join(f"{name}: committed {saved.get(name)!r}, now {now[name]!r}" for name in differ)
            raise RunFolderError(f"{folder} holds a run with other settings ({detail}); resume it with the settings "
                                 "it was started with, or use another run_dir")
        parts: dict[str, dict] = {}
        try:
            for name, v in tensors.items():
                owner, kind, key = name.split("/", 2)
                if owner == "server":
                    parts.setdefault(kind, {})[key] = v
                else:
                    parts.setdefault(kind, {}).setdefault(int(owner), {})[key] = v
            self._check_initial(parts.get("initial", {}), folder)
            self._global = parts.get("global") or None
            self._uploads = {int(c): parts["adapter"][int(c)] for c in info["clients"]}
            self.lams = {c: {g: float(v.reshape(())) for g, v in per.items()} for c, per in parts.get("mixing", {}).items()}
            self._nodes = {int(c): int(n) for c, n in info["nodes"].items()}
            self._clients_by_node = {n: c for c, n in self._nodes.items()}
            self.weights = {int(c): float(w) for c, w in info["weights"].items()}
            self.groups = {int(c): int(g) for c, g in info["groups"].items()}
            self._dtypes = {int(c): {k: getattr(torch, d) for k, d in dt.items()} for c, dt in info["dtypes"].items()}
            self._experts = {int(c): (parts.get("cluster", {}).get(int(c), {}),
                                      parts["external"][int(c)] if has_external else None)
                             for c, has_external in info["experts"].items()}
            if own and info["method"] is not None:
                self.rule.load_state(info["method"], self.rule_config)
                self._ruled = [int(c) for c in info["ruled"]]
            self._outside, self._warned_late = set(info["outside"]), set(info["warned_late"])
            self.failures = list(info["failures"])
            self.train_metrics, self.evaluate_metrics = (
                {int(r): {int(c): m for c, m in per.items()} for r, per in info[t].items()}
                for t in ("train_metrics", "evaluate_metrics"))
            self.rounds = {int(r): dict(v) for r, v in info["rounds"].items()}
            self._aggregated = {kind: {int(r): m for r, m in per.items()} for kind, per in info["aggregated"].items()}
            self.resumed_round = int(info["base_round"]) + int(info["round"])
            self._base_round = int(info["base_round"]) if own else self.resumed_round
        except (KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, RunFolderError):
                raise
            raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt ({type(exc).__name__}: {exc}); "
                                  "delete it to start over") from exc
        logger.info("%s from %s: round %d committed (%d client(s), rule %s)", "resuming" if own else "continuing",
                    folder, self.resumed_round, len(self._uploads), "decided" if self.decided else "not decided yet")

    def _check_initial(self, initial: StateDict, folder: Path) -> None:
        """The committed run's initial arrays must have this run's keys, shapes and dtypes (values: warned)."""
        for key, value in self._initial.items():
            if key not in initial:
                raise RunFolderError(f"initial_arrays has key {key!r} that the run in {folder} did not have")
            if initial[key].shape != value.shape or initial[key].dtype != value.dtype:
                raise RunFolderError(f"initial_arrays key {key!r} is {value.dtype} {tuple(value.shape)}, the run in "
                                     f"{folder} had {initial[key].dtype} {tuple(initial[key].shape)}")
        extra = sorted(set(initial) - set(self._initial))
        if extra:
            raise RunFolderError(f"initial_arrays lacks key {extra[0]!r} of the run in {folder} ({len(extra)} missing)")
        if any(not torch.equal(initial[k], self._initial[k]) for k in initial):
            logger.warning("initial_arrays differ in value from the committed run's: the committed ones are kept")
        self._initial = initial

    # -- helpers --------------------------------------------------------------------------------
    def _client_of(self, node: int) -> int:
        return self._clients_by_node.get(int(node), int(node))

    def _node_of(self, client: int) -> int:
        return self._nodes.get(client, client)

    def _who(self, client: int) -> str:
        node = self._node_of(client)
        return f"node {node}" if self.client_key is None else f"client {client} (node {node})"

    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, stream: int) -> list[int]:
        """The clients of a round: the count of `count` (and FedAvg's wait for enough nodes), drawn from
        (seed, round) over the sorted ids of the clients taking part."""
        if fraction == 0.0:
            return []
        pool = (self.clients if self.candidates == "known" else
                map(self._client_of, self._connected(grid, max(sample_size(fraction, len(list(grid.get_node_ids())),
                                                                           self.count), minimum))))
        candidates = sorted(c for c in pool if not self._held_back(c, server_round))
        size = min(max(sample_size(fraction, len(candidates), self.count), minimum), len(candidates))
        return draw_clients(self.seed, server_round - 1, candidates, size, stream)

    def _connected(self, grid: Grid, wanted: int) -> list[int]:
        """The connected node ids: with "connected" candidates after FedAvg's wait for enough of them
        (`min_available_nodes`, and `wanted`); with "known" ones as they are now, never waited for."""
        if self.candidates == "known":
            return list(grid.get_node_ids())
        _, connected = sample_nodes(grid, self.min_available_nodes, wanted)
        return list(connected)

    def _start_state(self, client: int, server_round: int, kind: str) -> tuple[StateDict, StateDict | None]:
        if server_round <= self.warmup_rounds:                   # warm-up: its own last upload, or initial_arrays
            return self._uploads.get(client, self._initial), None
        if client in self._experts:
            return self._experts[client]
        if self._global is None:                                 # nobody has uploaded yet
            return self._initial, None
        if client not in self._warned_late:
            self._warned_late.add(client)
            logger.warning("%s was first seen in round %d, after warm-up: it starts from the global mean",
                           self._who(client), server_round)
        return self._global, None

    def _message(self, client: int, server_round: int, config: ConfigRecord, kind: str) -> Message:
        cluster, external = self._start_state(client, server_round, kind)
        node_config = ConfigRecord(dict(config))
        node_config["server-round"] = server_round
        node_config["phase"] = WARMUP if server_round <= self.warmup_rounds else FEDERATED
        node_config["run-seed"] = self.seed
        fixed_lam = getattr(self.rule, "fixed_lam", None)
        if fixed_lam is not None and server_round > self.warmup_rounds:
            node_config["fixed-lam"] = float(fixed_lam)          # the client holds lam there, untrained
        content = RecordDict({self.arrayrecord_key: to_arrayrecord(cluster), self.configrecord_key: node_config})
        if external is not None:
            content[self.external_key] = to_arrayrecord(external)
        if client in self.lams:
            content[MIXING_RECORD] = ConfigRecord(dict(self.lams[client]))
        return Message(content=content, message_type=kind, dst_node_id=self._node_of(client),
                       group_id=str(server_round))

    def _collect(self, server_round: int, replies: Iterable[Message],
                 kind: str) -> tuple[dict[int, RecordDict], list, set[int]]:
        """The replies that carry content, by client, and the clients that failed (errors and missing
        replies, logged as failures)."""
        arrived: dict[int, RecordDict] = {}
        reasons: dict[int, str] = {}
        answered: set[int] = set()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            answered.add(node)
            if msg.has_error():
                reasons[node] = str(msg.error.reason)
                continue
            _weight(msg.content, node, self.weighted_by_key)     # every reply must carry its weight
            arrived[self._identify(node, msg.content)] = msg.content
        failed = set()
        for node in sorted(self._sent.pop(kind, set()) - (answered - set(reasons))):
            # With client_key, a node that has never replied serves a client nobody knows yet: it is
            # recorded by its node id alone, never as a client index.
            known = self.client_key is None or node in self._clients_by_node
            client = self._client_of(node) if known else None
            if known:
                failed.add(client)
            who = self._who(client) if known else f"node {node} (its client is not known yet: it has never replied)"
            timeout = "" if self._timeout is None else f" within {self._timeout} s"
            reason = reasons.get(node, f"no reply{timeout}")
            keeps = "keeps its previous experts and last upload" if kind == "train" else "has no metrics this round"
            logger.warning("%s failed to %s in round %d: %s; it %s", who, kind, server_round, reason, keeps)
            failure = {"round": server_round, "node": node, "kind": kind, "reason": reason}
            self.failures.append(failure if self.client_key is None else {**failure, "client": client})
        table = self.train_metrics if kind == "train" else self.evaluate_metrics
        table[server_round] = {c: dict(_metrics_of(content)) for c, content in arrived.items()}
        return arrived, [arrived[c] for c in sorted(arrived)], failed

    def _identify(self, node: int, content: RecordDict) -> int:
        """The client a replying node serves (`client_key`), remembered; the node itself without one."""
        if self.client_key is None:
            return node
        metrics = _metrics_of(content)
        if self.client_key not in metrics:
            return self._client_of(node)
        client = int(metrics[self.client_key])
        if self._nodes.get(client, node) != node:
            raise RuntimeError(f"nodes {self._nodes[client]} and {node} both serve client {client} ({self.client_key})")
        self._nodes[client], self._clients_by_node[node] = node, client
        return client

    def _metrics(self, server_round: int, kind: str, contents: list) -> MetricRecord | None:
        """The weighted mean of the replies' metrics (the client's id and group left out), kept for replay."""
        metrics = aggregate_metricrecords(contents, self.weighted_by_key) if contents else None
        if metrics is None:
            return None
        for key in (self.client_key, self.group_key):
            if key is not None and key in metrics:
                del metrics[key]
        self._aggregated[kind][server_round] = dict(metrics)
        return metrics

    def _weight_array(self, clients: list[int]) -> np.ndarray:
        return np.array([self.weights[c] for c in clients], dtype=np.float64)

    def _group_array(self, clients: list[int]) -> np.ndarray | None:
        return None if self.group_key is None else np.array([self.groups.get(c, -1) for c in clients])

    def _weighted_mean(self, clients: list[int]) -> StateDict:
        total = sum(self.weights[c] for c in clients)
        first = self._uploads[clients[0]]
        mean = {}
        for key, value in first.items():
            acc = torch.zeros(value.shape, dtype=torch.float64)
            for c in clients:
                if key not in self._uploads[c]:
                    raise ValueError(f"{self._who(c)}'s upload lacks key {key!r} ({self._who(clients[0])} has it)")
                acc += self._uploads[c][key].double() * (self.weights[c] / total)
            mean[key] = acc.to(value.dtype)
        return mean


def _json_round_trip(value):
    """`value` as it reads back from state.json (tuples become lists, ...), for comparing settings."""
    import json
    return json.loads(json.dumps(value))


def _metrics_of(content: RecordDict) -> dict:
    return {k: v for r in content.metric_records.values() for k, v in r.items()}


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


def _common_dtypes(states: list[StateDict]) -> list[StateDict]:
    """Clients that upload one key in different dtypes (fp16 here, fp32 there) are aggregated in the promoted dtype."""
    promoted = {}
    for key, value in states[0].items():
        dtype = value.dtype
        for state in states:
            if key in state:
                dtype = torch.promote_types(dtype, state[key].dtype)
        if any(key in s and s[key].dtype != dtype for s in states):
            promoted[key] = dtype
    if not promoted:
        return states
    return [{k: (v.to(promoted[k]) if k in promoted else v) for k, v in s.items()} for s in states]
