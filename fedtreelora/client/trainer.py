"""Local training and evaluation of one client: the code path shared by every method.

One `LocalTrainer` holds the (single) PEFT model and its `ExpertMixer`; a client is just state
loaded into it: PEFT adapter weights (cluster expert + head), its mixing logits and, from the
server, its external expert. Every random draw of a local run comes from `seed`, so a round can be
replayed exactly (this is what makes `--resume` land on the same metrics).

`LocalTrainer` is the sequence classifier's (loss and accuracy on labels); `CausalLMTrainer` the
instruction-tuned causal LM's (loss on response tokens only; evaluation by batched greedy generation
with left padding, scored by ROUGE-1 F1, plus the response loss). Both share the optimiser loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .mixing import ExpertMixer


@dataclass
class ClientState:
    adapter: dict[str, torch.Tensor]     # get_peft_model_state_dict keys: cluster expert + head
    logits: dict[str, torch.Tensor]      # mixing logits per layer group (lam = sigmoid)


class LocalTrainer:
    """Training and evaluation of a sequence classifier's clients on one shared PEFT model."""
    metric = "accuracy"

    def __init__(self, peft_model, features: dict[str, torch.Tensor], config):
        self.model = peft_model
        self.features = features
        self.config = config
        self.device = torch.device(config.device)
        self.model.to(self.device)
        self.mixer = ExpertMixer(peft_model, init_lam=config.mixing_init).to(self.device)
        self.progress = False       # progress bars of local steps (and generation); the drivers set it

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
        bar = tqdm(total=steps, desc="local steps", unit="step", disable=not self.progress, leave=False,
                   dynamic_ncols=True)
        for _ in range(steps):
            if pos >= len(order):
                order, pos = rng.permutation(len(train_idx)), 0
            take = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            batch, labels = self._batch(train_idx[take], train_labels[take])
            loss = self._loss(batch, labels)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(lora_params + mix_params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
        bar.close()
        return {"train_loss": float(np.mean(losses)), "steps": steps, "num_samples": int(len(train_idx))}

    def _loss(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        return self.model(**batch, labels=labels).loss

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


class CausalLMTrainer(LocalTrainer):
    """Clients of an instruction-tuned causal LM (features from `models.tokenize_prompts`).

    Training: the mean cross-entropy over response tokens (labels are -100 at prompt and padding
    positions; the model shifts them). Evaluation on a client's held-out split: the response loss
    (summed over response tokens, divided by their count) and ROUGE-1 F1 (rouge-score, stemmer on)
    of greedy generations of `max_new_tokens` tokens from the left-padded prompts, in batches of
    `batch_size`, against the reference responses.
    """
    metric = "rouge1"

    def __init__(self, peft_model, features: dict, config, tokenizer):
        super().__init__(peft_model, features, config)
        self.tokenizer = tokenizer

    def _batch(self, idx: np.ndarray, labels=None):
        index = torch.as_tensor(idx, dtype=torch.long)
        batch = {k: self.features[k][index] for k in ("input_ids", "attention_mask", "labels")}
        keep = batch["attention_mask"].bool().any(0)          # drop columns that are padding in every row
        batch = {k: v[:, keep].to(self.device) for k, v in batch.items()}
        return batch, batch.pop("labels")      # the model's own loss shifts them (LocalTrainer._loss)

    def response_loss(self, idx: np.ndarray) -> tuple[float, int]:
        """(summed cross-entropy over the response tokens of examples `idx`, their token count)."""
        total, count = 0.0, 0
        for start in range(0, len(idx), self.config.batch_size):
            batch, labels = self._batch(idx[start:start + self.config.batch_size])
            logits = self.model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
        return total, count

    def generate(self, idx: np.ndarray) -> list[str]:
        """Greedy generations (decoded, special tokens dropped) for the prompts of examples `idx`."""
        from transformers import GenerationConfig
        tokenizer = self.tokenizer
        gen = GenerationConfig(max_new_tokens=self.config.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out_texts, new_tokens, t0 = [], 0, time.perf_counter()
        bar = tqdm(total=len(idx), desc="generating", unit="ex", disable=not self.progress, leave=False,
                   dynamic_ncols=True)
        for start in range(0, len(idx), self.config.batch_size):
            index = torch.as_tensor(idx[start:start + self.config.batch_size], dtype=torch.long)
            ids, mask = self.features["prompt_ids"][index], self.features["prompt_mask"][index]
            keep = mask.bool().any(0)
            ids, mask = ids[:, keep].to(self.device), mask[:, keep].to(self.device)
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            generated = out[:, ids.shape[1]:]
            ended = generated == tokenizer.eos_token_id        # tokens up to and including the first EOS count
            first = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full_like(ended[:, 0], generated.shape[1], dtype=torch.long))
            new_tokens += int(first.sum())
            out_texts += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
            bar.update(len(index))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
        bar.close()
        return out_texts

    @torch.no_grad()
    def evaluate(self, test_idx: np.ndarray, test_labels=None) -> dict:
        """ROUGE-1 F1 (fraction) of the greedy generations and the response loss on `test_idx`."""
        from .metrics import rouge1_f1
        self.model.eval()
        total, count = self.response_loss(test_idx)
        predictions = self.generate(test_idx)
        references = [self.features["references"][i] for i in test_idx]
        return {"loss": total / max(count, 1), "rouge1": rouge1_f1(predictions, references),
                "num_samples": int(len(test_idx))}
