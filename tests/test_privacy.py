"""Differential privacy on uploads: clipping bounds the update, the noise has the documented scale."""
import math

import pytest
import torch

from fedtreelora.client.privacy import gaussian_epsilon, privatize_update


def _states(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    start = {"a": torch.randn(4, 8, generator=g), "b": torch.randn(8, 4, generator=g)}
    trained = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in start.items()}
    return start, trained


def _update_norm(start, upload):
    return math.sqrt(sum(float((upload[k].double() - start[k].double()).pow(2).sum()) for k in start))


def test_clipping_bounds_the_update_and_keeps_its_direction():
    start, trained = _states(scale=10.0)
    before = {k: v.clone() for k, v in trained.items()}
    upload = privatize_update(start, trained, clip_norm=1.0, noise_multiplier=0.0)
    assert _update_norm(start, upload) == pytest.approx(1.0, rel=1e-5)
    raw = torch.cat([(trained[k] - start[k]).flatten() for k in start])
    clipped = torch.cat([(upload[k] - start[k]).flatten() for k in start])
    assert torch.nn.functional.cosine_similarity(raw, clipped, dim=0) > 0.9999
    assert all(torch.equal(trained[k], before[k]) for k in trained), "input modified"


def test_small_updates_pass_unchanged_without_noise():
    start, trained = _states(scale=1e-3)
    upload = privatize_update(start, trained, clip_norm=10.0, noise_multiplier=0.0)
    for k in trained:
        torch.testing.assert_close(upload[k], trained[k])


def test_noise_has_the_documented_standard_deviation():
    start = {"w": torch.zeros(200, 500)}
    trained = {"w": torch.zeros(200, 500)}
    upload = privatize_update(start, trained, clip_norm=0.5, noise_multiplier=1.2, generator=torch.Generator().manual_seed(0))
    assert float(upload["w"].std()) == pytest.approx(0.6, rel=0.02)
    assert abs(float(upload["w"].mean())) < 0.01


def test_bad_arguments_and_values_are_refused():
    start, trained = _states()
    with pytest.raises(ValueError, match="clip_norm"):
        privatize_update(start, trained, clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privatize_update(start, trained, clip_norm=1.0, noise_multiplier=-1.0)
    trained["a"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'a'"):
        privatize_update(start, trained, clip_norm=1.0, noise_multiplier=1.0)


def test_epsilon_of_the_gaussian_mechanism():
    assert gaussian_epsilon(0.0) == math.inf
    assert gaussian_epsilon(5.0, 1e-5) == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 5.0)
    assert gaussian_epsilon(10.0) < gaussian_epsilon(5.0)


def test_federation_uploads_are_privatised_when_configured(tmp_path):
    """With DP on, what the server receives differs from the trained state by a clipped, noised update."""
    from tiny_models import save_tiny_bert, tiny_config, tiny_dataset
    from fedtreelora.federation.schedule import Federation

    torch.set_num_threads(1)
    model = save_tiny_bert(tmp_path / "bert")
    with pytest.raises(ValueError, match="dp_clip_norm"):
        tiny_config(model, dp_noise_multiplier=1.0)
    plain = Federation(tiny_config(model), tmp_path / "plain", dataset=tiny_dataset(), progress=False)
    private = Federation(tiny_config(model, dp_clip_norm=0.05, dp_noise_multiplier=0.0), tmp_path / "dp",
                         dataset=tiny_dataset(), progress=False)
    a = plain.pool.train(0, plain.initial, None, round_=0)[0]
    b = private.pool.train(0, private.initial, None, round_=0)[0]
    assert _update_norm(plain.initial.adapter, a.adapter) > 0.05
    assert _update_norm(private.initial.adapter, b.adapter) == pytest.approx(0.05, rel=1e-4)
