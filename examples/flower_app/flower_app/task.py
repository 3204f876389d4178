"""Model and data of the app: a PEFT LoRA sequence classifier and this node's split of the corpus.

Nothing here knows about FedTreeLoRA: it is what a FlowerTune app's `models.py` and `dataset.py`
hold. Every node draws the same partition (from `seed`) and keeps its own part, chosen by its node
config "partition-id" out of "num-partitions" (the simulation engine sets both; on a SuperNode pass
`--node-config "partition-id=0 num-partitions=4"`).
"""
from __future__ import annotations

import functools
import importlib

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedtreelora.client.models import load_classifier, load_tokenizer, tokenize
from fedtreelora.federation.data import load_bbcnews, load_hf_dataset, partition


def _dataset(name: str, dataset_fn: str):
    if dataset_fn:
        module, _, function = dataset_fn.partition(":")
        return getattr(importlib.import_module(module), function)(None)
    return load_bbcnews() if name == "bbcnews" else load_hf_dataset(name)


@functools.lru_cache(maxsize=2)
def corpus(name: str, dataset_fn: str, model_name: str, max_length: int):
    """(tokenised features of every document, number of labels), once per process."""
    data = _dataset(name, dataset_fn)
    return data, tokenize(load_tokenizer(model_name), data.texts, max_length)


def load_data(run_config, node_config):
    """This node's (train features, train labels, test features, test labels)."""
    data, features = corpus(str(run_config["data.name"]), str(run_config["data.dataset-fn"]),
                            str(run_config["model.name"]), int(run_config["data.max-length"]))
    k, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    clients = partition(data.labels, n, int(run_config["data.samples-per-node"]),
                        num_groups=min(int(run_config["data.num-groups"]), n),
                        alpha=float(run_config["data.dirichlet-alpha"]),
                        classes_per_group=int(run_config["data.classes-per-group"]), seed=int(run_config["seed"]))
    mine = clients[k]
    pick = lambda idx: {key: v[torch.as_tensor(idx)] for key, v in features.items()}   # noqa: E731
    return (pick(mine.train_idx), torch.as_tensor(mine.train_labels), pick(mine.test_idx),
            torch.as_tensor(mine.test_labels))


def num_labels(run_config) -> int:
    data, _ = corpus(str(run_config["data.name"]), str(run_config["data.dataset-fn"]),
                     str(run_config["model.name"]), int(run_config["data.max-length"]))
    return data.num_labels


def get_model(run_config):
    """The PEFT model: the classifier with LoRA on `model.lora.target-modules` (its head is trained too)."""
    model = load_classifier(str(run_config["model.name"]), num_labels(run_config), seed=int(run_config["seed"]))
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=int(run_config["model.lora.r"]),
                      lora_alpha=float(run_config["model.lora.alpha"]),
                      target_modules=[m.strip() for m in str(run_config["model.lora.target-modules"]).split(",")])
    torch.manual_seed(int(run_config["seed"]))
    return get_peft_model(model, lora)


def batches(features, labels, batch_size: int, steps: int, seed: int):
    """`steps` batches drawn by epochs of a seeded shuffle."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(labels)), 0
    for _ in range(steps):
        if pos >= len(order):
            order, pos = rng.permutation(len(labels)), 0
        take = torch.as_tensor(order[pos:pos + batch_size])
        pos += batch_size
        yield {k: v[take] for k, v in features.items()}, labels[take]
