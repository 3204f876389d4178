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
import logging
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
from .draws import derived_seed, draw_clients
from .pool import ClientPool

__all__ = ["Federation", "Schedule", "Driver", "InProcess", "check_run_folder", "run_experiment", "select_clients", "method_result", "evaluation_record", "WARMUP",
           "CheckpointError", "RunFolderError", "derived_seed"]

WARMUP = "warmup"
logger = logging.getLogger("fedtreelora")


def select_clients(config: ExperimentConfig, global_round: int, n: int) -> list[int]:
    """The clients that train in federated round `global_round` (0-based, warm-up rounds counted):
    round(client_fraction * n) of them (at least one), drawn by `draws.draw_clients`."""
    return draw_clients(config.seed, global_round, range(n), max(1, int(round(config.client_fraction * n))))


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


class Driver:
    """How a schedule reaches its clients: in this process (`Federation`) or over Flower.

    `train` and `evaluate` get, per client index, what to send it and return what came back; a
    client missing from the answer failed (a Flower driver logs why), and the schedule keeps its
    previous upload. `records_failures` adds the failed clients to each round's record.
    """

    records_failures = False

    def initial_states(self, n: int) -> list[ClientState | None]:
        """The warm-up's starting states (None: the client starts from its own initial LoRA)."""
        raise NotImplementedError

    def train(self, round_: int, phase: str, jobs: dict[int, tuple[ClientState | None, dict | None]],
              desc: str, fixed_lam: float | None = None) -> dict[int, ClientState]:
        """Train client k from jobs[k] = (start, external expert) in round `round_` (0-based); the uploads.
        fixed_lam: hold lam at this value instead of training it."""
        raise NotImplementedError

    def evaluate(self, round_: int, phase: str, jobs: dict[int, tuple[ClientState, dict | None]]) -> dict[int, dict]:
        """Evaluate client k's personalised model jobs[k]; {k: {"accuracy", "loss", ...}} of those that answered."""
        raise NotImplementedError

    def checkpoint_info(self) -> dict:
        """Extra fields a checkpoint keeps for this driver (restored by `restore`)."""
        return {}

    def restore(self, info: dict) -> None:
        pass

    def round_done(self, phase: str, round_in_phase: int, total: int, record: dict) -> None:
        pass


