"""Each native op against the plain stack a user would write, same process, same inputs.

Sizes: the paper's NLU configuration (L=24 layers, q and v adapted,
d=1024, r=4) at N=1000 clients, and linkage at N=4000. Prints one table with ratios and the
targets, and writes benchmarks/results/ops.json (ops_cuda.json with --device cuda).

    python benchmarks/bench_ops.py                # the full figures (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --quick        # small sizes, a smoke run
    python benchmarks/bench_ops.py --device cuda  # on a GPU: tree_reduce vs the copy bandwidth too
    python benchmarks/bench_ops.py --only silhouette --runs 5   # one op, five runs in one process
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fedtreelora
from fedtreelora import ops

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("layer_distances", "linkage", "silhouette", "tree_reduce")


def busy_threads(fn) -> float:
    """CPU seconds per wall second of one fn() call: how many threads the op kept busy (a kernel
    whose parallel loop silently runs serially shows 1.0)."""
    import resource
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1):
    """Median wall time of fn() over `repeats` runs after `warmup` runs, and the last result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def paper_shapes(n_layers: int, d: int, r: int, modules: int = 2):
    """Per-layer widths: B factors only (the distances), and A and B together (the reduction)."""
    b_width = modules * d * r
    return b_width, 2 * b_width


# ---------------------------------------------------------------------------------------------
def bench_layer_distances(n, n_layers, b_width, device, repeats):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, n_layers * b_width, generator=gen).to(device)
    offsets = torch.arange(0, n_layers + 1, dtype=torch.int64, device=device) * b_width

    def ours():
        return ops.layer_distances(x, offsets)[1]

    def plain():
        per = [torch.cdist(x[:, l * b_width:(l + 1) * b_width], x[:, l * b_width:(l + 1) * b_width]) for l in range(n_layers)]
        return torch.stack(per).mean(0)

    t_ours, d_ours = timed(ours, device, repeats)
    t_plain, d_plain = timed(plain, device, repeats)
    # Accuracy with a large common offset: clients that differ by little.
    small = 64
    base = 1000.0 + 1e-3 * torch.randn(small, 4 * 256, generator=gen, dtype=torch.float64)
    off4 = torch.tensor([0, 256, 512, 768, 1024], device=device)
    truth = torch.stack([torch.cdist(base[:, i:i + 256], base[:, i:i + 256]) for i in range(0, 1024, 256)]).mean(0)
    xs = base.to(device=device, dtype=torch.float32)
    ours_small = ops.layer_distances(xs, off4)[1].double().cpu()
    cdist_small = torch.stack([torch.cdist(xs[:, i:i + 256], xs[:, i:i + 256]) for i in range(0, 1024, 256)]).mean(0).double().cpu()
    off_diag = ~torch.eye(small, dtype=torch.bool)
    rel = lambda d: float(((d - truth).abs()[off_diag] / truth[off_diag]).max())
    return {
        "op": "layer_distances", "size": f"N={n}, L={n_layers}, width={b_width}",
        "ours_s": t_ours, "peer": "torch.cdist per layer", "peer_s": t_plain, "speedup": t_plain / t_ours,
        "target": "no slower than torch.cdist (speedup >= 1), exact zero diagonal, accurate under a large offset",
        "met": t_ours <= t_plain and bool((torch.diagonal(d_ours) == 0).all()),
        "notes": f"max |diag| ours {float(torch.diagonal(d_ours).abs().max()):.1e} vs cdist {float(torch.diagonal(d_plain).abs().max()):.1e}; "
                 f"offset 1000 + 1e-3 noise: max rel error ours {rel(ours_small):.1e} vs cdist {rel(cdist_small):.1e}",
    }


