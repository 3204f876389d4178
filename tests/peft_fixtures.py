"""Tiny PEFT models (no hub) and synthetic client adapters with a planted structure, for the tests."""
from __future__ import annotations

import torch

SMALL = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=64)


def tiny_peft_model(arch: str, seed: int = 0):
    """(peft model, expected layer count) for arch in bert, roberta, gpt2, llama, qwen2."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if arch == "bert":
        model, targets, task = tf.BertForSequenceClassification(tf.BertConfig(**SMALL, num_labels=3)), ["query", "value"], "SEQ_CLS"
    elif arch == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(**SMALL, num_labels=3, max_position_embeddings=40))
        targets, task = ["query", "value"], "SEQ_CLS"
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
        targets, task = ["c_attn"], "CAUSAL_LM"
    elif arch == "llama":
        model, targets, task = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=1)), ["q_proj", "v_proj"], "CAUSAL_LM"
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, num_key_value_heads=1))
        targets, task = ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"
    else:
        raise ValueError(arch)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type=task))
    return peft_model, 3


def randomised_state(peft_model, seed: int):
    """get_peft_model_state_dict of the model with every trainable tensor redrawn (B is 0 at init)."""
    from peft import get_peft_model_state_dict

    g = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(peft_model)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.items()}


# Kept in the library (docstring examples and benchmarks use it too); re-exported for the tests.
from fedtreelora.core.synthetic import planted_states  # noqa: E402,F401