class Schedule:
    """Warm-up once, then each method's rounds, over any `Driver`, checkpointed under run_dir.

    Both drivers share this: the warm-up, the method's set-up after it (kept in `method.json` and
    reloaded on resume), client selection, aggregation, evaluation, the per-round record and the
    checkpoints."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, driver: Driver, weights, groups,
                 resume: bool = False):
        self.config, self.driver, self.resume = config, driver, resume
        self.checkpoints = Path(run_dir) / "checkpoints"
        self.weights, self.groups = np.asarray(weights, dtype=np.float64), np.asarray(groups)
        self.n = len(self.weights)
        self.methods: dict[str, Method] = {}
        self.warmup_wall_s = 0.0
        self._loaded_method = None   # what a resumed checkpoint says the method had decided

    def _load(self, folder: Path, states, history, wall):
        self._loaded_method = None
        loaded = load_checkpoint(folder) if self.resume else None
        if not loaded:
            return states, history, 0, wall
        info, states = loaded
        self.driver.restore(info)
        self._loaded_method = info.get("method")
        return states, info["history"], info["round"], info["wall_s"]

    def _save(self, folder: Path, round_: int, states, history, wall, method: Method | None = None) -> None:
        info = {"history": history, "wall_s": wall, **self.driver.checkpoint_info()}
        if method is not None:
            info["method"] = method.state()   # what the round's experts came from (a join or rebuild changes it)
        save_checkpoint(folder, round_, states, info)

    def _round(self, r: int, phase: str, states: list, experts, selected: list[int], desc: str,
               fixed_lam: float | None = None) -> list[int]:
        """Train `selected` (from their experts; in warm-up from their own states); the ones that failed."""
        jobs = {k: (states[k], None) if experts is None else (ClientState(experts[k][0], states[k].logits), experts[k][1])
                for k in selected}   # a client absent so far (None) starts from its own initial state
        arrived = self.driver.train(r, phase, jobs, desc, fixed_lam)
        for k, upload in arrived.items():
            states[k] = upload
        return sorted(set(selected) - set(arrived))

    def _evaluate(self, r: int, phase: str, states: list, experts, fixed_lam: float | None = None):
        """Evaluate every client that has a state: (the round's record, the clients that failed)."""
        def logits(s):
            if fixed_lam is None:
                return s.logits
            return {g: torch.logit(torch.tensor(float(fixed_lam))) for g in s.logits}
        jobs = {k: (s, None) if experts is None else (ClientState(experts[k][0], logits(s)), experts[k][1])
                for k, s in enumerate(states) if s is not None}  # never uploaded: nothing to evaluate
        results = self.driver.evaluate(r, phase, jobs)
        record = evaluation_record(results, len(states), self.config.metric_name)
        return record, sorted(set(range(len(states))) - set(results))

    def _record(self, base: dict, metrics: dict, failed_train, failed_eval) -> dict:
        record = {**base, **metrics}
        if self.driver.records_failures:
            record["failed"] = {"train": failed_train, "evaluate": failed_eval}
        return record

    @property
    def n_early(self) -> int:
        """The clients present from the start (the late ones are the last `late_clients`)."""
        return self.n - self.config.late_clients

    def warmup(self) -> tuple[list[ClientState | None], list[dict]]:
        """`warmup_rounds` rounds of local training of every early client (shared by all methods)."""
        cfg, folder, early = self.config, self.checkpoints / WARMUP, self.n_early
        initial = self.driver.initial_states(self.n)
        initial = initial[:early] + [None] * (self.n - early)   # late clients have nothing yet
        states, history, start, wall = self._load(folder, initial, [], 0.0)
        for r in range(start, cfg.warmup_rounds):
            t0 = time.perf_counter()
            failed = self._round(r, WARMUP, states, None, list(range(early)), f"warm-up round {r + 1}/{cfg.warmup_rounds}")
            metrics, failed_eval = self._evaluate(r, WARMUP, states, None)
            wall += time.perf_counter() - t0
            history.append(self._record({"round": r + 1, "phase": WARMUP}, metrics, failed, failed_eval))
            self.driver.round_done(WARMUP, r + 1, cfg.warmup_rounds, history[-1])
            self._save(folder, r + 1, states, history, wall)
        never = [k for k, s in enumerate(states[:early]) if s is None]
        if never:
            raise RuntimeError(f"client(s) {never} uploaded nothing during warm-up; the tree needs every client's "
                               "LoRA (raise warmup_rounds or fix those clients)")
        self.warmup_wall_s = wall
        return states, history

    def _join(self, method: Method, states: list, name: str) -> None:
        """The late clients' own local warm-up (the warm-up's rounds and seeds), then their placement."""
        cfg, early, late = self.config, self.n_early, list(range(self.n_early, self.n))
        initial = self.driver.initial_states(self.n)
        for k in late:
            states[k] = initial[k]
        for r in range(cfg.warmup_rounds):
            failed = self._round(r, WARMUP, states, None, late, f"{name}: late clients' warm-up {r + 1}/{cfg.warmup_rounds}")
            if failed:
                raise RuntimeError(f"late client(s) {failed} failed their warm-up")
        method.extend([s.adapter for s in states[:early]], [states[k].adapter for k in late], self.weights, self.groups)

    def run_method(self, name: str, warm_states: list[ClientState | None], warm_history: list[dict]) -> dict:
        """The method's set-up on the warm-up uploads, then its rounds; returns its `method_result`.

        With `late_clients`, the late clients join at `late_round` (their own warm-up, then
        `method.extend`); with `rebuild_every` = R, the method decides again from the latest uploads
        after every R-th round. What the method decided is kept with every checkpoint, so a resumed
        run continues with the tree it had."""
        cfg, early = self.config, self.n_early
        method = make_method(name)
        folder = self.checkpoints / name
        folder.mkdir(parents=True, exist_ok=True)
        decided = folder / "method.json"
        if self.resume and decided.is_file():     # the tree / partitions decided after warm-up, reused as they were
            method.load_state(json.loads(decided.read_text()), cfg)
        else:
            method.setup([s.adapter for s in warm_states[:early]], self.weights[:early], cfg, self.groups[:early])
            write_json(decided, method.state())
        states, history, start, wall = self._load(folder, list(warm_states), [], 0.0)
        if self._loaded_method is not None:       # decided later than warm-up (a join or a rebuild)
            method.load_state(self._loaded_method, cfg)
        present = lambda: sum(s is not None for s in states)   # noqa: E731  (early clients, then the late)

        def experts_now():
            m = present()
            return method.aggregate([s.adapter for s in states[:m]], self.weights[:m]) + [(None, None)] * (self.n - m)

        t0 = time.perf_counter()
        experts = experts_now()
        wall += time.perf_counter() - t0
        for r in range(start, cfg.rounds):
            t0 = time.perf_counter()
            global_round = cfg.warmup_rounds + r
            base = {"round": global_round + 1, "phase": name}
            if cfg.late_clients and r == cfg.late_round - 1 and present() < self.n:
                self._join(method, states, name)
                experts = experts_now()
                base["joined"] = list(range(early, self.n))
            selected = select_clients(cfg, global_round, present())
            base["selected"] = selected
            failed = self._round(global_round, name, states, experts, selected, f"{name} round {r + 1}/{cfg.rounds}",
                                 method.fixed_lam)
            experts = experts_now()
            metrics, failed_eval = self._evaluate(global_round, name, states, experts, method.fixed_lam)
            if cfg.rebuild_every and (r + 1) % cfg.rebuild_every == 0 and r + 1 < cfg.rounds:
                m = present()   # decide again from the latest uploads; used from the next round on
                method.setup([s.adapter for s in states[:m]], self.weights[:m], cfg, self.groups[:m])
                experts = experts_now()
                base["rebuilt"] = True
            wall += time.perf_counter() - t0
            history.append(self._record(base, metrics, failed, failed_eval))
            self.driver.round_done(name, r + 1, cfg.rounds, history[-1])
            self._save(folder, r + 1, states, history, wall, method)
        if not history and not warm_history:   # no rounds at all: evaluate the initial experts once
            warm_history = [{"round": 0, "phase": WARMUP, **self._evaluate(0, WARMUP, states, experts)[0]}]
        self.methods[name] = method
        self.states, self.experts = states, experts
        return method_result(method, cfg, warm_history, history, states, experts, wall)


class InProcess(Driver):
    """Every client trained and evaluated in this process, one after another, on the pool's model."""

    def __init__(self, pool: ClientPool, progress: bool = True):
        self.pool, self.progress = pool, progress

    def initial_states(self, n):
        return [self.pool.initial] * n

    def train(self, round_, phase, jobs, desc, fixed_lam=None):
        uploads = {}
        with tqdm(total=len(jobs), desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True) as bar:
            for k, (start, external) in jobs.items():
                uploads[k] = self.pool.train(k, start, external, round_, fixed_lam=fixed_lam)[0]
                bar.update()
        return uploads

    def evaluate(self, round_, phase, jobs):
        return {k: self.pool.evaluate(k, state, external) for k, (state, external) in jobs.items()}


class Federation:
    """The in-process run: one ClientPool and a `Schedule` over it; `warmup()`, then `run_method()`."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, dataset: TextDataset | None = None,
                 progress: bool = True, resume: bool = False, overwrite: bool = False):
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
        self.schedule = Schedule(config, self.run_dir, InProcess(self.pool, progress), self.weights, self.groups,
                                 resume=resume)
        self.methods = self.schedule.methods

    @property
    def warmup_wall_s(self) -> float:
        return self.schedule.warmup_wall_s

    def warmup(self, resume: bool = False) -> tuple[list[ClientState], list[dict]]:
        return self.schedule.warmup()

    def run_method(self, name: str, warm_states: list[ClientState], warm_history: list[dict], resume: bool = False) -> dict:
        return self.schedule.run_method(name, warm_states, warm_history)


def check_run_folder(run_dir: Path, config: ExperimentConfig, resume: bool = False, overwrite: bool = False) -> None:
    """Never mix two runs in one folder: a run with other settings is refused; a finished or killed
    run is continued (resume) or, on request only, started over (overwrite). Writes config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    checkpoints = run_dir / "checkpoints"
    fresh = overwrite and not resume
    if path.is_file() and not fresh:
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(config.to_dict())):
            diff = sorted(k for k in saved if saved.get(k) != config.to_dict().get(k))
            raise RunFolderError(f"run folder {run_dir} holds a run with another config (differs in {diff}); "
                                 "use another --run-dir, the same settings, or --overwrite")
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