def bench_linkage(n, repeats):
    import fastcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(1)
    points = rng.standard_normal((n, 16))
    condensed = pdist(points)
    square_np = np.ascontiguousarray(squareform(condensed))
    square = torch.from_numpy(square_np)
    cpu = torch.device("cpu")
    # Every timing starts from the same input, the [N, N] matrix (what layer_distances returns): ours
    # checks it and copies it in one pass; the peers need squareform (with its default checks: exactly
    # symmetric, zero diagonal) to get their condensed input. The peers on a ready condensed vector
    # are timed too and printed, for readers who hold one.
    t_ours, z_ours = timed(lambda: ops.linkage(square, "average"), cpu, repeats)
    t_scipy, z_scipy = timed(lambda: scipy_linkage(squareform(square_np), "average"), cpu, repeats)
    t_fc, z_fc = timed(lambda: fastcluster.linkage(squareform(square_np), "average"), cpu, repeats)
    t_scipy_c, _ = timed(lambda: scipy_linkage(condensed, "average"), cpu, repeats)
    t_fc_c, _ = timed(lambda: fastcluster.linkage(condensed, "average"), cpu, repeats)
    t_sq, _ = timed(lambda: squareform(square_np), cpu, repeats)
    best, best_c = min(t_scipy, t_fc), min(t_scipy_c, t_fc_c)
    identical = bool(np.array_equal(z_ours.numpy(), z_scipy))
    return {
        "op": "linkage (average)", "size": f"N={n}",
        "ours_s": t_ours, "peer": f"best of squareform + scipy ({t_scipy:.3f}s) and squareform + fastcluster ({t_fc:.3f}s)",
        "peer_s": best, "speedup": best / t_ours, "peer_condensed_s": best_c, "speedup_vs_condensed": best_c / t_ours,
        "target": "no slower than the faster peer from the same [N, N] input, identical Z",
        "met": t_ours <= best and identical,
        "notes": f"Z identical to scipy: {identical}; squareform alone {t_sq:.3f}s; on a ready condensed vector scipy "
                 f"{t_scipy_c:.3f}s, fastcluster {t_fc_c:.3f}s: ours faster by {best_c / t_ours:.2f}x",
    }


def bench_silhouette(n, n_layers, window, device, repeats):
    from scipy.cluster.hierarchy import cut_tree as scipy_cut_tree, linkage as scipy_linkage
    from scipy.spatial.distance import pdist, squareform
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(2)
    d = np.stack([squareform(pdist(rng.standard_normal((n, 8)))) for _ in range(n_layers)])
    z = scipy_linkage(squareform(d.mean(0), checks=False), "average")
    labels = scipy_cut_tree(z, n_clusters=list(range(2, 2 + window))).T  # [M, N]
    labels_all = np.broadcast_to(labels, (n_layers,) + labels.shape).copy()
    d_t = torch.from_numpy(d).float().to(device)
    l_t = torch.from_numpy(labels_all).to(device)
    t_ours, s_ours = timed(lambda: ops.silhouette(d_t, l_t), device, max(repeats, 5))
    t_read, _ = timed(lambda: d_t.sum(), device, max(repeats, 5))  # the floor: one read of d
    d32 = d.astype(np.float32)

    def one_layer(l):
        return [silhouette_score(d32[l], labels_all[l, m], metric="precomputed") for m in range(window)]

    # sklearn is slow: time its M calls on layer 0 with several repeats and scale by L (every layer
    # is the same size and work); the scores of every layer are computed once for the accuracy check.
    t_layer, _ = timed(lambda: one_layer(0), torch.device("cpu"), repeats=max(repeats, 5), warmup=1)
    t_plain = t_layer * n_layers
    s_plain = np.array([one_layer(l) for l in range(n_layers)])
    err = float(np.abs(s_ours.cpu().numpy() - s_plain).max())
    return {
        "op": "silhouette", "size": f"N={n}, L={n_layers}, M={window} partitions",
        "ours_s": t_ours, "peer": "sklearn silhouette_score loop (one layer timed, x L)", "peer_s": t_plain,
        "speedup": t_plain / t_ours, "floor_s": t_read, "vs_floor": t_ours / t_read,
        "target": ">= 100x faster than sklearn, <= 3x one read of d (d.sum())",
        "met": t_plain / t_ours >= 100 and t_ours <= 3 * t_read and err < 1e-5,
        "notes": f"max |ours - sklearn| = {err:.1e}; d.sum() {t_read:.4f}s, ours/d.sum() = {t_ours / t_read:.2f}; "
                 f"sklearn {1e3 * t_layer / window:.1f} ms per call; threads busy "
                 f"{busy_threads(lambda: [ops.silhouette(d_t, l_t) for _ in range(20)]):.1f} of {torch.get_num_threads()}",
    }


