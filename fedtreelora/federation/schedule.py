"""`fedtreelora simulate` in this process: the experiment's clients as in-process Flower nodes.

There is one round loop, `fedtreelora.flower.strategy.PersonalisedStrategy`, a Flower Strategy
driven by flwr's own `Strategy.start`; `run_experiment` runs it over `flower.pool_nodes.pool_grid`
(client k of the `ClientPool` is node k of an `InProcessGrid`) through
`fedtreelora.flower.experiment.Experiment`, exactly as the experiment's ServerApp runs it over a
Flower Grid: the warm-up once (every method starts from it), then each method's rounds. Each round
the server turns the latest uploads into each client's experts; the selected clients
(`select_clients`) load theirs (cluster expert into PEFT's adapter, external expert into the mixer,
their own mixing logits), train locally and upload; the server aggregates again and every client
is evaluated on what it receives (its personalised model).

This module keeps what the record needs without Flower (`select_clients`, `evaluation_record`,
`method_result`, `check_run_folder`); `run_experiment` and `Federation` import `fedtreelora.flower`
when called. Checkpoints (`checkpoints.py`): one folder per phase under `<run>/checkpoints/`, what a
method decided kept with every commit; every random draw is derived from (seed, round, client), so
a resumed run replays the remaining rounds exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..client.trainer import ClientState
from .checkpoints import EARLIER_LAYOUT, CheckpointError, RunFolderError, earlier_layout, load_checkpoint, write_json
from .config import ExperimentConfig
from .data import TextDataset, load_dataset_for
from .draws import derived_seed, draw_clients, sample_size
from .methods import DEFAULT_METHODS, Method, make_method
from .pool import ClientPool

__all__ = ["Federation", "check_run_folder", "run_experiment", "select_clients", "method_result", "evaluation_record",
           "load_checkpoint", "CheckpointError", "RunFolderError", "derived_seed"]


def select_clients(config: ExperimentConfig, global_round: int, n: int) -> list[int]:
    """The clients 0..n-1 that train in federated round `global_round` (0-based, warm-up rounds counted):
    round(client_fraction * n) of them (at least one), drawn by `draws.draw_clients`: the Strategy's
    draw for `fedtreelora simulate` (count "nearest") over clients 0..n-1."""
    return draw_clients(config.seed, global_round, range(n), max(1, sample_size(config.client_fraction, n, "nearest")))


def evaluation_record(results: dict[int, dict], n: int, metric: str = "accuracy") -> dict:
    """Per-client main metric and loss of one round; a client with no result has None (left out of the mean).

    Parameters
    ----------
    results : dict
        Client index -> its evaluation (holding `metric` and "loss").
    n : int
        Number of clients.
    metric : str
        The task's main metric (`ExperimentConfig.metric_name`: "accuracy" or "rouge1").

    Returns
    -------
    dict
        `metric` and "loss" (per-client lists) and "mean_<metric>", "std_<metric>" over the clients that answered.
    """
    values = [results[k][metric] if k in results else None for k in range(n)]
    loss = [results[k]["loss"] if k in results else None for k in range(n)]
    arrived = np.array([a for a in values if a is not None], dtype=np.float64)
    return {metric: values, "loss": loss,
            f"mean_{metric}": float(arrived.mean()) if arrived.size else float("nan"),
            f"std_{metric}": float(arrived.std()) if arrived.size else float("nan")}


def method_result(method: Method, config: ExperimentConfig, warm_history: list[dict], history: list[dict],
                  states: list[ClientState], experts, wall_s: float) -> dict:
    """The record of one method's run: its history, final per-client metrics (the task's main metric,
    `config.metric_name`, its mean and std) and learnt lam."""
    final = history[-1] if history else warm_history[-1]
    metric = config.metric_name
    lams = {str(k): {g: float(torch.sigmoid(v)) if method.fixed_lam is None else float(method.fixed_lam)
                     for g, v in s.logits.items()}
            for k, s in enumerate(states) if s is not None and experts[k][1] is not None}
    return {"method": method.name, "description": method.description, "history": warm_history + history,
            f"mean_{metric}": final[f"mean_{metric}"], f"std_{metric}": final[f"std_{metric}"],
            metric: final[metric], "rounds": config.warmup_rounds + config.rounds, "wall_s": wall_s,
            "lam": lams, "method_state": method.summary()}


class Federation:
    """The in-process run: one `ClientPool`, its clients as the nodes of an in-process Grid, and the
    experiment over them (`fedtreelora.flower.experiment.Experiment`); `warmup()`, then `run_method()`."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, dataset: TextDataset | None = None,
                 progress: bool = True, resume: bool = False, overwrite: bool = False):
        from ..flower.experiment import Experiment
        from ..flower.pool_nodes import pool_grid
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        check_run_folder(self.run_dir, config, resume, overwrite)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        self.pool = ClientPool(config, dataset if dataset is not None else load_dataset_for(config))
        self.dataset, self.clients = self.pool.dataset, self.pool.clients
        self.groups, self.weights = self.pool.groups, self.pool.weights
        self.trainer = self.pool.trainer()
        self.trainer.progress = progress and config.task == "causal_lm"   # per-step and generation bars: slow steps
        self.metric = config.metric_name
        self.initial = self.pool.initial
        self.experiment = Experiment(pool_grid(self.pool, progress), config, self.run_dir, resume=resume)

    def warmup(self) -> tuple[list[ClientState], list[dict]]:
        """The shared warm-up: (every client's warm-up upload, the warm-up's history)."""
        from ..flower.local_grid import in_process_server
        with in_process_server():
            return self.experiment.warmup()

    def run_method(self, name: str) -> dict:
        """One method's rounds after the warm-up; its `method_result`."""
        from ..flower.local_grid import in_process_server
        with in_process_server():
            return self.experiment.run_method(name)

    def summary(self, results: dict) -> dict:
        """The run's record, written to the run folder."""
        extra = {"group_names": list(self.dataset.group_names)} if self.config.task == "causal_lm" else {}
        return self.experiment.summary(results, **extra)


