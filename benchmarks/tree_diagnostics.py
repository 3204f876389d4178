"""Why the tree cuts where it does: per-layer evidence from a run folder's warm-up uploads.

    python benchmarks/tree_diagnostics.py runs/simulate [--metric frobenius]

For every layer: the silhouette of the planted groups (and super-groups, when the run has them)
under that layer's B distances, the between/within-group distance ratio, the cut the tree chose and
its ARI against the groups; then the same for the mean distance the tree is built on, and for the
classifier head (which the tree does not read; it follows the deepest layer's cut), and what flat
clustering (one partition for all layers: the best-silhouette cut of the same tree under the mean
distance) would choose: the mean-distance silhouette of every cut into 2..8 clusters. Reads
config.json and checkpoints/warmup/ of the run; trains nothing (a calibration on training data).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def load_warmup(run_dir):
    """(config dict, the clients' warm-up adapters, their planted groups) of a run folder; exits with
    a message naming the folder when it holds no run config or no committed warm-up."""
    from fedtreelora.federation.checkpoints import load_checkpoint

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise SystemExit(f"{run}: no config.json (not a run folder of `fedtreelora simulate`)")
    config = json.loads((run / "config.json").read_text())
    loaded = load_checkpoint(run / "checkpoints" / "warmup")
    if loaded is None:
        raise SystemExit(f"{run}: no committed warm-up in checkpoints/warmup (a run killed before its first warm-up round?)")
    states = loaded[1]
    uploaded = np.array([s is not None for s in states])
    groups = np.arange(len(states)) % config["num_groups"]   # the partitioner's round-robin groups
    return config, [s.adapter for s in states if s is not None], groups[uploaded]


def main(argv=None) -> int:
    from sklearn.metrics import adjusted_rand_score

    from fedtreelora.core import TreeConfig, build_tree, choose_cuts, client_distances, ops
    from fedtreelora.core.adapters import parse_layout

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--metric", default=None, help="distance (default: the run's)")
    parser.add_argument("--tau", type=float, default=None, help="tau of the re-built tree (default: the run's)")
    parser.add_argument("--window", type=int, default=None, help="window of the re-built tree (default: the run's)")
    args = parser.parse_args(argv)
    config, adapters, groups = load_warmup(args.run_dir)
    supers = config.get("super_groups", 0)
    per_super = config["num_groups"] // supers if supers and supers > 1 else None
    metric = args.metric or config["metric"]
    tree_cfg = TreeConfig(linkage=config["linkage"], metric=metric, window=args.window or config["window"],
                          tau=config["tau"] if args.tau is None else args.tau)
    tree = build_tree(adapters, config=tree_cfg)
    per_layer, mean = client_distances(adapters, metric)

    def sil(d, labels):
        if len(set(labels.tolist())) < 2:
            return float("nan")
        return float(ops.silhouette(d.float(), torch.as_tensor(labels, dtype=torch.int64)[None])[0])

    def ratio(d, labels):
        same = labels[:, None] == labels[None, :]
        off = ~np.eye(len(labels), dtype=bool)
        dd = d.double().numpy()
        within = dd[same & off].mean()
        return float(dd[~same].mean() / within) if within > 0 else float("nan")  # nan: identical (a frozen head)

    head = f"{'layer':>5} {'sil(groups)':>11} {'sil(super)':>10} {'between/within':>14} {'cut':>4} {'ARI(cut,groups)':>15}"
    print(f"{len(adapters)} clients, groups {groups.tolist()}, {metric} distance, tau {tree_cfg.tau}, window {tree_cfg.window}")
    print(head)
    rows = list(enumerate(per_layer)) + [("mean", mean)]
    for l, d in rows:
        sup = sil(d, groups // per_super) if per_super else float("nan")
        cut = "" if l == "mean" else int(tree.n_clusters[l])
        ari = "" if l == "mean" else f"{adjusted_rand_score(groups, tree.labels[l].numpy()):.2f}"
        print(f"{l:>5} {sil(d, groups):>11.3f} {sup:>10.3f} {ratio(d, groups):>14.3f} {cut!s:>4} {ari:>15}")
    head_keys = parse_layout(adapters).head_keys   # the classifier head (modules_to_save), if any
    if head_keys:
        # The tree reads B factors only; the head follows the deepest layer's cut. Its own distance shows
        # how much of the groups' difference the warm-up left in the head rather than in the B factors.
        h = torch.stack([torch.cat([a[k].reshape(-1).double() for k in head_keys]) for a in adapters])
        dh = torch.cdist(h, h).fill_diagonal_(0.0)
        sup = sil(dh, groups // per_super) if per_super else float("nan")
        print(f"{'head':>5} {sil(dh, groups):>11.3f} {sup:>10.3f} {ratio(dh, groups):>14.3f}"
              f" {'':>4} {'':>15}   (not read by the tree: {', '.join(k.rsplit('.', 2)[-2] + '.' + k.rsplit('.', 1)[-1] for k in head_keys)})")
    if len(adapters) > 2:   # flat's own rule (methods.FlatClusters): the best-silhouette cut, any count >= 2
        _, flat, scores = choose_cuts(mean[None], tree.linkage, window=None, tau=None)
        shown = ", ".join(f"{c}: {v:.3f}" for c, v in sorted(scores[0].items()) if c <= 8)
        print(f"flat (mean distance): {shown}{', ...' if len(scores[0]) > 7 else ''} -> "
              f"{len(set(flat[0].tolist()))} clusters, ARI {adjusted_rand_score(groups, flat[0].numpy()):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
