"""Optional differential privacy on client uploads: the Gaussian mechanism on each round's update.

A client that received `start` and trained to `trained` uploads `start + clip(update) + noise`
instead of `trained`, where update = trained - start over every uploaded tensor, clip scales the
whole update down to L2 norm at most `clip_norm` (its sensitivity), and noise ~ N(0, s^2) per
coordinate with s = noise_multiplier * clip_norm. One round of one client is then
(epsilon, delta)-DP at the level of that client's whole update, with epsilon from
`gaussian_epsilon`; over many rounds the guarantees compose (use an RDP accountant such as
Opacus's for a tight total). Off by default: noise_multiplier = 0 and clip_norm = None.
"""
from __future__ import annotations

import math

import torch

__all__ = ["privatize_update", "gaussian_epsilon"]


def privatize_update(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], clip_norm: float,
                     noise_multiplier: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What a client uploads under DP: start + clipped update + Gaussian noise (new tensors).

    Keys of `trained` missing from `start` (a head trained for the first time) count from zero.
    Inputs are not modified; outputs keep each tensor's dtype and device.
    """
    if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    updates = {}
    for key, value in trained.items():
        base = start.get(key)
        if base is not None and base.shape != value.shape:
            raise ValueError(f"key {key!r}: shape {tuple(base.shape)} received, {tuple(value.shape)} trained")
        updates[key] = value.detach().double() - (base.detach().double().to(value.device) if base is not None else 0.0)
    total = math.sqrt(sum(float(u.pow(2).sum()) for u in updates.values()))
    if not math.isfinite(total):
        bad = next(k for k, u in updates.items() if not bool(torch.isfinite(u).all()))
        raise ValueError(f"the update of {bad!r} has NaN or Inf values")
    factor = min(1.0, clip_norm / total) if total > 0 else 1.0
    std = noise_multiplier * clip_norm
    out = {}
    for key, value in trained.items():
        noisy = updates[key] * factor
        if std > 0:
            noise = torch.randn(noisy.shape, generator=generator, dtype=torch.float64, device="cpu")
            noisy = noisy + std * noise.to(noisy.device)
        base = start.get(key)
        result = noisy + (base.detach().double().to(value.device) if base is not None else 0.0)
        out[key] = result.to(value.dtype)
    return out


def gaussian_epsilon(noise_multiplier: float, delta: float = 1e-5) -> float:
    """Epsilon of one Gaussian-mechanism release at the given delta (classic bound, valid for epsilon <= 1;
    above that it is a loose upper estimate): epsilon = sqrt(2 ln(1.25 / delta)) / noise_multiplier."""
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    return math.sqrt(2.0 * math.log(1.25 / delta)) / noise_multiplier
