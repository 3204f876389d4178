"""The clients of one experiment: their data splits, the one PEFT model they share, and one client's
training and evaluation. `fedtreelora simulate` (its clients as in-process nodes) and the experiment's
Flower ClientApp both serve exactly this (`fedtreelora.flower.pool_nodes.pool_node`), so client k
trains the same thing in either.

Every random draw of a local run comes from (seed, round, client) through `draws.derived_seed`, so any
round can be replayed exactly (this is what makes a resumed run land on the same metrics).
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from ..client.trainer import ClientState, LocalTrainer
from .config import ExperimentConfig
from .data import PromptDataset, TextDataset, partition, partition_by_group
from .draws import derived_seed

__all__ = ["ClientPool", "derived_seed"]


class ClientPool:
    """Clients of `config` over `dataset`; the model and trainer are built on first use.

    Classification (`TextDataset`): `data.partition` (Dirichlet label skew, planted groups), a sequence
    classifier and `LocalTrainer`. Causal LM (`PromptDataset`): `data.partition_by_group` (each client
    one group of the data, e.g. one ACLSum task), a causal LM and `CausalLMTrainer`.
    """

    def __init__(self, config: ExperimentConfig, dataset: "TextDataset | PromptDataset"):
        self.config = config
        self.dataset = dataset
        causal = config.task == "causal_lm"
        if causal != isinstance(dataset, PromptDataset):
            raise TypeError(f"task {config.task!r} needs a {'PromptDataset' if causal else 'TextDataset'}, "
                            f"got a {type(dataset).__name__}")
        if causal:
            self.clients = partition_by_group(dataset.groups, config.num_clients, config.samples_per_client,
                                              num_groups=config.num_groups, train_fraction=config.train_fraction,
                                              seed=config.seed)
        else:
            self.clients = partition(dataset.labels, config.num_clients, config.samples_per_client,
                                     num_groups=config.num_groups, alpha=config.dirichlet_alpha,
                                     classes_per_group=config.classes_per_group, super_groups=config.super_group_count,
                                     train_fraction=config.train_fraction, seed=config.seed)
        self.groups = np.array([c.group for c in self.clients])
        self.weights = np.array([c.num_train for c in self.clients], dtype=np.float64)
        self.lock = threading.Lock()     # one model: one client at a time
        self._trainer: LocalTrainer | None = None
        self._initial: ClientState | None = None

    def trainer(self) -> LocalTrainer:
        """The shared trainer (tokenised texts, the PEFT model), built once; a partition needs none of it."""
        if self._trainer is None:
            from ..client.models import add_lora, load_causal_lm, load_classifier, load_tokenizer, tokenize, tokenize_prompts
            cfg = self.config
            if cfg.num_threads > 0:
                import torch
                torch.set_num_threads(cfg.num_threads)
            tokenizer = load_tokenizer(cfg.model)
            if cfg.task == "causal_lm":
                from ..client.trainer import CausalLMTrainer
                features = tokenize_prompts(tokenizer, self.dataset, cfg.max_length, cfg.chat_template)
                model = add_lora(load_causal_lm(cfg.model), cfg, seed=cfg.seed)
                self._trainer = CausalLMTrainer(model, features, cfg, tokenizer)
            else:
                features = tokenize(tokenizer, self.dataset.texts, cfg.max_length)  # once for every client
                model = add_lora(load_classifier(cfg.model, self.dataset.num_labels, seed=cfg.seed), cfg, seed=cfg.seed)
                self._trainer = LocalTrainer(model, features, cfg)
            self._initial = self._trainer.initial_state()
        return self._trainer

    @property
    def initial(self) -> ClientState:
        """Every client's starting point: the seeded LoRA and head, the initial mixing logits."""
        self.trainer()
        return self._initial

    def client(self, k: int):
        if not 0 <= k < len(self.clients):
            raise ValueError(f"client {k} is outside the experiment's {len(self.clients)} clients")
        return self.clients[k]

    def train(self, k: int, start: ClientState | None, external, round_: int,
              fixed_lam: float | None = None) -> tuple[ClientState, dict]:
        """Client k's local run of round `round_` (0-based, warm-up rounds first) from `start` (None:
        the initial state) with `external` frozen; returns (its upload, the training info).
        fixed_lam: lam held at this value (not trained) instead of learnt."""
        client, cfg = self.client(k), self.config
        with self.lock:
            trainer = self.trainer()
            start = start if start is not None else self._initial
            if fixed_lam is not None:
                logit = torch.logit(torch.tensor(float(fixed_lam)))
                start = ClientState(start.adapter, {g: logit.clone() for g in start.logits})
            trainer.load(start, external)
            # the head trains in warm-up only when warmup_head is set (else it stays at its shared init)
            info = trainer.train(client.train_idx, client.train_labels, seed=derived_seed(cfg.seed, round_, k),
                                 train_head=cfg.warmup_head or round_ >= cfg.warmup_rounds,
                                 train_mixing=fixed_lam is None)
            return trainer.upload(start, seed=derived_seed(cfg.seed, round_, k, 1)), info

    def evaluate(self, k: int, state: ClientState, external) -> dict:
        """Client k's personalised model (state + external expert) on its own test split."""
        client = self.client(k)
        with self.lock:
            trainer = self.trainer()
            trainer.load(state, external)
            return trainer.evaluate(client.test_idx, client.test_labels)