def bench_tree_reduce(n, n_layers, width, n_clusters, device, repeats):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, n_layers * width, generator=gen).to(device)
    offsets = torch.arange(0, n_layers + 1, dtype=torch.int64, device=device) * width
    # Deeper layers hold more clusters (a trunk and branches), as the method produces.
    counts = torch.linspace(1, n_clusters, n_layers).round().long()
    labels = torch.stack([torch.randint(0, int(c), (n,), generator=gen) for c in counts]).to(device)
    weights = torch.randint(50, 500, (n,), generator=gen).double().to(device)

    t_sum, _ = timed(lambda: x.sum(), device, repeats)
    t_ours, (cl, ex) = timed(lambda: ops.tree_reduce(x, offsets, labels, weights, n_clusters), device, repeats)

    def plain():  # one-hot weighted bmm per layer, externals from the totals
        xl = x.view(n, n_layers, width).transpose(0, 1)                                   # [L, N, W]
        onehot = torch.nn.functional.one_hot(labels, n_clusters).to(x.dtype).transpose(1, 2)  # [L, C, N]
        wf = weights.to(x.dtype)
        sums = torch.bmm(onehot * wf, xl)                                                  # [L, C, W]
        total = (xl * wf[None, :, None]).sum(1, keepdim=True)
        wc = (onehot * wf).sum(2, keepdim=True)
        cluster = sums / wc.clamp_min(1e-30)
        external = (total - sums) / (wf.sum() - wc).clamp_min(1e-30)
        return cluster.transpose(0, 1).reshape(n_clusters, -1), external.transpose(0, 1).reshape(n_clusters, -1)

    t_plain, (pc, pe) = timed(plain, device, repeats)
    present = torch.zeros(n_clusters, n_layers * width, dtype=torch.bool, device=device)
    for l in range(n_layers):
        present[labels[l].unique(), l * width:(l + 1) * width] = True
    err = float((cl - pc).abs()[present].max())
    row = {
        "op": "tree_reduce", "size": f"N={n}, P={n_layers * width} ({x.numel() * x.element_size() / 2**30:.2f} GiB), C={n_clusters}",
        "ours_s": t_ours, "peer": "one-hot torch.bmm", "peer_s": t_plain, "speedup": t_plain / t_ours,
        "floor_s": t_sum, "vs_floor": t_ours / t_sum,
        "target": "<= 1.5x the time of x.sum() and >= 2x faster than one-hot bmm",
        "met": t_ours <= 1.5 * t_sum and t_plain / t_ours >= 2,
        "notes": f"x.sum() {t_sum:.3f}s, ours/x.sum() = {t_ours / t_sum:.2f}; max |ours - bmm| = {err:.1e}; threads busy "
                 f"{busy_threads(lambda: ops.tree_reduce(x, offsets, labels, weights, n_clusters)):.1f} of {torch.get_num_threads()}",
    }
    # What the floor is made of, on this machine: bytes that must move, and the copy bandwidth.
    y = torch.empty_like(x)
    t_copy, _ = timed(lambda: y.copy_(x), device, repeats)
    moved = (x.numel() + 2 * n_clusters * x.shape[1]) * x.element_size()
    row["bytes_moved"] = moved
    row["notes"] += (f"; moves {moved / 2**30:.2f} GiB: {moved / t_ours / 1e9:.1f} GB/s, x.sum() reads at "
                     f"{x.numel() * x.element_size() / t_sum / 1e9:.1f} GB/s, a copy moves {2 * x.numel() * x.element_size() / t_copy / 1e9:.1f} GB/s")
    del y
    if device.type == "cuda":
        y = torch.empty_like(x)
        t_copy, _ = timed(lambda: y.copy_(x), device, repeats)
        copy_bw = 2 * x.numel() * x.element_size() / t_copy
        ours_bw = (x.numel() + 2 * n_clusters * x.shape[1]) * x.element_size() / t_ours
        row["bandwidth_fraction"] = ours_bw / copy_bw
        row["notes"] += f"; {ours_bw / 1e9:.0f} GB/s = {100 * ours_bw / copy_bw:.0f}% of copy bandwidth {copy_bw / 1e9:.0f} GB/s"
        row["met"] = row["met"] and ours_bw >= 0.7 * copy_bw
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clients", type=int, default=1000, help="N for distances, silhouette, reduction")
    parser.add_argument("--linkage-clients", type=int, default=4000, help="N for linkage")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024, help="d")
    parser.add_argument("--rank", type=int, default=4, help="r")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the script")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/ops[_cuda].json; with --only, none unless given)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None, help="run only these ops")
    parser.add_argument("--runs", type=int, default=1, help="repeat each op's whole measurement this many times "
                        "(a table row per run: the spread on a noisy machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.linkage_clients, args.layers, args.hidden, args.repeats = 60, 200, 4, 64, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if not fedtreelora.native_available():
        print("warning: the native core is not loaded; timing the reference fallback", file=sys.stderr)

    b_width, ab_width = paper_shapes(args.layers, args.hidden, args.rank)
    rows = []
    steps = {
        "layer_distances": lambda: bench_layer_distances(args.clients, args.layers, b_width, device, args.repeats),
        "linkage": lambda: bench_linkage(args.linkage_clients, args.repeats),
        "silhouette": lambda: bench_silhouette(args.clients, args.layers, 3, device, args.repeats),
        "tree_reduce": lambda: bench_tree_reduce(args.clients, args.layers, ab_width, 16, device, args.repeats),
    }
    assert tuple(steps) == STEPS
    for name in STEPS:
        if args.only and name not in args.only:
            continue
        for run in range(args.runs):
            print(f"... {name}" + (f" (run {run + 1} of {args.runs})" if args.runs > 1 else ""), file=sys.stderr, flush=True)
            rows.append(steps[name]())

    header = f"| op | size | ours (s) | plain stack | plain (s) | ours faster by | target | met |\n|---|---|---|---|---|---|---|---|"
    lines = [header] + [
        f"| {r['op']} | {r['size']} | {r['ours_s']:.4f} | {r['peer']} | {r['peer_s']:.4f} | {r['speedup']:.1f}x | {r['target']} | {'yes' if r['met'] else 'NO'} |"
        for r in rows
    ]
    print("\n".join(lines))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"  machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average {'/'.join(f'{v:.2f}' for v in load) if load else 'n/a'} (1/5/15 min) at the end of the run")
    for r in rows:
        print(f"  {r['op']}: {r['notes']}")
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "native": fedtreelora.native_available(), "quick": args.quick,
        "config": {"clients": args.clients, "linkage_clients": args.linkage_clients, "layers": args.layers,
                   "hidden": args.hidden, "rank": args.rank, "only": args.only, "runs": args.runs},
        "rows": rows, "table": "\n".join(lines), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if args.only and args.out is None:
        return 0  # a partial run does not replace the full results
    out = args.out or RESULTS / ("ops.json" if device.type == "cpu" else "ops_cuda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
