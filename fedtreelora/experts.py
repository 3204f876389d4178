"""Group means of PEFT LoRA state dicts under arbitrary per-segment partitions (the baselines' server).

A *segment* is a list of state-dict keys that share one partition of the clients (a transformer
layer's LoRA factors, the A factors of every layer, the head, ...). For each client the cluster
expert is the weighted mean over its cluster, the external expert the weighted mean over everyone
else; both come from one `fedtreelora.ops.tree_reduce` call on the packed [N, P] matrix.
"""
from __future__ import annotations

import numpy as np
import torch

from . import adapters, ops


def layer_keys(state: dict[str, torch.Tensor]) -> tuple[list[list[str]], list[str]]:
    """(keys of each transformer layer, shallow to deep; keys outside any layer, e.g. the head),
    as `adapters.parse_layout` (the library's PEFT key parser) lays them out."""
    layout = adapters.parse_layout([state])
    starts = layout.layer_offsets.tolist()
    layers = [[key for key, (lo, _) in zip(layout.keys, layout.columns) if starts[l] <= lo < starts[l + 1]]
              for l in range(len(layout.layers))]
    return [sorted(seg) for seg in layers], sorted(layout.head_keys)


def pack(states: list[dict[str, torch.Tensor]], segments: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clients' tensors of the segments, flattened: x [N, P] float32 and layer_offsets [S+1]."""
    keys = [k for seg in segments for k in seg]
    for i, state in enumerate(states):
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"client {i} state dict lacks {missing[0]!r}")
    x = torch.stack([torch.cat([state[k].detach().float().reshape(-1).cpu() for k in keys]) for state in states])
    sizes = [sum(states[0][k].numel() for k in seg) for seg in segments]
    return x, torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)


def b_distances(states: list[dict[str, torch.Tensor]], metric: str = "frobenius") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer [L, N, N] and mean [N, N] distances between the clients' B factors (DESIGN.md step 2),
    on the same columns as `build_tree`."""
    layout = adapters.parse_layout(states).b_layout()
    x = adapters.pack(states, layout).float().cpu()
    return ops.layer_distances(x, layout.layer_offsets, metric=metric)


def group_experts(states: list[dict[str, torch.Tensor]], segments: list[list[str]], labels, weights):
    """Per client: (cluster expert, external expert or None), both state dicts with `states`' keys.

    labels [S, N]: cluster of each client in each segment. A key in no segment stays the client's own.
    The external expert is None for a client whose cluster is everyone in every segment; in a segment
    where its cluster is everyone, its external tensors are zero (as `aggregate()` returns them).
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n = len(states)
    if labels.shape != (len(segments), n):
        raise ValueError(f"labels must be [segments, clients] = [{len(segments)}, {n}], got {tuple(labels.shape)}")
    # relabel each segment to 0..C-1 so tree_reduce's C stays small
    labels = torch.stack([torch.unique(row, return_inverse=True)[1] for row in labels])
    x, offsets = pack(states, segments)
    cluster, external = ops.tree_reduce(x, offsets, labels, torch.as_tensor(weights, dtype=torch.float64))
    results = []
    for k in range(n):
        rows = labels[:, k]
        cols = [slice(int(offsets[s]), int(offsets[s + 1])) for s in range(len(segments))]
        c_vec = torch.cat([cluster[rows[s], cols[s]] for s in range(len(segments))])
        e_vec = torch.cat([external[rows[s], cols[s]] for s in range(len(segments))])
        has_external = any(bool((labels[s] != rows[s]).any()) for s in range(len(segments)))
        results.append((_unpack(states[k], segments, c_vec),
                        _unpack(states[k], segments, e_vec) if has_external else None))
    return results


def _unpack(template: dict[str, torch.Tensor], segments: list[list[str]], vec: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in template.items()}
    pos = 0
    for seg in segments:
        for key in seg:
            t = template[key]
            out[key] = vec[pos:pos + t.numel()].reshape(t.shape).to(t.dtype)
            pos += t.numel()
    return out
