"""build_tree and aggregate() on PEFT-style state dicts against the plain stack, same run, same inputs.

The paper's NLU configuration (L=24 layers, q and v adapted, d=1024, r=4) at N=1000 clients:
- build_tree end to end vs its unavoidable work, measured in the same run (one packing copy of the B
  factors into [N, P_B] plus the per-layer Gram GEMMs as torch.mm on the same shapes; target <= 1.25x),
  and, for reference, vs torch.cdist per layer + scipy linkage + scipy cut_tree + sklearn silhouette;
- aggregate() with a stored tree (the per-round path) vs a straightforward PyTorch loop over keys and
  clusters (target >= 5x) and vs one copy of its inputs (target <= 2x).
Prints a table and writes benchmarks/results/aggregate.json.

    python benchmarks/bench_aggregate.py            # N=1000 (a few minutes on 2 cores, ~5 GB of RAM)
    python benchmarks/bench_aggregate.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fedtreelora as ftl

RESULTS = Path(__file__).resolve().parent / "results"


def client_states(n: int, n_layers: int, d: int, r: int, groups: int = 4, seed: int = 0):
    """PEFT-like LoRA state dicts (RoBERTa key names) with a trunk and `groups` planted branches."""
    g = torch.Generator().manual_seed(seed)
    keys = []
    for l in range(n_layers):
        for m in ("query", "value"):
            base = f"base_model.model.roberta.encoder.layer.{l}.attention.self.{m}"
            keys += [(f"{base}.lora_A.weight", (r, d), l), (f"{base}.lora_B.weight", (d, r), l)]
    centres = [{k: torch.randn(shape, generator=g) for k, shape, _ in keys} for _ in range(groups)]
    states = []
    for i in range(n):
        grp = i % groups
        states.append({k: (centres[grp][k] if l >= n_layers // 2 else centres[0][k]) + 0.3 * torch.randn(shape, generator=g)
                       for k, shape, l in keys})
    return states, keys


def plain_build_tree(states, keys, n_layers, window=3, tau=0.1):
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform
    from sklearn.metrics import silhouette_score

    per_layer = []
    for l in range(n_layers):
        b_keys = [k for k, _, kl in keys if kl == l and "lora_B" in k]
        rows = torch.stack([torch.cat([s[k].flatten() for k in b_keys]) for s in states])
        per_layer.append(torch.cdist(rows, rows).numpy().astype(np.float64))
    mean = np.mean(per_layer, axis=0)
    np.fill_diagonal(mean, 0.0)
    z = linkage(squareform(0.5 * (mean + mean.T), checks=False), "average")
    n, prev, counts = len(states), 1, []
    for l in range(n_layers):
        d = per_layer[l].copy()
        np.fill_diagonal(d, 0.0)
        best, best_score = prev, None
        for c in range(prev, min(n - 1, prev + window - 1) + 1):
            score = tau if c == 1 else silhouette_score(d, cut_tree(z, n_clusters=[c])[:, 0], metric="precomputed")
            if best_score is None or score > best_score:
                best, best_score = c, score
        counts.append(best)
        prev = best
    return counts


def plain_aggregate(states, keys, labels, weights):
    """The loop a user writes: per key, stack the clients, per cluster a weighted mean inside and outside."""
    n = len(states)
    cluster_states = [{} for _ in range(n)]
    external_states = [{} for _ in range(n)]
    for key, _, l in keys:
        stacked = torch.stack([s[key] for s in states])
        lab = labels[l]
        for c in lab.unique().tolist():
            inside = lab == c
            w_in, w_out = weights[inside], weights[~inside]
            mean_in = (stacked[inside] * w_in.view(-1, *[1] * (stacked.dim() - 1))).sum(0) / w_in.sum()
            mean_out = ((stacked[~inside] * w_out.view(-1, *[1] * (stacked.dim() - 1))).sum(0) / w_out.sum()
                        if bool((~inside).any()) else torch.zeros_like(mean_in))
            for i in inside.nonzero().flatten().tolist():
                cluster_states[i][key] = mean_in
                external_states[i][key] = mean_out
    return cluster_states, external_states


GRAM_BLOCK_ROWS = 256   # csrc/cpu/layer_distances.cpp's upper_gram: the upper staircase in row blocks


def build_floor(states, keys, n_layers, staircase=False):
    """build_tree's unavoidable work: pack every client's B factors into one [N, P_B] buffer (one copy),
    then one Gram GEMM per layer on its column slice: the whole [N, N] Gram (the design's floor), or,
    with `staircase`, only the upper staircase of row blocks that build_tree's kernel computes (it
    uses the symmetry; about 62% of the Gram's flops at N=1000)."""
    b_keys = [(k, l) for k, _, l in keys if "lora_B" in k]
    widths = [sum(states[0][k].numel() for k, kl in b_keys if kl == l) for l in range(n_layers)]
    packed = torch.empty(len(states), sum(widths), dtype=states[0][b_keys[0][0]].dtype)
    for i, s in enumerate(states):
        torch.cat([s[k].reshape(-1) for k, _ in b_keys], out=packed[i])
    start = 0
    for w in widths:
        block = packed[:, start:start + w]
        if staircase:
            for first in range(0, block.shape[0], GRAM_BLOCK_ROWS):
                torch.mm(block[first:first + GRAM_BLOCK_ROWS], block[first:].T)
        else:
            torch.mm(block, block.T)
        start += w


def copy_inputs(states):
    """aggregate()'s floor: one copy of every input tensor."""
    return [{k: v.clone() for k, v in s.items()} for s in states]


def input_bytes(states) -> int:
    return sum(v.numel() * v.element_size() for s in states for v in s.values())


def copy_bytes(src, dst):
    """The physical bound under the floor: the same bytes copied as one contiguous tensor into memory
    already faulted in (no per-tensor allocation or dispatch, no page faults), which nothing that reads
    96,000 separate tensors can beat."""
    return dst.copy_(src)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "aggregate.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.layers, args.hidden, args.repeats = 40, 4, 64, 1
    print(f"... building {args.clients} client state dicts", file=sys.stderr, flush=True)
    states, keys = client_states(args.clients, args.layers, args.hidden, args.rank)
    weights = torch.randint(50, 500, (args.clients,)).double()

    print("... build_tree", file=sys.stderr, flush=True)
    t_tree, tree = timed(lambda: ftl.build_tree(states), args.repeats)
    t_plain_tree, counts = timed(lambda: plain_build_tree(states, keys, args.layers), 1)
    same_counts = tree.n_clusters.tolist() == counts
    t_tree_floor, _ = timed(lambda: build_floor(states, keys, args.layers), args.repeats)
    t_stair, _ = timed(lambda: build_floor(states, keys, args.layers, staircase=True), args.repeats)

    print("... aggregate with the stored tree", file=sys.stderr, flush=True)
    t_agg, res = timed(lambda: ftl.aggregate(states, weights=weights, tree=tree), args.repeats)
    t_plain_agg, (plain_cluster, _) = timed(lambda: plain_aggregate(states, keys, tree.labels, weights), args.repeats)
    t_copy, _ = timed(lambda: copy_inputs(states), args.repeats)
    n_bytes = input_bytes(states)
    flat, flat_dst = torch.ones(n_bytes // 4, dtype=torch.float32), torch.zeros(n_bytes // 4, dtype=torch.float32)
    t_memcpy, _ = timed(lambda: copy_bytes(flat, flat_dst), args.repeats)
    del flat, flat_dst
    err = max(float((res.cluster_states[i][k] - plain_cluster[i][k]).abs().max())
              for i in (0, args.clients - 1) for k, _, _ in keys)

    rows = [
        {"step": "build_tree (end to end)", "ours_s": t_tree, "plain_s": t_plain_tree, "speedup": t_plain_tree / t_tree,
         "peer": "cdist + scipy linkage/cut_tree + sklearn silhouette", "floor": "B packing copy + Gram GEMMs",
         "floor_s": t_tree_floor, "vs_floor": t_tree / t_tree_floor, "target": "<= 1.25x the floor",
         "met": t_tree / t_tree_floor <= 1.25,
         "staircase_floor_s": t_stair,
         "notes": f"cluster counts per layer identical to the plain stack's: {same_counts} ({tree.n_clusters.tolist()}); "
                  f"against the packing copy plus the GEMMs build_tree's kernel actually runs (the upper staircase "
                  f"of {GRAM_BLOCK_ROWS}-row blocks: {t_stair:.3f}s): {t_tree / t_stair:.2f}x, so everything else "
                  f"(centring, distances, linkage, cuts, checks) is {100 * (t_tree - t_stair) / t_tree:.0f}% of build_tree"},
        {"step": "aggregate (stored tree)", "ours_s": t_agg, "plain_s": t_plain_agg, "speedup": t_plain_agg / t_agg,
         "peer": "PyTorch loop over keys and clusters", "floor": "one copy of the inputs", "floor_s": t_copy,
         "vs_floor": t_agg / t_copy, "target": ">= 5x the loop, <= 2x the floor",
         "met": t_plain_agg / t_agg >= 5 and t_agg / t_copy <= 2, "memcpy_s": t_memcpy, "input_bytes": n_bytes,
         "notes": f"max |ours - loop| = {err:.1e}; the same {n_bytes / 1e9:.2f} GB copied as one contiguous tensor into warm memory: "
                  f"{t_memcpy:.3f}s ({n_bytes / t_memcpy / 1e9:.1f} GB/s), ours {t_agg / t_memcpy:.2f}x that "
                  f"(aggregate reads the inputs once into blocks of rows, then reads each block once more in tree_reduce "
                  f"and writes the experts)"},
    ]
    size = f"N={args.clients}, L={args.layers}, d={args.hidden}, r={args.rank}"
    lines = ["| step | size | ours (s) | plain stack | plain (s) | ours faster by | floor | floor (s) | ours / floor | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {size} | {r['ours_s']:.3f} | {r['peer']} | {r['plain_s']:.3f} | {r['speedup']:.1f}x | "
              f"{r['floor']} | {r['floor_s']:.3f} | {r['vs_floor']:.2f}x | {r['target']} | {'yes' if r['met'] else 'NO'} |"
              for r in rows]
    print("\n".join(lines))
    for r in rows:
        print(f"  {r['step']}: {r['notes']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": size, "threads": torch.get_num_threads(), "torch": torch.__version__,
                                    "native": ftl.native_available(), "quick": args.quick, "rows": rows,
                                    "table": "\n".join(lines)}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
