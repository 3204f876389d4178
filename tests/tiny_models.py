"""Tiny models, tokenizers and data for the federated tests: built from configs, saved to a temp folder, no hub."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedtreelora.federation.data import TextDataset

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOPICS = ["alpha", "bravo", "charlie", "delta"]


def topic_words(topic: str, n: int = 8) -> list[str]:
    return [f"{topic}{i}" for i in range(n)]


NOISE = [f"noise{i}" for i in range(16)]


def tiny_dataset(num_docs: int = 400, seed: int = 0, words: int = 10) -> TextDataset:
    """Documents of 10 words, 6 from their topic's vocabulary and 4 shared noise words: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TOPICS), num_docs)
    texts = []
    for y in labels:
        own = rng.choice(topic_words(TOPICS[y]), 6).tolist()
        noise = rng.choice(NOISE, words - 6).tolist()
        texts.append(" ".join(rng.permutation(own + noise).tolist()))
    return TextDataset(texts, labels, list(TOPICS))


def save_tiny_bert(folder: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A BERT with `layers` layers of width `hidden` and a word-level vocabulary, saved as an HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + [w for t in TOPICS for w in topic_words(t)] + NOISE
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)   # transformers >= 5
    if len(tokenizer) != len(vocab):
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)     # transformers 4
    assert len(tokenizer) == len(vocab), "the tiny tokenizer did not take its vocabulary"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 causal LM built in memory (Conv1D projections: PEFT's fan_in_fan_out path)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def tiny_config(model_path: str, **changes):
    from fedtreelora.federation.config import ExperimentConfig
    base = dict(model=model_path, dataset="unused", max_length=12, num_clients=4, num_groups=2, classes_per_group=3,
                samples_per_client=60, dirichlet_alpha=1.0, super_groups=0, train_fraction=2 / 3, lora_r=2, lora_alpha=4.0, local_steps=3,
                batch_size=8, lr=1e-2, mixing_lr=3e-2, warmup_rounds=2, rounds=2, fixed_clusters=2, seed=0, num_threads=1)
    base.update(changes)
    return ExperimentConfig.from_dict(base)


def pretrain_tiny_bert(folder: str | Path, dataset: TextDataset, steps: int = 60, seed: int = 0) -> str:
    """Give the tiny BERT a 'pre-trained' encoder (full training on the unpermuted task) so that, like
    MiniLM, its features carry the topics and LoRA fine-tuning has something to adapt."""
    from transformers import AutoTokenizer, BertForSequenceClassification
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=dataset.num_labels)
    enc = tok(dataset.texts, padding=True, return_tensors="pt")
    labels = torch.as_tensor(dataset.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (32,), generator=g)
        loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.bert.save_pretrained(folder)
    return str(folder)
