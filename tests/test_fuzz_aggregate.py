"""Fuzzing aggregate(): random client counts, dtypes, magnitudes, duplicates, NaN/Inf, bad weights and
robust options. Every case ends in experts equal to a float64 loop over keys and clusters, or in a
ValueError/TypeError naming the client; inputs are untouched; repeated calls are bitwise equal."""
import math
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import fedtreelora as ftl
from peft_fixtures import planted_states

CLEAR_ERRORS = (ValueError, TypeError)


@given(n=st.integers(1, 7), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale=st.sampled_from([1.0, 1e-6, 1e3]), duplicate=st.booleans(),
       poison=st.sampled_from([None, "nan", "inf", "weight0", "weight_nan"]),
       robust=st.sampled_from(["mean", "trimmed_mean"]), seed=st.integers(0, 2**31 - 1))
def test_aggregate_fuzz(n, dtype, scale, duplicate, poison, robust, seed):
    states, _ = planted_states(n_layers=3, groups=(1, 2, 2), n_clients=n, seed=seed % 1000)
    states = [{k: (v * scale).to(dtype) for k, v in s.items()} for s in states]
    if duplicate and n >= 2:
        states[-1] = {k: v.clone() for k, v in states[0].items()}
    weights = torch.arange(1, n + 1, dtype=torch.float64) * 10
    key = next(iter(states[0]))
    if poison in ("nan", "inf"):
        states[n // 2][key].view(-1)[0] = math.nan if poison == "nan" else math.inf
    if poison == "weight0":
        weights[-1] = 0.0
    if poison == "weight_nan":
        weights[0] = math.nan
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one client: returned unchanged with a warning
            res = ftl.aggregate(states, weights=weights, robust=robust)
    except CLEAR_ERRORS as exc:
        assert poison is not None, f"refused a valid input: {exc}"
        assert "client" in str(exc)
        return
    finally:
        for s, b in zip(states, before):
            for k in s:
                assert torch.equal(s[k].nan_to_num(), b[k].nan_to_num()), f"input {k} modified"
    assert poison is None, f"{poison} was not refused"
    again = ftl.aggregate(states, weights=weights, robust=robust)
    for k in range(n):
        for name, value in res.cluster_states[k].items():
            assert value.dtype == dtype and value.shape == states[k][name].shape
            assert torch.equal(value, again.cluster_states[k][name]), "not deterministic"
    if robust != "mean" or n < 2:
        return
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    labels = res.tree.labels
    for k in range(n):
        for name, value in res.cluster_states[k].items():
            layer = next((l for l, layer in enumerate(res.tree.layers) if name.startswith(layer + ".")), labels.shape[0] - 1)
            members = (labels[layer] == labels[layer, k]).nonzero().flatten()
            w = weights[members]
            want = sum(w[i] * states[int(m)][name].double() for i, m in enumerate(members)) / w.sum()
            scale_ = want.abs().max().clamp_min(1e-30)
            # + the spacing of the dtype's subnormals: results are rounded to the input dtype, and at
            # scale 1e-6 fp16 values are subnormal (absolute, not relative, rounding)
            subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
            assert float((value.double() - want).abs().max()) <= tol * float(scale_) + subnormal + 1e-12, (name, k)
