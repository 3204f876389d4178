"""The two-expert LoRA layer of FedTreeLoRA on top of an unchanged PEFT model.

For every LoRA module of layer l the forward becomes
    h = W0 x + lam_l * (B_c A_c x) s + (1 - lam_l) * (B_e A_e x) s
with (A_c, B_c) PEFT's own adapter (the cluster expert, trainable), (A_e, B_e) the external expert
(frozen) and lam_l = sigmoid(logit_l) one learnable scalar per transformer layer (shared by the
layer's adapted modules, the granularity of the tree). Where a layer has no external expert (its
cluster is every client) the module is a plain LoRA layer: the hooks leave it untouched.

Nothing is added to the PEFT model: two forward hooks per module (one on `lora_B[adapter]` scaling
the cluster path by lam, one on the module adding the external path), the external factors held as
frozen tensors and the logits held here. So `get_peft_model_state_dict`, `set_peft_model_state_dict`
and `save_pretrained` see exactly PEFT's keys; the mixing weights are saved beside the adapter in
`mixing.safetensors` ({"layer_<i>": logit}) by `save_pretrained` below. The external path uses no
dropout (it is frozen); with `lora_dropout=0` the formula above holds exactly.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MIXING_FILE = "mixing.safetensors"
_LAYER = re.compile(r"\.(\d+)\.")


def layer_group(module_name: str) -> str:
    """'...encoder.layer.3.attention.self.query' -> 'layer_3' (first numbered path component);
    a module outside any numbered block gets a group of its own."""
    match = _LAYER.search(f".{module_name}.")
    return f"layer_{int(match.group(1))}" if match else "module_" + module_name.replace(".", "_")


def lora_modules(peft_model, adapter_name: str = "default") -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer
    found = {name: m for name, m in peft_model.named_modules()
             if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if not found:
        raise ValueError(f"the model has no LoRA module with adapter {adapter_name!r}")
    return found


class ExpertMixer(nn.Module):
    """Learnable cluster/external mixing for a PEFT LoRA model (see the module docstring)."""

    def __init__(self, peft_model, adapter_name: str = "default", init_lam: float = 0.8):
        super().__init__()
        if not 0.0 < init_lam < 1.0:
            raise ValueError(f"init_lam must lie in (0, 1), got {init_lam}")
        self.adapter_name = adapter_name
        self._modules_by_name = lora_modules(peft_model, adapter_name)   # plain dict: not submodules
        self.group_of = {name: layer_group(name) for name in self._modules_by_name}
        logit = math.log(init_lam / (1.0 - init_lam))
        self.logits = nn.ParameterDict({g: nn.Parameter(torch.tensor(logit))
                                        for g in sorted(set(self.group_of.values()))})
        self._external: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active_groups: set[str] = set()
        self._handles = []
        for name, module in self._modules_by_name.items():
            self._handles.append(module.lora_B[adapter_name].register_forward_hook(self._cluster_hook(name)))
            self._handles.append(module.register_forward_hook(self._external_hook(name)))

    def lam(self, group: str) -> torch.Tensor:
        return torch.sigmoid(self.logits[group])

    def lams(self) -> dict[str, float]:
        return {g: self.lam(g).item() for g in self.logits}

    def _cluster_hook(self, name):
        def hook(_module, _inputs, output):
            group = self.group_of[name]
            if group not in self.active_groups:
                return output
            return output * self.lam(group).to(output.dtype)
        return hook

    def _external_hook(self, name):
        module = self._modules_by_name[name]

        def hook(_module, inputs, output):
            group = self.group_of[name]
            if group not in self.active_groups:
                return output
            a, b = self._external[name]
            x = inputs[0].to(a.dtype)
            delta = F.linear(F.linear(x, a), b) * module.scaling[self.adapter_name]
            return output + ((1.0 - self.lam(group)) * delta).to(output.dtype)
        return hook

    def set_external(self, external_state: dict[str, torch.Tensor] | None, groups: set[str] | None = None) -> None:
        """Install the frozen external expert (keys as `get_peft_model_state_dict` returns them).

        `groups` names the layers that mix; by default every layer whose external factors are not
        all zero (`aggregate()` returns zeros where a cluster holds every client). None: plain LoRA.
        """
        self._external, self.active_groups = {}, set()
        if external_state is None:
            return
        present = set()
        for name, module in self._modules_by_name.items():
            keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
            missing = [k for k in keys if k not in external_state]
            if missing:
                raise KeyError(f"external expert lacks {missing[0]!r} (module {name})")
            a, b = (external_state[k].detach().to(module.lora_A[self.adapter_name].weight.device) for k in keys)
            if a.shape != module.lora_A[self.adapter_name].weight.shape or b.shape != module.lora_B[self.adapter_name].weight.shape:
                raise ValueError(f"external expert of module {name} has shapes {tuple(a.shape)}/{tuple(b.shape)}, the "
                                 f"model's adapter {tuple(module.lora_A[self.adapter_name].weight.shape)}/"
                                 f"{tuple(module.lora_B[self.adapter_name].weight.shape)}")
            self._external[name] = (a.float(), b.float())
            if bool(a.any()) or bool(b.any()):
                present.add(self.group_of[name])
        if groups is None:
            groups = present
        unknown = set(groups) - set(self.logits)
        if unknown:
            raise KeyError(f"unknown mixing group(s) {sorted(unknown)}; groups: {sorted(self.logits)}")
        self.active_groups = set(groups)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({g: p.detach().cpu().reshape(1) for g, p in self.logits.items()}, str(Path(folder) / MIXING_FILE))

    def load_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import load_file
        values = load_file(str(Path(folder) / MIXING_FILE))
        self.load_logits({g: v.reshape(()) for g, v in values.items()})

    def load_logits(self, logits: dict[str, torch.Tensor]) -> None:
        if set(logits) != set(self.logits):
            raise KeyError(f"mixing logits for groups {sorted(logits)}, the model has {sorted(self.logits)}")
        with torch.no_grad():
            for g, v in logits.items():
                self.logits[g].copy_(v.reshape(()))


MIXER_ATTRIBUTE = "expert_mixer"   # no "lora_" in it: PEFT's state dict filter keeps it out of the adapter


def attach_mixer(peft_model, adapter_name: str = "default", init_lam: float = 0.8) -> ExpertMixer:
    """The `ExpertMixer` of a PEFT model, registered on the model so that plain training finds lam.

    The first call builds the mixer and registers it as the submodule `peft_model.expert_mixer`
    (on the device of the model's LoRA weights); later calls return that same mixer. Registered,
    its logits are in `peft_model.parameters()`, so a plain `torch.optim.AdamW(model.parameters())`,
    HF `Trainer` or TRL's `SFTTrainer` train them with no extra code, and `model.to(...)` moves them.
    `get_peft_model_state_dict` and `save_pretrained` still return exactly PEFT's adapter keys (the
    mixer's keys hold no "lora_"); `model.state_dict()` does include `expert_mixer.logits.<group>`.

    Parameters
    ----------
    peft_model : peft.PeftModel
        A model with LoRA modules for `adapter_name`.
    adapter_name : str
        The PEFT adapter that is the cluster expert.
    init_lam : float
        Initial lam in (0, 1) of a new mixer (ignored when the model already has one).

    Returns
    -------
    ExpertMixer

    Raises
    ------
    ValueError
        The model already carries a mixer for another adapter, or has no LoRA module.

    Examples
    --------
    >>> from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    >>> import transformers as tf
    >>> base = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=16, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=32, vocab_size=64))
    >>> model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"]))
    >>> mixer = attach_mixer(model)
    >>> attach_mixer(model) is mixer, sorted(mixer.logits)
    (True, ['layer_0', 'layer_1'])
    >>> any(p is mixer.logits["layer_0"] for p in model.parameters())
    True
    >>> any("mixer" in k for k in get_peft_model_state_dict(model))
    False
    """
    existing = peft_model._modules.get(MIXER_ATTRIBUTE)
    if existing is not None:
        if not isinstance(existing, ExpertMixer) or existing.adapter_name != adapter_name:
            raise ValueError(f"the model's {MIXER_ATTRIBUTE!r} submodule is not an ExpertMixer of adapter "
                             f"{adapter_name!r}")
        return existing
    mixer = ExpertMixer(peft_model, adapter_name=adapter_name, init_lam=init_lam)
    first = next(iter(mixer._modules_by_name.values()))
    mixer.to(first.lora_A[adapter_name].weight.device)
    peft_model.add_module(MIXER_ATTRIBUTE, mixer)
    return mixer
