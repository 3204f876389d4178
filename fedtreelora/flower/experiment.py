"""The experiment of `fedtreelora simulate` on any Grid: the shared warm-up, each method's rounds, the record.

`Experiment(grid, config, run_dir)` runs `strategy.PersonalisedStrategy` under flwr's own
`Strategy.start` over a Grid whose nodes serve the experiment's clients (`pool_nodes.pool_node`:
in this process, `pool_nodes.pool_grid`; on Flower, the experiment's ClientApp):

1. `warmup()`: one `start` of `warmup_rounds` rounds with no rule, committed to
   `checkpoints/warmup/`: every client trains its own adapter (the late ones too, held back);
2. `run_method(name)`: per method, a Strategy with that method's rule continues the warm-up's
   commit (its rounds are replayed, not run again) for the federated rounds, committed to
   `checkpoints/<name>/`; it decides the rule at the start of its first federated round;
3. `summary(results)`: the result record (`federation.schedule.method_result`, per round
   `evaluation_record`), written with `report.write_outputs`.

The experiment's schedule maps onto the Strategy's settings (`strategy_for`): `client_fraction`
counted as round(fraction * n) (`sample_size(..., "nearest")`, what `fedtreelora simulate` has
always selected) and drawn over every client that took part, online or not (`candidates="known"`:
a client whose SuperNode has gone fails its round and is recorded, nobody waits for it; the
ServerApp waits for all `num_clients` nodes once, before the warm-up), every client evaluated every round, `late_clients` held back until their round,
`rebuild_every`, the seed, the clients named by their "partition-id". Every message carries the
experiment config (ConfigRecord "experiment"), from which a Flower ClientApp builds its pool.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from ..client.trainer import ClientState
from ..federation.config import ExperimentConfig
from ..federation.methods import make_method
from ..federation.schedule import evaluation_record, method_result
from .strategy import WARMUP, PersonalisedStrategy

__all__ = ["Experiment", "strategy_for", "EXPERIMENT_KEY"]

EXPERIMENT_KEY = "experiment"     # the messages' config entry holding the experiment config (JSON)


def strategy_for(config: ExperimentConfig, method: str | None, folder: Path, *, start_from: Path | None = None,
                 resume: bool = False) -> PersonalisedStrategy:
    """The Strategy that runs `method` (None: the warm-up only) of the experiment `config`, committing to `folder`."""
    n, early = config.num_clients, config.num_clients - config.late_clients
    return PersonalisedStrategy(
        None if method is None else make_method(method), warmup_rounds=config.warmup_rounds,
        fraction_train=config.client_fraction, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=0,
        min_available_nodes=n, count="nearest", candidates="known", seed=config.seed, rule_config=config, client_key="partition-id",
        group_key="group", join_rounds={k: config.warmup_rounds + config.late_round for k in range(early, n)},
        rebuild_every=config.rebuild_every, checkpoint_dir=folder, start_from=start_from, resume=resume)


class Experiment:
    """The experiment `config` over `grid`, its run folder `run_dir` (see the module docstring).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Nodes that serve the experiment's clients (their replies say "partition-id" and "group").
    config : federation.config.ExperimentConfig
        The experiment.
    run_dir : str or pathlib.Path
        The run folder (`checkpoints/` here; `summary` writes metrics.json and the figures).
    resume : bool
        Continue the rounds committed in `run_dir/checkpoints/`.
    timeout : float, optional
        Seconds a round waits for replies (None: no limit).
    engine : str
        Recorded in the summary ("in-process" or "flower").
    """

    def __init__(self, grid: Grid, config: ExperimentConfig, run_dir: str | Path, *, resume: bool = False,
                 timeout: float | None = None, engine: str = "in-process"):
        self.grid, self.config, self.resume, self.timeout, self.engine = grid, config, resume, timeout, engine
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.rules: dict = {}                 # method name -> its rule, as the run decided it
        self.failures: list[dict] = []
        self._messages = ConfigRecord({EXPERIMENT_KEY: json.dumps(config.to_dict())})
        self._warm: PersonalisedStrategy | None = None

    def _start(self, strategy: PersonalisedStrategy, num_rounds: int, phase: str) -> None:
        """flwr's `Strategy.start` over the grid; the clients start from their own initial adapters."""
        strategy.start(self.grid, ArrayRecord(), num_rounds, self.timeout, self._messages, self._messages)
        first = 1 if phase == WARMUP else self.config.warmup_rounds + 1     # a method replays the warm-up's
        self.failures += [{**f, "phase": phase} for f in strategy.failures if f["round"] >= first]

    def warmup(self) -> tuple[list[ClientState | None], list[dict]]:
        """The shared warm-up: (every client's warm-up upload and logits, by client; the warm-up's history)."""
        cfg = self.config
        self._warm = strategy_for(cfg, None, self.checkpoints / WARMUP, resume=self.resume)
        self._start(self._warm, cfg.warmup_rounds, WARMUP)
        never = sorted(set(range(cfg.num_clients)) - set(self._warm.clients))
        if never:
            raise RuntimeError(f"client(s) {never} uploaded nothing during warm-up; every method needs every client's "
                               "LoRA (raise warmup_rounds or fix those clients)")
        return self._states(self._warm), self.history(self._warm, 1, cfg.warmup_rounds, WARMUP)

    @property
    def warmup_wall_s(self) -> float:
        return self._wall(self._warm, 1, self.config.warmup_rounds)

    def run_method(self, name: str) -> dict:
        """The method's rounds after the warm-up; its `method_result`."""
        cfg = self.config
        if self._warm is None:
            self.warmup()
        strategy = strategy_for(cfg, name, self.checkpoints / name, start_from=self.checkpoints / WARMUP,
                                resume=self.resume)
        last = cfg.warmup_rounds + cfg.rounds
        self._start(strategy, last, name)
        if not strategy.decided:            # no federated round: the record still shows what it would decide
            strategy.decide()
        self.rules[name] = strategy.rule
        n = cfg.num_clients
        experts = [strategy.experts(k) if k in strategy.holders else (None, None) for k in range(n)]
        return method_result(strategy.rule, cfg, self.history(self._warm, 1, cfg.warmup_rounds, WARMUP),
                             self.history(strategy, cfg.warmup_rounds + 1, last, name), self._states(strategy),
                             experts, self._wall(strategy, cfg.warmup_rounds + 1, last))

    def history(self, strategy: PersonalisedStrategy, first: int, last: int, phase: str) -> list[dict]:
        """The record of rounds first..last: who was selected, joined or rebuilt, per-client metrics, failures."""
        out = []
        for r in range(first, last + 1):
            info = strategy.rounds.get(r, {})
            record = {"round": r, "phase": phase, **{k: info[k] for k in ("joined", "selected", "rebuilt") if k in info}}
            record.update(evaluation_record(strategy.evaluate_metrics.get(r, {}), self.config.num_clients,
                                            self.config.metric_name))
            # a node that failed before it ever replied has no known client: it is in the run's "failures" only
            failed = {kind: sorted(f["client"] for f in strategy.failures
                                   if f["round"] == r and f["kind"] == kind and f["client"] is not None)
                      for kind in ("train", "evaluate")}
            if failed["train"] or failed["evaluate"]:
                record["failed"] = failed
            out.append(record)
        return out

    def summary(self, results: dict, **extra) -> dict:
        """The run's record (every method's `method_result`), written to the run folder."""
        from ..report import write_outputs
        cfg, warm = self.config, self._warm
        summary = {"config": cfg.to_dict(), "metric": cfg.metric_name, "engine": self.engine,
                   "groups": [warm.groups[k] for k in range(cfg.num_clients)],
                   **extra, "weights": [warm.weights[k] for k in range(cfg.num_clients)],
                   "warmup_wall_s": self.warmup_wall_s, "failures": self.failures, "methods": results}
        tree_rule = self.rules.get("fedtreelora")
        write_outputs(self.run_dir, summary, tree=None if tree_rule is None else tree_rule.tree)
        return summary

    def _states(self, strategy: PersonalisedStrategy) -> list[ClientState | None]:
        """Every client's latest upload and mixing logits (float32, as a client holds them), by client."""
        return [ClientState(strategy.upload(k), {g: torch.tensor(v, dtype=torch.float32)
                                                 for g, v in strategy.lams.get(k, {}).items()})
                if k in strategy.clients else None for k in range(self.config.num_clients)]

    @staticmethod
    def _wall(strategy: PersonalisedStrategy, first: int, last: int) -> float:
        return float(sum(strategy.rounds.get(r, {}).get("wall_s", 0.0) for r in range(first, last + 1)))