def check_run_folder(run_dir: Path, config: ExperimentConfig, resume: bool = False, overwrite: bool = False) -> None:
    """Never mix two runs in one folder: a run with other settings is refused; a finished or killed
    run is continued (resume) or, on request only, started over (overwrite). Writes config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    checkpoints = run_dir / "checkpoints"
    fresh = overwrite and not resume
    if path.is_file() and not fresh:
        saved = ExperimentConfig.complete(json.loads(path.read_text()))
        wanted = json.loads(json.dumps(config.to_dict()))
        gone = sorted(set(saved) - set(wanted))
        if gone:
            raise RunFolderError(f"run folder {run_dir} holds a run with settings that no longer exist ({gone}); "
                                 "it cannot be continued with this version: use another --run-dir or --overwrite")
        if saved != wanted:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise RunFolderError(f"run folder {run_dir} holds a run with another config (differs in {diff}); "
                                 "use another --run-dir, the same settings, or --overwrite")
    if resume and checkpoints.is_dir() and any(earlier_layout(f) for f in checkpoints.iterdir()):
        raise RunFolderError(f"run folder {run_dir} {EARLIER_LAYOUT}")   # before the model and data are loaded
    if checkpoints.exists() and not resume:
        if not fresh:
            raise RunFolderError(f"run folder {run_dir} already holds a run; resume it (--resume) or start it "
                                 "over (--overwrite), or use another --run-dir")
        shutil.rmtree(checkpoints)
    write_json(path, config.to_dict())


def run_experiment(config: ExperimentConfig, methods: list[str] | None = None, run_dir: str | Path = "runs/simulate",
                   *, dataset: TextDataset | None = None, resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Warm-up once, then every method; writes metrics.json (and plots, tree.json) into run_dir.

    Every round is `fedtreelora.flower.strategy.PersonalisedStrategy`'s under flwr's
    `Strategy.start`, the clients being nodes of an in-process Grid (see the module docstring). A
    run_dir that already holds a run is continued with resume=True, started over with
    overwrite=True, and refused otherwise."""
    methods = list(methods or DEFAULT_METHODS)
    for name in methods:
        make_method(name)   # fail on a typo before any training
    fed = Federation(config, run_dir, dataset=dataset, progress=progress, resume=resume, overwrite=overwrite)
    fed.warmup()
    results = {name: fed.run_method(name) for name in tqdm(methods, desc="methods", disable=not progress,
                                                           dynamic_ncols=True)}
    return fed.summary(results)
