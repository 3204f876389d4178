"""Calibrate tau on training data: the cuts every tau gives on the warm-up uploads of some runs.

    python benchmarks/calibrate_tau.py runs/calibration/hierarchical-seed5 ...

Warm-up runs for calibration (`fedtreelora simulate --config configs/hierarchical.yaml --seed 5
--methods local --set rounds=0 --set num_threads=1 --run-dir runs/calibration/hierarchical-seed5`)
train no federated round; their test accuracy is printed but not used. Seeds that the benchmark does
not report keep the calibration apart from the evaluation.

For every tau of the grid and every run: the tree's cuts (shallow to deep) and the ARI of the
deepest cut against the planted groups, marked `mixed` where a cluster of the deepest cut holds
clients of two groups. The calibrated tau is the largest one whose deepest cut mixes no groups on
any run: as much sharing as the data allow without merging groups whose tasks conflict (a group
split in two costs its clients some data; two groups merged cost them their task). When that is
the grid's largest tau, it is only a lower bound (say so with a wider --taus). As a reference that
needs no planted groups, the silhouette that a tree finds in data without structure: per run, the 95th percentile over --null draws of the
best silhouette (over the layers, and the cuts into 2..1+window clusters) of the tree built on the
same B factors with every column shuffled across clients. A tau below that level splits on noise.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from tree_diagnostics import load_warmup


def null_silhouette(xb: torch.Tensor, offsets: torch.Tensor, config: dict, draws: int, seed: int = 0) -> float:
    """95th percentile of the best silhouette (any layer, 2..1+window clusters) that the tree finds in
    `xb` [N, P_B] (layer l spans offsets[l]:offsets[l+1]) with every column shuffled across the rows."""
    from fedtreelora.core import ops

    g = torch.Generator().manual_seed(seed)
    n, best = xb.shape[0], []
    counts = torch.arange(2, min(n - 1, config["window"] + 1) + 1, dtype=torch.int64)
    for _ in range(draws):
        shuffled = torch.gather(xb, 0, torch.argsort(torch.rand(xb.shape, generator=g), dim=0))
        per_layer, mean = ops.layer_distances(shuffled, offsets, config["metric"])
        cuts = ops.cut_tree(ops.linkage(mean.double(), config["linkage"]), counts)
        sil = ops.silhouette(per_layer, cuts.expand(per_layer.shape[0], -1, -1).contiguous())
        best.append(float(sil.max()))
    return float(np.quantile(best, 0.95))


def main(argv=None) -> int:
    from sklearn.metrics import adjusted_rand_score

    from fedtreelora.core import choose_cuts, client_distances, ops
    from fedtreelora.core.adapters import pack, parse_layout

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run folders with config.json and checkpoints/warmup/ (planted groups >= 2)")
    parser.add_argument("--taus", type=float, nargs="+", default=[round(0.01 * i, 2) for i in range(16)],
                        help="the grid (default: 0.00, 0.01, ..., 0.15)")
    parser.add_argument("--null", type=int, default=20, help="draws of the no-structure reference (0: none; default 20)")
    args = parser.parse_args(argv)
    if args.null < 0:
        parser.error(f"--null must be >= 0, got {args.null}")
    if any(not -1.0 <= t <= 1.0 for t in args.taus):
        parser.error(f"--taus must lie in [-1, 1] (silhouette levels), got {args.taus}")
    runs = [(d, *load_warmup(d)) for d in args.run_dirs]
    for d, config, _, _ in runs:
        if config["num_groups"] < 2:
            parser.error(f"{d} has {config['num_groups']} planted group: there are no groups to keep apart")
    names = [str(d).rstrip("/").rsplit("/", 1)[-1] for d, *_ in runs]
    # tau only moves the cut search: the distances and the tree (build_tree's: linkage on the mean
    # distance) are built once per run
    built = []
    for _, config, adapters, groups in runs:
        per_layer, mean = client_distances(adapters, config["metric"])
        built.append((per_layer, ops.linkage(mean, config["linkage"]), config["window"], groups))
    rows, found = [], []
    for tau in sorted(args.taus):
        cells, pure = [], []
        for per_layer, z, window, groups in built:
            n_clusters, labels, _ = choose_cuts(per_layer, z, window, tau)
            deepest = labels[-1].numpy()
            pure.append(all(len(set(groups[deepest == c].tolist())) == 1 for c in set(deepest.tolist())))
            cells.append(f"{adjusted_rand_score(groups, deepest):.2f} ({','.join(str(int(c)) for c in n_clusters)})"
                         + ("" if pure[-1] else " mixed"))
        if all(pure):
            found.append(tau)
        rows.append((tau, cells))
    width = max(len(c) for c in names + [c for _, cells in rows for c in cells])
    print(f"deepest-cut ARI against the planted groups (cuts shallow to deep), {len(runs)} runs")
    print(f"{'tau':>5}  " + "  ".join(f"{n:>{width}}" for n in names))
    for tau, cells in rows:
        print(f"{tau:>5.2f}  " + "  ".join(f"{c:>{width}}" for c in cells))
    if args.null:
        refs = []
        for _, config, adapters, _ in runs:
            b_layout = parse_layout(adapters).b_layout()
            refs.append(null_silhouette(pack(adapters, b_layout), b_layout.layer_offsets, config, args.null))
        print("no-structure silhouette (q95 of the best silhouette, columns shuffled): "
              + ", ".join(f"{n} {r:.3f}" for n, r in zip(names, refs)))
    if found:
        print(f"calibrated tau: {max(found):.2f} (the largest whose deepest cut mixes no planted groups on any run)"
              + ("; the grid's largest, so only a lower bound: widen --taus" if max(found) == max(args.taus) else ""))
    else:
        print("no tau of the grid keeps the planted groups apart at the deepest layer on every run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
