"""Local training and evaluation of one client: the code path shared by every method.

One `LocalTrainer` holds the (single) PEFT model and its `ExpertMixer`; a client is just state
loaded into it: PEFT adapter weights (cluster expert + head), its mixing logits and, from the
server, its external expert. Every random draw of a local run comes from `seed`, so a round can be
replayed exactly (this is what makes `--resume` land on the same metrics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .mixing import ExpertMixer


@dataclass
class ClientState:
    adapter: dict[str, torch.Tensor]     # get_peft_model_state_dict keys: cluster expert + head
    logits: dict[str, torch.Tensor]      # mixing logits per layer group (lam = sigmoid)


class LocalTrainer:
    def __init__(self, peft_model, features: dict[str, torch.Tensor], config):
        self.model = peft_model
        self.features = features
        self.config = config
        self.device = torch.device(config.device)
        self.model.to(self.device)
        self.mixer = ExpertMixer(peft_model, init_lam=config.mixing_init).to(self.device)

    # -- state -----------------------------------------------------------------------------
    def initial_state(self) -> ClientState:
        return ClientState(self.adapter_state(), {g: p.detach().clone() for g, p in self.mixer.logits.items()})

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load(self, state: ClientState, external: dict[str, torch.Tensor] | None = None, groups=None) -> None:
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(self.model, state.adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"adapter state has keys the model does not: {unexpected[:3]}")
        self.mixer.load_logits(state.logits)
        self.mixer.set_external(external, groups)

    def state(self) -> ClientState:
        return ClientState(self.adapter_state(), {g: p.detach().cpu().clone() for g, p in self.mixer.logits.items()})

    def upload(self, start: ClientState, seed: int) -> ClientState:
        """What leaves the client after training from `start`: its state, or with differential privacy
        on (config.dp_noise_multiplier > 0 or dp_clip_norm > 0) start + clipped, noised update
        (`fedtreelora.privacy.privatize_update`). The mixing logits never leave the client's model."""
        trained = self.state()
        cfg = self.config
        if cfg.dp_clip_norm <= 0 and cfg.dp_noise_multiplier <= 0:
            return trained
        from .privacy import privatize_update
        if cfg.dp_clip_norm <= 0:
            raise ValueError("dp_noise_multiplier > 0 needs dp_clip_norm > 0 (the noise scale is noise_multiplier * clip_norm)")
        generator = torch.Generator().manual_seed(seed)
        adapter = privatize_update(start.adapter, trained.adapter, cfg.dp_clip_norm, cfg.dp_noise_multiplier, generator)
        return ClientState(adapter, trained.logits)

    # -- training --------------------------------------------------------------------------
    def num_steps(self, num_train: int) -> int:
        cfg = self.config
        if cfg.local_epochs > 0:
            return max(1, math.ceil(cfg.local_epochs * num_train / cfg.batch_size))
        return cfg.local_steps

    def _batch(self, idx: np.ndarray, labels: np.ndarray):
        index = torch.as_tensor(idx, dtype=torch.long)
        batch = {k: v[index] for k, v in self.features.items()}
        if "attention_mask" in batch:   # drop the columns that are padding in every row (either side)
            keep = batch["attention_mask"].bool().any(0)
            batch = {k: v[:, keep] for k, v in batch.items()}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return batch, torch.as_tensor(labels, dtype=torch.long, device=self.device)

    def train(self, train_idx: np.ndarray, train_labels: np.ndarray, seed: int, train_head: bool = True,
              train_mixing: bool = True) -> dict:
        """AdamW (+ scheduler, gradient clipping) for `num_steps` batches drawn by epochs of a seeded shuffle.

        train_head=False trains the LoRA factors only (the head, PEFT `modules_to_save`, stays as loaded);
        train_mixing=False keeps lam where it was loaded (the fixed-lam ablation)."""
        from transformers import get_scheduler
        cfg = self.config
        if len(train_idx) == 0:
            raise ValueError("a client with no training documents cannot train")
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad and (train_head or "lora_" in n)]
        mix_params = [self.mixer.logits[g] for g in sorted(self.mixer.active_groups)] if train_mixing else []
        groups = [{"params": lora_params, "lr": cfg.lr}]
        if mix_params:
            groups.append({"params": mix_params, "lr": cfg.mixing_lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = self.num_steps(len(train_idx))
        scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
        self.model.train()
        order, pos, losses = rng.permutation(len(train_idx)), 0, []
        for _ in range(steps):
            if pos >= len(order):
                order, pos = rng.permutation(len(train_idx)), 0
            take = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            batch, labels = self._batch(train_idx[take], train_labels[take])
            loss = self.model(**batch, labels=labels).loss
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(lora_params + mix_params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return {"train_loss": float(np.mean(losses)), "steps": steps, "num_samples": int(len(train_idx))}

    @torch.no_grad()
    def evaluate(self, test_idx: np.ndarray, test_labels: np.ndarray) -> dict:
        """Loss and accuracy on the client's held-out split (sum over batches, then divided)."""
        self.model.eval()
        total_loss, correct, n = 0.0, 0, len(test_idx)
        for start in range(0, n, self.config.batch_size):
            batch, labels = self._batch(test_idx[start:start + self.config.batch_size],
                                        test_labels[start:start + self.config.batch_size])
            logits = self.model(**batch).logits
            total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "num_samples": int(n)}
