"""The two-expert mixing layer: exact forward, PEFT save/load untouched, plain LoRA fallback."""
import math

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedtreelora.client.mixing import MIXING_FILE, ExpertMixer, layer_group
from tiny_models import save_tiny_bert, tiny_gpt2


def _randomise_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _random_external(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_peft_model_state_dict(model).items() if "lora_" in k}


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification
    path = save_tiny_bert(tmp_path_factory.mktemp("bert"))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=6, target_modules=["query", "value"]))
    _randomise_lora(model, 1)
    return model.eval()


def _manual_hidden_of(model, mixer, external, module_name, x):
    """h = W0 x + lam (B_c A_c x) s + (1 - lam) (B_e A_e x) s, from the raw weights."""
    module = dict(model.named_modules())[module_name]
    w0, b0 = module.base_layer.weight, module.base_layer.bias
    a_c, b_c = module.lora_A["default"].weight, module.lora_B["default"].weight
    a_e, b_e = external[f"{module_name}.lora_A.weight"], external[f"{module_name}.lora_B.weight"]
    s = module.scaling["default"]
    lam = torch.sigmoid(mixer.logits[layer_group(module_name)])
    h = x @ w0.T + b0 + lam * (x @ a_c.T @ b_c.T) * s
    if layer_group(module_name) in mixer.active_groups:
        h = h + (1 - lam) * (x @ a_e.T @ b_e.T) * s
    return h


def test_forward_matches_hand_written_formula(bert_cls):
    mixer = ExpertMixer(bert_cls, init_lam=0.3)
    try:
        with torch.no_grad():
            mixer.logits["layer_1"].fill_(1.7)          # layers get different lam
        external = _random_external(bert_cls, 2)
        mixer.set_external(external)
        assert mixer.active_groups == {"layer_0", "layer_1"}
        x = torch.randn(3, 5, 32)
        for name in ("base_model.model.bert.encoder.layer.0.attention.self.query",
                     "base_model.model.bert.encoder.layer.1.attention.self.value"):
            module = dict(bert_cls.named_modules())[name]
            with torch.no_grad():
                got = module(x)
                want = _manual_hidden_of(bert_cls, mixer, external, name, x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        mixer.remove()


def test_lam_one_external_and_inactive_layer_is_plain_lora(bert_cls):
    ids = torch.randint(5, 40, (2, 7))
    with torch.no_grad():
        plain = bert_cls(input_ids=ids).logits
    mixer = ExpertMixer(bert_cls)
    try:
        external = _random_external(bert_cls, 3)
        mixer.set_external(None)                      # no external anywhere: plain LoRA
        with torch.no_grad():
            torch.testing.assert_close(bert_cls(input_ids=ids).logits, plain)
        mixer.set_external(external, groups=set())    # an external given, but no layer mixes
        with torch.no_grad():
            torch.testing.assert_close(bert_cls(input_ids=ids).logits, plain)
        # a layer whose external factors are all zero (its cluster is everyone) does not mix
        zero_layer1 = {k: (torch.zeros_like(v) if ".layer.1." in k else v) for k, v in external.items()}
        mixer.set_external(zero_layer1)
        assert mixer.active_groups == {"layer_0"}
        mixer.set_external(external)
        with torch.no_grad():
            assert not torch.allclose(bert_cls(input_ids=ids).logits, plain)
    finally:
        mixer.remove()
    with torch.no_grad():
        torch.testing.assert_close(bert_cls(input_ids=ids).logits, plain)   # hooks removed


def test_peft_state_dict_and_save_pretrained_unchanged(bert_cls, tmp_path):
    keys_before = sorted(get_peft_model_state_dict(bert_cls))
    mixer = ExpertMixer(bert_cls, init_lam=0.6)
    try:
        mixer.set_external(_random_external(bert_cls, 4))
        assert sorted(get_peft_model_state_dict(bert_cls)) == keys_before
        assert not any("logit" in k or "mix" in k for k in bert_cls.state_dict())
        with torch.no_grad():
            mixer.logits["layer_0"].fill_(-0.4)
        bert_cls.save_pretrained(tmp_path)
        mixer.save_pretrained(tmp_path)
        assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / MIXING_FILE).is_file()
        other = ExpertMixer(bert_cls)
        try:
            other.load_pretrained(tmp_path)
            assert math.isclose(other.logits["layer_0"].item(), -0.4, rel_tol=1e-6)
            assert math.isclose(other.lams()["layer_1"], 0.6, rel_tol=1e-5)
        finally:
            other.remove()
        # the adapter round-trips through PEFT's own functions
        state = get_peft_model_state_dict(bert_cls)
        result = set_peft_model_state_dict(bert_cls, {k: v.clone() for k, v in state.items()})
        assert not result.unexpected_keys
    finally:
        mixer.remove()


def test_gradients_reach_lam_and_cluster_but_not_external(bert_cls):
    mixer = ExpertMixer(bert_cls)
    try:
        external = _random_external(bert_cls, 5)
        mixer.set_external(external)
        bert_cls.zero_grad()
        loss = bert_cls(input_ids=torch.randint(5, 40, (2, 6)), labels=torch.tensor([0, 2])).loss
        loss.backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in mixer.logits.values())
        b = dict(bert_cls.named_parameters())["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"]
        assert b.grad is not None
        assert all(not v.requires_grad for pair in mixer._external.values() for v in pair)
    finally:
        mixer.remove()
        bert_cls.zero_grad()


def test_causal_lm_forward_matches_formula():
    model = get_peft_model(tiny_gpt2(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4,
                                                   target_modules=["c_attn"], fan_in_fan_out=True)).eval()
    _randomise_lora(model, 6)
    mixer = ExpertMixer(model, init_lam=0.25)
    try:
        external = _random_external(model, 7)
        mixer.set_external(external)
        name = "base_model.model.transformer.h.1.attn.c_attn"
        module = dict(model.named_modules())[name]
        x = torch.randn(2, 4, 16)
        with torch.no_grad():
            got = module(x)
            a_c, b_c = module.lora_A["default"].weight, module.lora_B["default"].weight
            a_e, b_e = external[f"{name}.lora_A.weight"], external[f"{name}.lora_B.weight"]
            s, lam = module.scaling["default"], 0.25
            want = (x @ module.base_layer.weight + module.base_layer.bias     # Conv1D stores W0 transposed
                    + lam * (x @ a_c.T @ b_c.T) * s + (1 - lam) * (x @ a_e.T @ b_e.T) * s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        out = model(input_ids=torch.randint(0, 50, (1, 5)), labels=torch.randint(0, 50, (1, 5)))
        out.loss.backward()
        assert mixer.logits["layer_1"].grad is not None
    finally:
        mixer.remove()


def test_bad_external_names_the_module(bert_cls):
    mixer = ExpertMixer(bert_cls)
    try:
        external = _random_external(bert_cls, 8)
        key = next(k for k in external if "lora_B" in k)
        with pytest.raises(ValueError, match="shapes"):
            mixer.set_external({**external, key: torch.zeros(3, 3)})
        with pytest.raises(KeyError, match="lacks"):
            mixer.set_external({k: v for k, v in external.items() if k != key})
        with pytest.raises(ValueError, match="init_lam"):
            ExpertMixer(bert_cls, init_lam=1.0)
    finally:
        mixer.remove()
