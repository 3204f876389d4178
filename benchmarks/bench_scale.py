"""build_tree, extend_tree and aggregate at N = 1k .. 10k clients of the paper's NLU shape, on CPU.

Shape: L = 24 layers, q and v adapted, d = 1024, r = 4 (196,608 B values per client), bf16. Every
measurement runs in a fresh subprocess that first builds its inputs (planted nested groups, bf16,
generated in place into one [N, L, 2, d, r] B tensor; the A factors are views of a pool of 8
clients' A factors, which build_tree never reads) and then exposes them through the public API as
realistic state dicts (96 tensors per client: 24 layers x {query, value} x {lora_A, lora_B}). Peak
memory is VmHWM after resetting it (/proc/self/clear_refs) once the inputs exist, minus VmRSS then:
what the call adds over its inputs.

Per N: build_tree streaming (the path N >= ~2k takes), build_tree in memory where it fits (N <= 5k:
its [L, N, N] distances are 4 L N^2 bytes) with the same Z / labels / cuts required, the GEMM floor
(torch.mm of the layer's float32 rows [N, 2 d r] by their transpose, as layer_distances computes its
Gram matrix, timed on --gemm-layers layers and scaled to L), extend_tree of --new clients into the N
tree, and aggregate() with the stored tree.

    python benchmarks/bench_scale.py                       # N = 1k, 2k, 5k, 10k (about an hour on 2 cores)
    python benchmarks/bench_scale.py --sizes 1000 2000     # some sizes
    python benchmarks/bench_scale.py --quick               # a smoke run at tiny N (seconds)
    python benchmarks/bench_scale.py --extend-only --sizes 10000   # extend_tree alone (a cheap tree)

Writes benchmarks/results/scale.json and scale.png (log-log time against N).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "base_model.model.bert.encoder.layer.{l}.attention.self.{m}.lora_{ab}.weight"


# -- inputs ------------------------------------------------------------------------------------
def planted_groups(n_layers: int) -> list[int]:
    """Group count per layer: 1, 2, 4, 8 over the four quarters of the depth (nested)."""
    return [2 ** min(3, (4 * l) // n_layers) for l in range(n_layers)]


def group_of(k: int, layer_groups: int, deepest: int = 8) -> int:
    return (k % deepest) // (deepest // layer_groups)


def make_states(n: int, n_layers: int, d: int, r: int, seed: int = 0, start: int = 0, noise: float = 0.01,
                separation: float = 2.0, dtype=torch.bfloat16):
    """(state dicts of clients start .. start + n - 1, planted truth [L, n], unique input bytes).

    The layer centres depend on (seed, layer) only, so clients generated in separate calls (old and
    late ones) share them; the noise depends on (seed, start)."""
    groups = planted_groups(n_layers)
    w = 2 * d * r
    big = torch.empty(n, n_layers, 2, d, r, dtype=dtype)
    gen = torch.Generator().manual_seed(10_000 * seed + start + 1)
    truth = torch.zeros(n_layers, n, dtype=torch.int64)
    chunk = 2048
    for l in range(n_layers):
        cg = torch.Generator().manual_seed(1_000 * seed + l)
        centres = torch.randn(groups[l], w, generator=cg)
        centres = centres / centres.norm(dim=1, keepdim=True) * separation if groups[l] > 1 else torch.zeros(1, w)
        grp = torch.tensor([group_of(start + k, groups[l]) for k in range(n)])
        truth[l] = grp
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            block = torch.randn(c1 - c0, w, generator=gen).mul_(noise).add_(centres[grp[c0:c1]])
            big[c0:c1, l] = block.view(c1 - c0, 2, d, r).to(dtype)
            del block
    pool = (torch.randn(8, n_layers, 2, r, d, generator=torch.Generator().manual_seed(seed + 7)) * 0.01).to(dtype)
    pool_views = [[p_l.unbind(0) for p_l in p.unbind(0)] for p in pool.unbind(0)]
    states = []
    for k, bk in enumerate(big.unbind(0)):
        a = pool_views[(start + k) % 8]
        s = {}
        for l, b_l in enumerate(bk.unbind(0)):
            bq, bv = b_l.unbind(0)
            s[KEY.format(l=l, m="query", ab="A")] = a[l][0]
            s[KEY.format(l=l, m="query", ab="B")] = bq
            s[KEY.format(l=l, m="value", ab="A")] = a[l][1]
            s[KEY.format(l=l, m="value", ab="B")] = bv
        states.append(s)
    unique_bytes = big.numel() * big.element_size() + pool.numel() * pool.element_size()
    return states, truth, unique_bytes


# -- measurement in a fresh process -------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def worker(spec: dict) -> dict:
    import fedtreelora as ftl
    from sklearn.metrics import adjusted_rand_score

    if not spec.get("in_process"):
        torch.set_num_threads(spec["threads"])
    ftl.ops.native_available()
    n, n_layers, d, r = spec["n"], spec["layers"], spec["d"], spec["r"]
    what = spec["what"]
    out = {"what": what, "n": n}
    if what == "gemm":
        w = 2 * d * r
        x = torch.randn(n, w)
        torch.mm(x[:64], x[:64].T)  # warm the BLAS
        k = min(spec["gemm_layers"], n_layers)
        t0 = time.perf_counter()
        for _ in range(k):
            g = torch.mm(x, x.T)
            del g
        out["measured_layers"] = k
        out["seconds"] = (time.perf_counter() - t0) * n_layers / k
        return out
    tree = None
    if spec.get("proxy_tree"):  # --extend-only: the tree of the same planted clients at d=8, r=1 (seconds)
        tree = ftl.build_tree(make_states(n, n_layers, 8, 1, seed=spec["seed"])[0])
    states, truth, unique_bytes = make_states(n, n_layers, d, r, seed=spec["seed"])
    if what == "extend":
        new, new_truth, new_bytes = make_states(spec["new"], n_layers, d, r, seed=spec["seed"], start=n)
        unique_bytes += new_bytes
    if tree is None and what in ("extend", "aggregate"):
        tree = ftl.AggregationTree.from_json(spec["tree"])
    out["inputs_gb"] = unique_bytes / 1e9
    rss0 = _status_kb("VmRSS")
    out["peak_is_hwm"] = _reset_peak()
    t0 = time.perf_counter()
    if what == "build":
        result = ftl.build_tree(states, streaming=spec["streaming"])
    elif what == "extend":
        result = ftl.extend_tree(tree, states, new)
    else:
        result = ftl.aggregate(states, tree=tree)
    out["seconds"] = time.perf_counter() - t0
    peak = _status_kb("VmHWM")  # since the reset (or since the start, where the reset is refused)
    out["rss_before_gb"] = rss0 * 1024 / 1e9
    out["peak_over_inputs_gb"] = (peak - rss0) * 1024 / 1e9
    if what == "build":
        out["n_clusters"] = result.n_clusters.tolist()
        out["z"] = _digest(result.linkage)
        out["labels"] = _digest(result.labels)
        out["min_ari_vs_planted"] = min(adjusted_rand_score(truth[l].numpy(), result.labels[l].numpy())
                                        for l in range(n_layers))
        if spec.get("save"):
            result.to_json(spec["save"], indent=None)
    elif what == "extend":
        ok = 0
        for l in range(n_layers):  # the label of the old clients of the same planted group
            for j in range(spec["new"]):
                mate = int((truth[l] == new_truth[l, j]).nonzero()[0])
                ok += int(result.labels[l, n + j] == tree.labels[l, mate])
        out["placed_correct"] = ok / (n_layers * spec["new"])
    else:
        out["n_experts"] = int(tree.n_clusters.max())
    return out


def measure(spec: dict, timeout: float | None = None) -> dict:
    if spec.get("in_process"):  # --quick: no fresh process (seconds, for the test suite); peaks are then rough
        return worker(spec)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['what']} N={spec['n']} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load " + " ".join(f.read().split()[:3])
    except OSError:
        return "load ?"


# -- the run -----------------------------------------------------------------------------------
def run(args) -> dict:
    shape = dict(layers=4, d=16, r=4) if args.quick else dict(layers=24, d=1024, r=4)
    sizes = args.sizes or ([48, 96] if args.quick else [1000, 2000, 5000, 10000])
    new = min(args.new, 8) if args.quick else args.new
    base = dict(shape, seed=0, threads=args.threads, gemm_layers=args.gemm_layers, new=new, in_process=bool(args.quick))
    rows = []
    if args.extend_only:
        for n in sizes:
            ex = measure(dict(base, what="extend", n=n, proxy_tree=True))
            print(f"N={n:>6}  extend_tree({new}) {ex['seconds']:.2f} s (+{ex['peak_over_inputs_gb']:.2f} GB)  placed ok "
                  f"{ex['placed_correct']:.3f}  [{_uptime()}]", flush=True)
            rows.append({"n": n, "extend_s": ex["seconds"], "extend_new": new, "placed_correct": ex["placed_correct"],
                         "extend_peak_over_inputs_gb": ex["peak_over_inputs_gb"], "load_after": _uptime()})
        return {"extend_only": True, "shape": shape, "threads": args.threads, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            row = {"n": n, "load_before": _uptime()}
            tree_path = str(Path(tmp) / f"tree-{n}.json")
            st = measure(dict(base, what="build", n=n, streaming=True, save=tree_path))
            row.update(build_s=st["seconds"], build_peak_over_inputs_gb=st["peak_over_inputs_gb"],
                       inputs_gb=st["inputs_gb"], rss_before_gb=st["rss_before_gb"], n_clusters=st["n_clusters"],
                       min_ari_vs_planted=st["min_ari_vs_planted"])
            gm = measure(dict(base, what="gemm", n=n))
            row.update(gemm_s=gm["seconds"], gemm_layers_measured=gm["measured_layers"],
                       build_over_gemm=st["seconds"] / gm["seconds"])
            fits = 4 * shape["layers"] * n * n + n * 2 * shape["d"] * shape["r"] * shape["layers"] * 2 <= args.in_memory_max_bytes
            if fits:
                im = measure(dict(base, what="build", n=n, streaming=False))
                row.update(in_memory_s=im["seconds"], in_memory_peak_over_inputs_gb=im["peak_over_inputs_gb"],
                           same_as_in_memory=(im["z"], im["labels"], im["n_clusters"]) == (st["z"], st["labels"], st["n_clusters"]))
            else:
                row.update(in_memory_s=None, in_memory_peak_over_inputs_gb=None, same_as_in_memory=None)
            ex = measure(dict(base, what="extend", n=n, tree=tree_path))
            row.update(extend_s=ex["seconds"], extend_new=new, extend_peak_over_inputs_gb=ex["peak_over_inputs_gb"],
                       placed_correct=ex["placed_correct"])
            ag = measure(dict(base, what="aggregate", n=n, tree=tree_path))
            row.update(aggregate_s=ag["seconds"], aggregate_peak_over_inputs_gb=ag["peak_over_inputs_gb"],
                       n_experts=ag["n_experts"])
            row["load_after"] = _uptime()
            row["met"] = {"build_peak_le_inputs_plus_3gb": row["build_peak_over_inputs_gb"] <= 3.0,
                          "build_le_1.3x_gemm": row["build_over_gemm"] <= 1.3,
                          "extend_lt_10s": row["extend_s"] < 10.0,
                          "same_as_in_memory": row["same_as_in_memory"]}
            rows.append(row)
            print(f"N={n:>6}  build {row['build_s']:8.1f} s (+{row['build_peak_over_inputs_gb']:.2f} GB over "
                  f"{row['rss_before_gb']:.2f} GB)  GEMMs {row['gemm_s']:8.1f} s  ratio {row['build_over_gemm']:.2f}  "
                  f"in-memory {row['in_memory_s'] if row['in_memory_s'] is None else round(row['in_memory_s'], 1)} s "
                  f"same={row['same_as_in_memory']}  extend({new}) {row['extend_s']:.2f} s placed ok "
                  f"{row['placed_correct']:.3f}  aggregate {row['aggregate_s']:.1f} s "
                  f"(+{row['aggregate_peak_over_inputs_gb']:.2f} GB)  cuts {row['n_clusters']}  "
                  f"[{row['load_before']} -> {row['load_after']}]", flush=True)
    return {"quick": bool(args.quick), "shape": shape, "dtype": "bfloat16", "threads": args.threads,
            "gemm_layers": args.gemm_layers, "cpu_count": os.cpu_count(), "rows": rows,
            "notes": ("peak_over_inputs_gb: VmHWM (reset after the inputs were built) minus VmRSS before the call; "
                      "gemm_s: float32 torch.mm [N, 2dr] @ [2dr, N], timed on gemm_layers layers, scaled to L; "
                      "the streaming build computes each layer's Gram once and reads pass 1's distances back "
                      "from an unlinked scratch file for the cut search")}


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = result["rows"]
    ns = [r["n"] for r in rows]
    series = [("build_tree (streaming)", "build_s", "o-"), ("build_tree (in memory)", "in_memory_s", "s--"),
              ("GEMM floor (torch.mm)", "gemm_s", "k:"), (f"extend_tree ({rows[0]['extend_new']} new)", "extend_s", "^-"),
              ("aggregate (stored tree)", "aggregate_s", "d-")]
    for label, key, style in series:
        pts = [(n, r[key]) for n, r in zip(ns, rows) if r.get(key)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients N")
    ax.set_ylabel("seconds")
    ax.set_title(f"fedtreelora at scale: L={result['shape']['layers']}, d={result['shape']['d']}, "
                 f"r={result['shape']['r']}, bf16, {result['threads']} threads", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", help="client counts (default 1000 2000 5000 10000)")
    p.add_argument("--quick", action="store_true", help="a smoke run at tiny N and a small shape")
    p.add_argument("--new", type=int, default=100, help="clients placed by extend_tree (default 100)")
    p.add_argument("--extend-only", action="store_true",
                   help="time extend_tree alone, into the tree of the same planted clients built at d=8, r=1 "
                        "(same groups, minutes less); updates those columns of --out's rows of the same N")
    p.add_argument("--gemm-layers", type=int, default=24, help="layers the GEMM floor is timed on (scaled to L)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--in-memory-max-bytes", type=float, default=6e9,
                   help="run the in-memory build for comparison where its distances + packed copy fit in this")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    result = run(args)
    if args.extend_only:  # update extend_tree's columns of the stored table's rows of the same N
        if args.out.is_file() and not args.quick:
            old = json.loads(args.out.read_text())
            by_n = {r["n"]: r for r in result["rows"]}
            if old.get("shape") == result["shape"] and any(r["n"] in by_n for r in old["rows"]):
                for row in old["rows"]:
                    if row["n"] in by_n:
                        ex = by_n[row["n"]]
                        row.update({k: ex[k] for k in ("extend_s", "extend_new", "placed_correct", "extend_peak_over_inputs_gb")},
                                   extend_remeasured=f"--extend-only, {result['threads']} threads, {ex['load_after']}")
                        row["met"]["extend_lt_10s"] = ex["extend_s"] < 10.0
                args.out.write_text(json.dumps(old, indent=1) + "\n")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and not args.quick and args.sizes:  # merge a partial run into the existing table
        old = json.loads(args.out.read_text())
        if not old.get("quick") and old.get("shape") == result["shape"]:
            keep = [r for r in old["rows"] if r["n"] not in {row["n"] for row in result["rows"]}]
            result["rows"] = sorted(keep + result["rows"], key=lambda r: r["n"])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot or args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
