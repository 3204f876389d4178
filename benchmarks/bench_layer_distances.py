"""Time fedtreelora.ops.layer_distances against torch.cdist on the same per-layer slices.

Default size: the paper's NLU configuration per layer (B factors of q and v, d=1024, r=4: 8192 columns)
at a reduced client count and layer count, so that it runs in seconds on a small machine. The ratio
is per layer, so fewer layers do not change it. Also prints the accuracy of both under a large
common offset (clients that differ by little), against float64.
    python benchmarks/bench_layer_distances.py [--clients 500] [--layers 4] [--width 8192]
"""
from __future__ import annotations

import argparse
import time

import torch

import fedtreelora.ops as ops
from fedtreelora import reference


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function, runs interleaved so that load from elsewhere hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times):
            start = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - start)
    return [min(kept) for kept in times]


def cdist_layers(x: torch.Tensor, offsets: list[int]) -> list[torch.Tensor]:
    return [torch.cdist(x[:, lo:hi], x[:, lo:hi]) for lo, hi in zip(offsets[:-1], offsets[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=8192, help="columns per layer")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"native: {ops.native_available()}, threads: {torch.get_num_threads()}, "
          f"N={args.clients}, L={args.layers}, width={args.width}")
    x = 1e-2 * torch.randn(args.clients, args.layers * args.width, generator=torch.Generator().manual_seed(0))
    offsets = torch.arange(args.layers + 1, dtype=torch.int64) * args.width
    ours, base = best_times([lambda: ops.layer_distances(x, offsets, "frobenius"),
                             lambda: cdist_layers(x, offsets.tolist())], args.repeats)
    print(f"layer_distances {ours * 1e3:9.1f} ms   torch.cdist per layer {base * 1e3:9.1f} ms   "
          f"speed-up {base / ours:.2f}x")

    # Accuracy with a large common offset, on a small slice (the float64 reference is slow).
    small = (1000.0 + 1e-3 * torch.randn(64, 512, generator=torch.Generator().manual_seed(1))).float()
    small_offsets = torch.tensor([0, 512])
    exact = reference.layer_distances(small, small_offsets)[0][0].double()
    off_diagonal = ~torch.eye(64, dtype=torch.bool)
    for name, got in (("layer_distances", ops.layer_distances(small, small_offsets)[0][0]),
                      ("torch.cdist", torch.cdist(small, small))):
        rel = ((got.double() - exact).abs() / exact.clamp_min(1e-300))[off_diagonal].max()
        print(f"offset 1000 + 1e-3*randn: {name:16s} max relative error {float(rel):.2e}, "
              f"diagonal exactly zero: {bool((torch.diagonal(got) == 0).all())}")


if __name__ == "__main__":
    main()
