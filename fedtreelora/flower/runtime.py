"""One client's side of the experiment inside a ClientApp: the same `federation.pool.ClientPool`
`fedtreelora simulate` uses, built once per process and experiment config.

A ClientApp is called once per message and may share its process with other clients (the Ray
actors of the simulation engine run many), so the pool is cached by (config, dataset source).
Every client of one config builds the identical model (seeded), tokenises the same texts and draws
the same partition as the in-process run, then uses only its own split: client k trains exactly
what it trains in process.
"""
from __future__ import annotations

import importlib
import json
import threading
from typing import Callable

from ..federation.config import ExperimentConfig
from ..federation.data import TextDataset, load_dataset_for
from ..federation.pool import ClientPool

DatasetSource = Callable[[ExperimentConfig], TextDataset] | str | None

_CACHE: dict[tuple[str, str], ClientPool] = {}
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


def client_pool(config: ExperimentConfig, dataset_source: DatasetSource = None) -> ClientPool:
    """The `ClientPool` of one experiment config and dataset source, cached per process."""
    key = (json.dumps(config.to_dict(), sort_keys=True), repr(dataset_source))
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()            # one experiment per process at a time: free the last model
            _CACHE[key] = ClientPool(config, resolve_dataset_fn(dataset_source)(config))
        return _CACHE[key]


def partition_id(node_config) -> int:
    """The client index of this SuperNode: node config "partition-id" (set by the simulation engine,
    or by `flower-supernode --node-config "partition-id=0 num-partitions=2"`)."""
    if "partition-id" not in node_config:
        raise KeyError('this SuperNode has no "partition-id" in its node config; start it with '
                       '--node-config "partition-id=<k> num-partitions=<N>"')
    return int(node_config["partition-id"])


def num_partitions(node_config) -> int | None:
    return int(node_config["num-partitions"]) if "num-partitions" in node_config else None
