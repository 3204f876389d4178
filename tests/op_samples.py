"""One sample_inputs(device) per native op (as in pytorch/extension-cpp's tests): the argument tuples
that the CPU tests run through torch.library.opcheck and that tests/cuda runs on the device and
compares with the CPU kernel. Every sample is valid input; edge sizes N = 1, 2, 3 and ties included.
"""
from __future__ import annotations

import math

import torch

OPS = ("layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows")


def _rows(n: int, widths, dtype=torch.float32, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sum(widths), generator=gen).to(dtype)
    offsets = torch.tensor([0] + list(widths), dtype=torch.int64).cumsum(0)
    return x.to(device), offsets.to(device)


def _distances(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    d = torch.cdist(x, x)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    return d.to(dtype)


def sample_inputs(op: str, device="cpu") -> list[tuple]:
    """Argument tuples for torch.ops.fedtreelora.<op>, on `device`."""
    dev = torch.device(device)
    if op == "layer_distances":
        out = []
        for n, widths, dtype, metric in ((1, [3], torch.float32, "frobenius"), (2, [1, 4], torch.float64, "cosine"),
                                         (3, [5, 2], torch.float16, "frobenius"), (9, [7, 40, 1], torch.bfloat16, "cosine"),
                                         (33, [64, 3], torch.float32, "frobenius")):
            x, off = _rows(n, widths, dtype, seed=n, device=dev)
            out.append((x, off, metric))
        return out
    if op == "linkage":
        return [(_distances(n, n).to(dev), m) for n, m in ((1, "average"), (2, "single"), (3, "ward"), (12, "complete"),
                                                           (12, "weighted"))]
    if op == "cut_tree":
        out = []
        for n in (1, 2, 3, 10):
            z = torch.ops.fedtreelora.linkage(_distances(n, n), "average") if n > 1 else torch.zeros(0, 4, dtype=torch.float64)
            out.append((z.to(dev), torch.arange(1, n + 1, dtype=torch.int64, device=dev)))
        return out
    if op == "silhouette":
        out = []
        for n, dtype in ((1, torch.float32), (2, torch.float64), (3, torch.float32), (20, torch.float16),
                         (20, torch.bfloat16), (37, torch.float32)):
            d = torch.stack([_distances(n, n + l) for l in range(2)]).to(dtype)
            gen = torch.Generator().manual_seed(n)
            labels = torch.randint(0, max(1, min(n, 4)), (2, 3, n), generator=gen)
            out.append((d.to(dev), labels.to(dev)))
        return out
    if op == "tree_reduce":
        out = []
        for n, widths, dtype, c in ((1, [3], torch.float32, 1), (2, [1, 5], torch.float64, 2), (3, [4, 4], torch.float16, 3),
                                    (17, [300, 9], torch.bfloat16, 5), (40, [70, 1, 33], torch.float32, 40)):
            x, off = _rows(n, widths, dtype, seed=n, device=dev)
            gen = torch.Generator().manual_seed(n)
            labels = torch.randint(0, c, (len(widths), n), generator=gen).to(dev)
            weights = (torch.rand(n, generator=gen, dtype=torch.float64) * 9 + 1).to(dev)
            out.append((x, off, labels, weights, c))
        return out
    if op == "pack_rows":  # (parts, out): out is written in place; compare it after the call
        out = []
        for n, shapes, dtype, spare in ((1, [(3,)], torch.float32, 0), (2, [(2, 3), (4,), ()], torch.float64, 0),
                                        (3, [(5,), (0,), (1, 2)], torch.float16, 3), (7, [(4, 4), (3,)], torch.bfloat16, 5)):
            gen = torch.Generator().manual_seed(n)
            parts = [torch.randn(shape, generator=gen).to(dtype).to(dev) for shape in shapes for _ in range(n)]
            width = sum(math.prod(shape) for shape in shapes)
            buffer = torch.zeros(n, width + spare, dtype=dtype, device=dev)  # spare > 0: out's rows strided
            out.append((parts, buffer[:, :width]))
        return out
    raise KeyError(op)
