"""Synthetic PEFT LoRA client adapters with a planted, nested group structure.

Used by the docstring examples, the tests and the benchmarks: state dicts with the keys
`get_peft_model_state_dict` returns for a BERT classifier with LoRA on query and value.
"""
from __future__ import annotations

import torch

__all__ = ["planted_states"]


def planted_states(n_layers: int = 6, groups=(1, 1, 2, 2, 4, 4), n_clients: int = 8, r: int = 2, d: int = 8,
                   separation: float = 5.0, noise: float = 0.1, seed: int = 0, head: bool = True,
                   dtype=torch.float32):
    """BERT-like LoRA state dicts where layer l has groups[l] planted groups of equal size (nested).

    Parameters
    ----------
    n_layers, n_clients, r, d : int
        Transformer layers, clients, LoRA rank and hidden size.
    groups : sequence of int
        Planted group count of each layer (non-decreasing, each dividing the clients evenly for nesting).
    separation, noise : float
        Norm of the group centres of a layer's B factors, and the standard deviation around them.
    seed : int
        Seed of every draw.
    head : bool
        Add a classification head (`classifier.weight`, `classifier.bias`) outside the layers.
    dtype : torch.dtype
        dtype of every tensor.

    Returns
    -------
    states : list of dict
        One state dict per client.
    truth : torch.Tensor
        int64 [L, N], the planted group of each client at each layer.

    Notes
    -----
    Group centres of a layer are orthonormal directions of the same norm, so the structure lies in
    directions, not norms (clipping keeps it).

    Examples
    --------
    >>> from fedtreelora.core.synthetic import planted_states
    >>> states, truth = planted_states(n_layers=2, groups=(1, 2), n_clients=4)
    >>> truth.tolist()
    [[0, 0, 0, 0], [0, 0, 1, 1]]
    >>> sorted(states[0])[0]
    'base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight'
    """
    g = torch.Generator().manual_seed(seed)
    states = [dict() for _ in range(n_clients)]
    truth = torch.zeros(n_layers, n_clients, dtype=torch.int64)
    for l in range(n_layers):
        k_groups = groups[l]
        centres = torch.linalg.qr(torch.randn(d * r, max(k_groups, 1), generator=g))[0].T * separation
        for k in range(n_clients):
            grp = k * k_groups // n_clients
            truth[l, k] = grp
            prefix = f"base_model.model.bert.encoder.layer.{l}.attention.self"
            for module in ("query", "value"):
                b = (centres[grp] if k_groups > 1 else torch.zeros(d * r)).reshape(d, r) + noise * torch.randn(d, r, generator=g)
                states[k][f"{prefix}.{module}.lora_A.weight"] = torch.randn(r, d, generator=g).to(dtype)
                states[k][f"{prefix}.{module}.lora_B.weight"] = b.to(dtype)
    if head:
        for k in range(n_clients):
            states[k]["base_model.model.classifier.weight"] = torch.randn(3, d, generator=g).to(dtype)
            states[k]["base_model.model.classifier.bias"] = torch.randn(3, generator=g).to(dtype)
    return states, truth
