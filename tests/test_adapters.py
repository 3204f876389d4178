"""PEFT key parsing and exact packing of client state dicts (fedtreelora/adapters.py)."""
import warnings

import pytest
import torch

from fedtreelora.core import adapters
from peft_fixtures import planted_states, randomised_state, tiny_peft_model

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama", "qwen2"])
def test_real_peft_state_dicts_parse_into_layers(arch):
    model, n_layers = tiny_peft_model(arch)
    states = [randomised_state(model, seed) for seed in range(3)]
    layout = adapters.parse_layout(states)
    assert len(layout.layers) == n_layers
    assert [int(name.rsplit(".", 1)[1]) for name in layout.layers] == list(range(n_layers))  # shallow -> deep
    offsets = layout.layer_offsets.tolist()
    for key, shape, dtype, lo, hi, seg in layout.specs():
        assert hi - lo == shape.numel()
        if ".lora_" in key:  # every adapted module of layer l lands in segment l
            layer = layout.layers[seg]
            assert key.startswith(layer + "."), (key, layer)
        else:  # the classification head (modules_to_save) is the last, non-layer segment
            assert key in layout.head_keys and seg == len(layout.layers)
    for l, end in enumerate(layout.b_ends):  # B factors first inside a layer
        assert offsets[l] < end <= offsets[l + 1]
    has_head = arch in ("bert", "roberta")
    assert layout.has_head == has_head
    assert len(offsets) - 1 == n_layers + has_head


@pytest.mark.parametrize("arch", ["bert", "gpt2", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_round_trip_is_bitwise(arch, dtype):
    model, _ = tiny_peft_model(arch)
    states = [{k: v.to(dtype) for k, v in randomised_state(model, seed).items()} for seed in range(3)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    layout = adapters.parse_layout(states)
    x = adapters.pack(states, layout)
    assert x.dtype == dtype and x.shape == (3, layout.n_params)
    for k, s in enumerate(states):
        back = adapters.unpack_row(x[k], layout)
        assert list(back) == list(s)  # the client's own key order
        for key in s:
            assert back[key].dtype == s[key].dtype and back[key].shape == s[key].shape
            assert torch.equal(back[key].view(torch.uint8), s[key].view(torch.uint8)), key
            assert torch.equal(s[key], before[k][key])  # inputs untouched


def test_mixed_dtypes_pack_in_the_promoted_dtype_and_come_back_exactly():
    states, _ = planted_states(n_clients=3)
    states = [{k: (v.to(torch.bfloat16) if "lora" in k else v) for k, v in s.items()} for s in states]
    layout = adapters.parse_layout(states)
    assert layout.dtype == torch.float32
    x = adapters.pack(states, layout)
    back = adapters.unpack_row(x[1], layout)
    assert all(torch.equal(back[k], states[1][k]) and back[k].dtype == states[1][k].dtype for k in states[1])


def test_b_layout_selects_exactly_the_b_factors():
    states, _ = planted_states(n_clients=4)
    layout = adapters.parse_layout(states)
    b = layout.b_layout()
    xb = adapters.pack(states, b)
    assert all(".lora_B." in k for k in b.keys) and len(b.keys) == sum(".lora_B." in k for k in states[0])
    expected = torch.stack([torch.cat([s[f"{layer}.attention.self.{m}.lora_B.weight"].reshape(-1)
                                       for layer in layout.layers for m in ("query", "value")]) for s in states])
    assert torch.equal(xb, expected)
    assert b.layer_offsets.tolist() == [0] + [32 * (l + 1) for l in range(len(layout.layers))]


def test_numbered_group_without_lora_is_not_a_layer():
    states, _ = planted_states(n_clients=2, head=False)
    for s in states:
        s["base_model.model.classifier.0.weight"] = torch.ones(3, 8)
    layout = adapters.parse_layout(states)
    assert len(layout.layers) == 6 and layout.head_keys == ("base_model.model.classifier.0.weight",)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("base_model.model.classifier.bias"), "client 2.*missing.*classifier.bias"),
    (lambda s: s.__setitem__("extra.weight", torch.ones(1)), "client 2.*unexpected.*extra.weight"),
    (lambda s: s.__setitem__("base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight", torch.ones(4, 8)),
     "client 2.*layer.3.attention.self.query.lora_A.*LoRA rank 4 differs.*rank 2"),
    (lambda s: s.__setitem__("base_model.model.classifier.weight", torch.ones(3, 9)), "client 2.*classifier.weight.*shape"),
    (lambda s: s.__setitem__("base_model.model.classifier.bias", torch.ones(3, dtype=torch.float16)), "client 2.*classifier.bias.*dtype"),
])
def test_disagreeing_clients_are_named(change, message):
    states, _ = planted_states(n_clients=3)
    change(states[2])
    with pytest.raises((ValueError, TypeError), match=message):
        adapters.parse_layout(states)


def test_bad_containers():
    with pytest.raises(TypeError, match="single state dict"):
        adapters.normalise_clients({"a.lora_B.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="empty"):
        adapters.normalise_clients([])
    with pytest.raises(TypeError, match="client 1.*key 'k'"):
        adapters.normalise_clients([{"k": torch.ones(1)}, {"k": [1.0]}])
    with pytest.raises(ValueError, match="no LoRA layers"):
        adapters.parse_layout([{"classifier.weight": torch.ones(2)}])


def test_finiteness_fast_path_is_exact_where_the_sum_overflows_or_cancels():
    """all_finite is one sum: a finite float16 block whose sum overflows float16 reads as non-finite, and
    first_nonfinite then finds nothing (no false error); a real NaN or Inf is found and named, also when
    +Inf and -Inf would cancel into a NaN sum and when it sits next to huge finite values."""
    layout = adapters.parse_layout([{"m.layers.0.q.lora_A.weight": torch.zeros(2, 8),
                                     "m.layers.0.q.lora_B.weight": torch.zeros(8, 2)}])
    big = torch.full((3, layout.n_params), 60000.0, dtype=torch.float16)     # finite; their sum is not
    assert not adapters.all_finite(big)
    assert adapters.first_nonfinite(big, layout) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = big.clone()
        x[2, 17] = bad
        assert not adapters.all_finite(x)
        message = adapters.first_nonfinite(x, layout)
        assert "client 2" in message and layout.key_at(17) in message
    x = torch.zeros(3, layout.n_params)
    x[1, 3], x[1, 4] = float("inf"), float("-inf")
    assert "client 1" in adapters.first_nonfinite(x, layout)
    assert adapters.first_nonfinite(torch.randn(3, layout.n_params), layout) is None
