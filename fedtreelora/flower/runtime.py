"""One client's side of the federation inside a ClientApp: the data split, model and trainer of
`federation.Federation`, built by the same functions, once per process and experiment config.

A ClientApp is called once per message and may share its process with other clients (the Ray
actors of the simulation engine run many), so the runtime is cached by (config, dataset source).
Every client of one config builds the identical model (seeded), tokenises the same texts and draws
the same partition as the in-process run, then uses only its own split: client k trains exactly
what `Federation._train` trains for k.
"""
from __future__ import annotations

import importlib
import json
import threading
from typing import Callable

from ..client import ClientState, LocalTrainer
from ..config import ExperimentConfig
from ..data import TextDataset, load_dataset_for, partition
from ..federation import derived_seed
from ..models import add_lora, load_classifier, load_tokenizer, tokenize

DatasetSource = Callable[[ExperimentConfig], TextDataset] | str | None

_CACHE: dict[tuple[str, str], "ClientRuntime"] = {}
_LOCK = threading.Lock()


def resolve_dataset_fn(source: DatasetSource) -> Callable[[ExperimentConfig], TextDataset]:
    """None: the config's own dataset (`data.load_dataset_for`); "module:function" or a callable:
    a function of the config returning a `TextDataset` (own data without an HF dataset folder)."""
    if source is None or source == "":
        return load_dataset_for
    if callable(source):
        return source
    module, sep, name = str(source).partition(":")
    if not sep or not module or not name:
        raise ValueError(f'dataset-fn must look like "package.module:function", got {source!r}')
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"dataset-fn {source!r} cannot be loaded: {exc}") from exc


class ClientRuntime:
    def __init__(self, config: ExperimentConfig, dataset: TextDataset):
        self.config = config
        self.dataset = dataset
        self.clients = partition(dataset.labels, config.num_clients, config.samples_per_client,
                                 num_groups=config.num_groups, alpha=config.dirichlet_alpha, classes_per_group=config.classes_per_group,
                                 train_fraction=config.train_fraction, seed=config.seed)
        self.lock = threading.Lock()     # one model per process: one client at a time
        self._trainer = None

    def trainer(self) -> tuple[LocalTrainer, ClientState]:
        """(trainer, the initial state), built on first use: a "query" needs only the partition, and a
        deployed ClientApp runs in a fresh process per message."""
        if self._trainer is None:
            config = self.config
            if config.num_threads > 0:
                import torch
                torch.set_num_threads(config.num_threads)
            features = tokenize(load_tokenizer(config.model), self.dataset.texts, config.max_length)
            model = add_lora(load_classifier(config.model, self.dataset.num_labels, seed=config.seed), config,
                             seed=config.seed)
            trainer = LocalTrainer(model, features, config)
            self._trainer = (trainer, trainer.initial_state())
        return self._trainer

    @classmethod
    def get(cls, config: ExperimentConfig, dataset_source: DatasetSource = None) -> "ClientRuntime":
        key = (json.dumps(config.to_dict(), sort_keys=True), repr(dataset_source))
        with _LOCK:
            if key not in _CACHE:
                _CACHE.clear()            # one experiment per process at a time: free the last model
                _CACHE[key] = cls(config, resolve_dataset_fn(dataset_source)(config))
            return _CACHE[key]

    def client(self, k: int):
        if not 0 <= k < len(self.clients):
            raise ValueError(f"partition-id {k} is outside the experiment's {len(self.clients)} clients")
        return self.clients[k]

    def describe(self, k: int) -> dict:
        client = self.client(k)
        return {"num-train": int(client.num_train), "num-test": int(len(client.test_idx)), "group": int(client.group)}

    def train(self, k: int, start: ClientState | None, external, round_: int) -> tuple[ClientState, dict]:
        """`Federation._train` for client k: load start (None: the initial LoRA) and external, train, return."""
        client = self.client(k)
        with self.lock:
            trainer, initial = self.trainer()
            start = start if start is not None else initial
            trainer.load(start, external)
            info = trainer.train(client.train_idx, client.train_labels, seed=derived_seed(self.config.seed, round_, k),
                                 train_head=self.config.warmup_head or round_ >= self.config.warmup_rounds)
            return trainer.upload(start, seed=derived_seed(self.config.seed, round_, k, 1)), info

    def evaluate(self, k: int, state: ClientState, external) -> dict:
        """`Federation._evaluate` for client k: its personalised model on its test split."""
        client = self.client(k)
        with self.lock:
            trainer, _ = self.trainer()
            trainer.load(state, external)
            return trainer.evaluate(client.test_idx, client.test_labels)


def partition_id(node_config) -> int:
    """The client index of this SuperNode: node config "partition-id" (set by the simulation engine,
    or by `flower-supernode --node-config "partition-id=0 num-partitions=2"`)."""
    if "partition-id" not in node_config:
        raise KeyError('this SuperNode has no "partition-id" in its node config; start it with '
                       '--node-config "partition-id=<k> num-partitions=<N>"')
    return int(node_config["partition-id"])


def num_partitions(node_config) -> int | None:
    return int(node_config["num-partitions"]) if "num-partitions" in node_config else None
