"""The round schedule: a shared warm-up, then each method's rounds, checkpointed atomically.

Round structure (every method): the server turns the latest uploads into each client's experts;
the selected clients (`select_clients`) load theirs (cluster expert into PEFT's adapter, external
expert into the mixer, their own mixing logits), train locally and upload; the server aggregates
again and every client is evaluated on what it receives (its personalised model). Warm-up rounds are
plain local training of every client and are shared by all methods (same starting point, computed
once). The Flower ServerApp uses the same selection and result record.

Checkpoints (`checkpoints.py`): one folder per phase under `<run>/checkpoints/`. What a method
decides after warm-up (the tree, the partitions) is kept in `method.json` and reused on resume.
Every random draw is derived from (seed, round, client), so a resumed run replays the remaining
rounds exactly.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..client.trainer import ClientState
from .checkpoints import CheckpointError, RunFolderError, load_checkpoint, save_checkpoint, write_json
from .config import ExperimentConfig
from .data import TextDataset, load_dataset_for
from .methods import DEFAULT_METHODS, Method, make_method
from .pool import ClientPool, derived_seed

__all__ = ["Federation", "run_experiment", "select_clients", "method_result", "evaluation_record", "WARMUP",
           "CheckpointError", "RunFolderError", "derived_seed"]

WARMUP = "warmup"


def select_clients(config: ExperimentConfig, global_round: int, n: int) -> list[int]:
    """The clients that train in federated round `global_round` (0-based, warm-up rounds counted)."""
    n_selected = max(1, int(round(config.client_fraction * n)))
    return sorted(np.random.default_rng([config.seed, global_round, 1]).choice(n, n_selected, replace=False).tolist())


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
    lams = {str(k): {g: float(torch.sigmoid(v)) for g, v in s.logits.items()}
            for k, s in enumerate(states) if experts[k][1] is not None}
    return {"method": method.name, "description": method.description, "history": warm_history + history,
            f"mean_{metric}": final[f"mean_{metric}"], f"std_{metric}": final[f"std_{metric}"],
            metric: final[metric], "rounds": config.warmup_rounds + config.rounds, "wall_s": wall_s,
            "lam": lams, "method_state": method.summary()}


class Federation:
    """The in-process driver: one ClientPool, `warmup()` once, then `run_method()` per method."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, dataset: TextDataset | None = None,
                 progress: bool = True, resume: bool = False, overwrite: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self._check_config(resume, overwrite)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        self.pool = ClientPool(config, dataset if dataset is not None else load_dataset_for(config))
        self.dataset, self.clients = self.pool.dataset, self.pool.clients
        self.groups, self.weights = self.pool.groups, self.pool.weights
        self.trainer = self.pool.trainer()
        self.trainer.progress = progress and config.task == "causal_lm"   # per-step and generation bars: slow steps
        self.metric = config.metric_name
        self.methods: dict[str, Method] = {}
        self.initial = self.pool.initial

    def _check_config(self, resume: bool = False, overwrite: bool = False) -> None:
        """Never mix two runs in one folder: a run with other settings is refused; a finished or killed
        run is continued (resume) or, on request only, started over (overwrite)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.json"
        checkpoints = self.run_dir / "checkpoints"
        fresh = overwrite and not resume
        if path.is_file() and not fresh:
            saved = json.loads(path.read_text())
            if saved != json.loads(json.dumps(self.config.to_dict())):
                diff = sorted(k for k in saved if saved.get(k) != self.config.to_dict().get(k))
                raise RunFolderError(f"run folder {self.run_dir} holds a run with another config (differs in {diff}); "
                                     "use another --run-dir, the same settings, or --overwrite")
        if checkpoints.exists() and not resume:
            if not fresh:
                raise RunFolderError(f"run folder {self.run_dir} already holds a run; resume it (--resume) or start it "
                                     "over (--overwrite), or use another --run-dir")
            shutil.rmtree(checkpoints)
        write_json(path, self.config.to_dict())

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    def _evaluate(self, states: list[ClientState], experts) -> dict:
        results = {k: self.pool.evaluate(k, ClientState(experts[k][0], states[k].logits), experts[k][1])
                   for k in range(len(self.clients))}
        return evaluation_record(results, len(self.clients), self.metric)

    def _train(self, k: int, start: ClientState, external, round_: int) -> ClientState:
        return self.pool.train(k, start, external, round_)[0]

    def warmup(self, resume: bool = False) -> tuple[list[ClientState], list[dict]]:
        """`warmup_rounds` rounds of local training of every client (shared by all methods)."""
        folder = self.run_dir / "checkpoints" / WARMUP
        states = [self.initial] * len(self.clients)
        history, start, wall = [], 0, 0.0
        loaded = load_checkpoint(folder) if resume else None
        if loaded:
            info, states = loaded
            history, start, wall = info["history"], info["round"], info["wall_s"]
        for r in range(start, self.config.warmup_rounds):
            t0 = time.perf_counter()
            with self._bar(len(self.clients), f"warm-up round {r + 1}/{self.config.warmup_rounds}") as bar:
                new_states = []
                for k in range(len(self.clients)):
                    new_states.append(self._train(k, states[k], None, r))
                    bar.update()
            states = new_states
            metrics = self._evaluate(states, [(s.adapter, None) for s in states])
            wall += time.perf_counter() - t0
            history.append({"round": r + 1, "phase": WARMUP, **metrics})
            save_checkpoint(folder, r + 1, states, {"history": history, "wall_s": wall})
        self.warmup_wall_s = wall
        return states, history

    def run_method(self, name: str, warm_states: list[ClientState], warm_history: list[dict], resume: bool = False) -> dict:
        cfg = self.config
        method = make_method(name)
        folder = self.run_dir / "checkpoints" / name
        folder.mkdir(parents=True, exist_ok=True)
        decided = folder / "method.json"
        if resume and decided.is_file():     # the tree / partitions decided after warm-up, reused as they were
            method.load_state(json.loads(decided.read_text()), cfg)
        else:
            method.setup([s.adapter for s in warm_states], self.weights, cfg, self.groups)
            write_json(decided, method.state())
        states, history, start, wall = list(warm_states), [], 0, 0.0
        loaded = load_checkpoint(folder) if resume else None
        if loaded:
            info, states = loaded
            history, start, wall = info["history"], info["round"], info["wall_s"]
        t0 = time.perf_counter()
        experts = method.aggregate([s.adapter for s in states], self.weights)
        wall += time.perf_counter() - t0
        for r in range(start, cfg.rounds):
            t0 = time.perf_counter()
            global_round = cfg.warmup_rounds + r
            selected = select_clients(cfg, global_round, len(self.clients))
            with self._bar(len(selected), f"{name} round {r + 1}/{cfg.rounds}") as bar:
                for k in selected:
                    cluster, external = experts[k]
                    states[k] = self._train(k, ClientState(cluster, states[k].logits), external, global_round)
                    bar.update()
            experts = method.aggregate([s.adapter for s in states], self.weights)
            metrics = self._evaluate(states, experts)
            wall += time.perf_counter() - t0
            history.append({"round": global_round + 1, "phase": name, "selected": selected, **metrics})
            save_checkpoint(folder, r + 1, states, {"history": history, "wall_s": wall})
        if not history and not warm_history:   # no rounds at all: evaluate the initial experts once
            warm_history = [{"round": 0, "phase": WARMUP, **self._evaluate(states, experts)}]
        self.methods[name] = method
        return method_result(method, cfg, warm_history, history, states, experts, wall)


def run_experiment(config: ExperimentConfig, methods: list[str] | None = None, run_dir: str | Path = "runs/simulate",
                   *, dataset: TextDataset | None = None, resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Warm-up once, then every method; writes metrics.json (and plots, tree.json) into run_dir.

    A run_dir that already holds a run is continued with resume=True, started over with
    overwrite=True, and refused otherwise."""
    from ..report import write_outputs
    methods = list(methods or DEFAULT_METHODS)
    for name in methods:
        make_method(name)   # fail on a typo before any training
    fed = Federation(config, run_dir, dataset=dataset, progress=progress, resume=resume, overwrite=overwrite)
    warm_states, warm_history = fed.warmup(resume=resume)
    results = {}
    for name in tqdm(methods, desc="methods", disable=not progress, dynamic_ncols=True):
        results[name] = fed.run_method(name, warm_states, warm_history, resume=resume)
    summary = {
        "config": config.to_dict(),
        "metric": config.metric_name,
        "groups": fed.groups.tolist(),
        **({"group_names": list(fed.dataset.group_names)} if config.task == "causal_lm" else {}),
        "weights": fed.weights.tolist(),
        "warmup_wall_s": fed.warmup_wall_s,
        "methods": results,
    }
    tree_method = fed.methods.get("fedtreelora")
    write_outputs(Path(run_dir), summary, tree=tree_method.tree if tree_method is not None else None)
    return summary
