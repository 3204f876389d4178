"""In-process federation: shared warm-up, then each method's rounds, checkpointed atomically.

Round structure (every method): the server turns the latest uploads into each client's experts;
the selected clients load theirs (cluster expert into PEFT's adapter, external expert into the
mixer, their own mixing logits), train locally and upload; the server aggregates again and every
client is evaluated on what it receives (its personalised model). Warm-up rounds are plain local
training of every client and are shared by all methods (same starting point, computed once).

Checkpoints: after every round, `<run>/checkpoints/<phase>/round_XXX.safetensors` (all uploads and
mixing logits, keys "<client>/<key>") then `state.json` (round, history, wall time) replaced
atomically; state.json is the commit point, older round files are removed after it. What a method
decides after warm-up (the tree, the partitions) is kept in `method.json` and reused on resume. Every random
draw is derived from (seed, round, client), so a resumed run replays the remaining rounds exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .client import ClientState, LocalTrainer
from .config import ExperimentConfig
from .data import TextDataset, load_dataset_for, partition
from .methods import DEFAULT_METHODS, make_method
from .models import add_lora, load_classifier, load_tokenizer, tokenize

WARMUP = "warmup"


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# -- atomic checkpoint files ----------------------------------------------------------------------
def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: Path, round_: int, states: list[ClientState], info: dict) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, state in enumerate(states):
        tensors.update({f"{k}/adapter/{key}": v.contiguous() for key, v in state.adapter.items()})
        tensors.update({f"{k}/mixing/{g}": v.reshape(1) for g, v in state.logits.items()})
    name = f"round_{round_:03d}.safetensors"
    tmp = folder / (name + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb+") as f:   # on disk before state.json points at it
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    os.replace(tmp, folder / name)
    _write_json(folder / "state.json", {**info, "round": round_, "file": name, "sha256": digest,
                                        "num_clients": len(states)})
    for old in folder.glob("round_*.safetensors"):
        if old.name != name:
            old.unlink()


class RunFolderError(ValueError):
    """A run folder that holds another run (other settings, or a run not asked to be resumed)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or corrupt."""


def load_checkpoint(folder: Path) -> tuple[dict, list[ClientState]] | None:
    """The last committed round of `folder` (None if nothing was committed yet).

    Raises CheckpointError, naming the file, when state.json or the round file it points at is
    unreadable, truncated or does not match the SHA-256 recorded when it was written.
    """
    from safetensors.torch import load_file
    path = folder / "state.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        name, num_clients = info["file"], int(info["num_clients"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc}); delete the folder to start over") from exc
    data = folder / name
    if not data.is_file():
        raise CheckpointError(f"checkpoint {data} named by {path} is missing")
    if "sha256" in info and _sha256(data) != info["sha256"]:
        raise CheckpointError(f"checkpoint {data} is corrupt or truncated (SHA-256 differs from the one recorded in {path})")
    try:
        tensors = load_file(str(data))
    except Exception as exc:  # safetensors reports a bad header or a short file in its own error type
        raise CheckpointError(f"checkpoint {data} cannot be read: {exc}") from exc
    states = [ClientState({}, {}) for _ in range(num_clients)]
    for key, v in tensors.items():
        k, kind, rest = key.split("/", 2)
        if kind == "adapter":
            states[int(k)].adapter[rest] = v
        else:
            states[int(k)].logits[rest] = v.reshape(())
    return info, states


# -- the experiment -------------------------------------------------------------------------------
class Federation:
    """Data, model and trainer set up once; `warmup()` and `run_method()` use them."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, dataset: TextDataset | None = None,
                 progress: bool = True, resume: bool = False, overwrite: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self._check_config(resume, overwrite)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        self.dataset = dataset if dataset is not None else load_dataset_for(config)
        self.clients = partition(self.dataset.labels, config.num_clients, config.samples_per_client,
                                 num_groups=config.num_groups, alpha=config.dirichlet_alpha, classes_per_group=config.classes_per_group,
                                 train_fraction=config.train_fraction, seed=config.seed)
        self.groups = np.array([c.group for c in self.clients])
        self.weights = np.array([c.num_train for c in self.clients], dtype=np.float64)
        tokenizer = load_tokenizer(config.model)
        features = tokenize(tokenizer, self.dataset.texts, config.max_length)   # once for every method
        model = add_lora(load_classifier(config.model, self.dataset.num_labels, seed=config.seed), config, seed=config.seed)
        self.trainer = LocalTrainer(model, features, config)
        self.initial = self.trainer.initial_state()

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
        _write_json(path, self.config.to_dict())

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    def _evaluate(self, states: list[ClientState], experts) -> dict:
        results = []
        for k, client in enumerate(self.clients):
            cluster, external = experts[k]
            self.trainer.load(ClientState(cluster, states[k].logits), external)
            results.append(self.trainer.evaluate(client.test_idx, client.test_labels))
        acc = np.array([r["accuracy"] for r in results])
        return {"accuracy": acc.tolist(), "loss": [r["loss"] for r in results],
                "mean_accuracy": float(acc.mean()), "std_accuracy": float(acc.std())}

    def _train(self, k: int, start: ClientState, external, round_: int) -> ClientState:
        client = self.clients[k]
        self.trainer.load(start, external)
        warming_up = round_ < self.config.warmup_rounds
        self.trainer.train(client.train_idx, client.train_labels, seed=derived_seed(self.config.seed, round_, k),
                           train_head=self.config.warmup_head or not warming_up)
        return self.trainer.upload(start, seed=derived_seed(self.config.seed, round_, k, 1))

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
            _write_json(decided, method.state())
        states, history, start, wall = list(warm_states), [], 0, 0.0
        loaded = load_checkpoint(folder) if resume else None
        if loaded:
            info, states = loaded
            history, start, wall = info["history"], info["round"], info["wall_s"]
        t0 = time.perf_counter()
        experts = method.aggregate([s.adapter for s in states], self.weights)
        wall += time.perf_counter() - t0
        n = len(self.clients)
        n_selected = max(1, int(round(cfg.client_fraction * n)))
        for r in range(start, cfg.rounds):
            t0 = time.perf_counter()
            global_round = cfg.warmup_rounds + r
            selected = sorted(np.random.default_rng([cfg.seed, global_round, 1]).choice(n, n_selected, replace=False).tolist())
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
        final = history[-1] if history else warm_history[-1] if warm_history else self._evaluate(states, experts)
        lams = {}
        for k, s in enumerate(states):
            if experts[k][1] is not None:
                lams[str(k)] = {g: float(torch.sigmoid(v)) for g, v in s.logits.items()}
        return {"method": name, "description": method.description, "history": warm_history + history,
                "mean_accuracy": final["mean_accuracy"], "std_accuracy": final["std_accuracy"],
                "accuracy": final["accuracy"], "rounds": cfg.warmup_rounds + cfg.rounds,
                "wall_s": wall, "lam": lams, "method_state": method.summary(), "_method": method}


def run_experiment(config: ExperimentConfig, methods: list[str] | None = None, run_dir: str | Path = "runs/simulate",
                   *, dataset: TextDataset | None = None, resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Warm-up once, then every method; writes metrics.json (and plots, tree.json) into run_dir.

    A run_dir that already holds a run is continued with resume=True, started over with
    overwrite=True, and refused otherwise."""
    from .plots import write_outputs
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
        "groups": fed.groups.tolist(),
        "weights": fed.weights.tolist(),
        "warmup_wall_s": fed.warmup_wall_s,
        "methods": {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()},
    }
    write_outputs(Path(run_dir), summary, results)
    return summary
