"""Tiny causal LMs (LLaMA, Qwen2) with a word-level tokenizer and chat template, and a grouped prompt
dataset: everything built offline from configs, saved as HF folders, no hub."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedtreelora.federation.data import PromptDataset

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = [f"w{i}" for i in range(24)]
INSTRUCTIONS = {"first": "copy the first words", "last": "copy the last words"}
VOCAB = SPECIAL + WORDS + sorted({w for text in INSTRUCTIONS.values() for w in text.split()})
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tiny_tokenizer(chat_template: bool = True):
    """A word-level fast tokenizer over VOCAB (whitespace split), with BOS/EOS/PAD and, optionally, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)     # joins words with spaces
    kwargs = dict(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast = PreTrainedTokenizerFast(**kwargs)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_causal_lm(folder: str | Path, arch: str = "llama", layers: int = 2, hidden: int = 32, seed: int = 0,
                        chat_template: bool = True) -> str:
    """A randomly initialised LlamaForCausalLM or Qwen2ForCausalLM and its tokenizer, saved as an HF folder."""
    import transformers as tf
    folder = Path(folder)
    tokenizer = tiny_tokenizer(chat_template)
    common = dict(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=128,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                  initializer_range=0.2)   # wide enough for confident logits at width 32 (0.02 caps them near uniform)
    torch.manual_seed(seed)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


CONSTANT = {"first": "w1 w2 w3", "last": "w21 w22 w23"}


def tiny_prompts(num: int = 160, seed: int = 0, doc_words: tuple[int, int] = (5, 9), copy: int = 3,
                 constant: bool = False) -> PromptDataset:
    """Two groups of examples over random word documents: copy the first `copy` words, or the last
    (constant=True: answer the group's fixed phrase `CONSTANT[group]`, learnable by LoRA in a few dozen steps)."""
    rng = np.random.default_rng(seed)
    docs, ins, resp, groups = [], [], [], []
    names = list(INSTRUCTIONS)
    for i in range(num):
        g = i % 2
        words = rng.choice(WORDS, rng.integers(*doc_words, endpoint=True)).tolist()
        docs.append(" ".join(words))
        ins.append(INSTRUCTIONS[names[g]])
        if constant:
            resp.append(CONSTANT[names[g]])
        else:
            resp.append(" ".join(words[:copy] if g == 0 else words[-copy:]))
        groups.append(g)
    return PromptDataset(docs, ins, resp, np.array(groups), names, name="tiny-prompts")


def tiny_causal_config(model_path: str, **changes):
    from fedtreelora.federation.config import ExperimentConfig
    base = dict(task="causal_lm", model=model_path, dataset="unused", max_length=24, max_new_tokens=4,
                num_clients=4, num_groups=2, samples_per_client=30, super_groups=0, dirichlet_alpha=1.0, train_fraction=2 / 3,
                lora_r=2, lora_alpha=4.0, local_steps=2,
                batch_size=8, lr=1e-2, mixing_lr=3e-2, warmup_rounds=1, rounds=2, fixed_clusters=2, seed=0, num_threads=1)
    base.update(changes)
    return ExperimentConfig.from_dict(base)
