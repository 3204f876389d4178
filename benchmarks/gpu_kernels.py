"""The CUDA kernels themselves: device time per kernel (CUPTI, through torch.profiler), each op's result
against the CPU op on the same inputs, and tree_reduce's bandwidth against a device-to-device copy.

A wall-clock timing of an op includes the wrapper's checks and the host-side grouping with its one
stream sync, which dominate a sub-millisecond kernel; the profiler's kernel records do not. Exits 1 on
a mismatch with the CPU op or when an op's kernels are missing from the trace; a bandwidth below the
target is reported (MISSED) without failing. Run by benchmarks/gpu_check.sh:

    python benchmarks/gpu_kernels.py [--out kernels.json] [--repeats 5]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fedtreelora
from fedtreelora import ops

BANDWIDTH_TARGET = 0.7  # tree_reduce kernel's bytes per second, as a fraction of a device-to-device copy's
EXPECTED = {  # substrings of the kernel names each op must launch
    "layer_distances": ["distance_epilogue_kernel"],
    "silhouette": ["silhouette_rows_kernel", "silhouette_mean_kernel"],
    "tree_reduce": ["tree_reduce_kernel"],
}


def device_times(fn, repeats: int) -> dict[str, tuple[float, int]]:
    """{name: (total device seconds, launches) / repeats} of everything fn() runs on the GPU."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            total[e.name] += e.time_range.elapsed_us() * 1e-6
            count[e.name] += 1
    return {k: (total[k] / repeats, count[k] // repeats) for k in total}


def wall_time(fn, repeats: int) -> float:
    """Median of CUDA-event times around fn(): the op as a caller sees it (host work included)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return sorted(times)[len(times) // 2]


def close(got, want, rtol, atol) -> str | None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        try:
            torch.testing.assert_close(g.cpu(), w, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as exc:
            return str(exc).splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:3])
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=16384, help="columns per layer for tree_reduce (A and B)")
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-kernels: FAILED: no CUDA device")
        return 1
    assert fedtreelora.native_available(), "the native core did not load"
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    n, n_layers, width, c = args.clients, args.layers, args.width, args.clusters
    failures, rows = [], []

    def report(op, fn, ref_fn, rtol, atol, extra=None):
        times = device_times(fn, args.repeats)
        ours = {k: v for k, v in times.items() if any(s in k for s in EXPECTED[op])}
        missing = [s for s in EXPECTED[op] if not any(s in k for k in times)]
        if missing:
            failures.append(f"{op}: no {', '.join(missing)} in the profiler's kernel records")
        kernel_s = sum(t for t, _ in ours.values())
        device_s = sum(t for t, _ in times.values())
        wall_s = wall_time(fn, args.repeats)
        mismatch = close(fn(), ref_fn(), rtol, atol)
        if mismatch:
            failures.append(f"{op}: CUDA result differs from the CPU op's: {mismatch}")
        row = {"op": op, "kernel_s": kernel_s, "device_s": device_s, "wall_s": wall_s,
               "kernels": {k: {"s": t, "launches": k_n} for k, (t, k_n) in ours.items()},
               "matches_cpu": mismatch is None, **(extra or {})}
        rows.append(row)
        print(f"gpu-kernels: {op}: kernels {1e3 * kernel_s:.3f} ms, all device work {1e3 * device_s:.3f} ms, "
              f"wall {1e3 * wall_s:.3f} ms; matches CPU: {'yes' if mismatch is None else 'NO'}")
        for k, (t, k_n) in sorted(ours.items()):
            print(f"gpu-kernels:     {1e3 * t:9.3f} ms  x{k_n}  {k[:150]}")
        return row

    # layer_distances: B columns only (half of tree_reduce's width).
    xb = torch.randn(min(n, 1000), n_layers * width // 2, generator=gen)
    offb = torch.arange(n_layers + 1, dtype=torch.int64) * (width // 2)
    xb_dev, offb_dev = xb.to(cuda), offb.to(cuda)
    report("layer_distances", lambda: ops.layer_distances(xb_dev, offb_dev), lambda: ops.layer_distances(xb, offb),
           rtol=1e-4, atol=1e-4 * float(ops.layer_distances(xb[:64], offb)[0].max()))

    # silhouette: the per-layer distances of those clients, three nested-ish cuts per layer.
    d_dev, _ = ops.layer_distances(xb_dev, offb_dev)
    d = d_dev.cpu()
    labels = torch.stack([torch.stack([torch.randint(0, k, (d.shape[1],), generator=gen) for k in (2, 5, 9)])
                          for _ in range(n_layers)])
    labels_dev = labels.to(cuda)
    read_s = device_times(lambda: d_dev.sum(), args.repeats)
    row = report("silhouette", lambda: ops.silhouette(d_dev, labels_dev), lambda: ops.silhouette(d, labels),
                 rtol=1e-5, atol=1e-5)
    row["d_sum_s"] = sum(t for t, _ in read_s.values())
    print(f"gpu-kernels:     one read of d (d.sum()): {1e3 * row['d_sum_s']:.3f} ms")

    # tree_reduce at the benchmark's size, and a device-to-device copy of x for the bandwidth.
    x = torch.randn(n, n_layers * width, generator=gen)
    offsets = torch.arange(n_layers + 1, dtype=torch.int64) * width
    counts = torch.linspace(1, c, n_layers).round().long()
    lab = torch.stack([torch.arange(n) % int(k) for k in counts])
    lab[-1, 0] = c - 1  # n_clusters = c
    weights = torch.randint(50, 500, (n,), generator=gen).double()
    x_dev, off_dev, lab_dev, w_dev = x.to(cuda), offsets.to(cuda), lab.to(cuda), weights.to(cuda)
    moved = (x.numel() + 2 * c * x.shape[1]) * x.element_size()
    y = torch.empty_like(x_dev)
    copy_s = sum(t for t, _ in device_times(lambda: y.copy_(x_dev), args.repeats).values())
    copy_bw = 2 * x.numel() * x.element_size() / copy_s
    del y
    row = report("tree_reduce", lambda: ops.tree_reduce(x_dev, off_dev, lab_dev, w_dev, c),
                 lambda: ops.tree_reduce(x, offsets, lab, weights, c), rtol=1e-5, atol=1e-5)
    bw = moved / row["kernel_s"]
    row.update(bytes_moved=moved, kernel_bandwidth=bw, copy_bandwidth=copy_bw, bandwidth_fraction=bw / copy_bw,
               bandwidth_met=bw >= BANDWIDTH_TARGET * copy_bw)
    verdict = "met" if row["bandwidth_met"] else "MISSED"
    print(f"gpu-kernels: tree_reduce kernel moves {moved / 2**30:.2f} GiB at {bw / 1e9:.0f} GB/s = "
          f"{100 * bw / copy_bw:.0f}% of a device-to-device copy ({copy_bw / 1e9:.0f} GB/s); "
          f"target {100 * BANDWIDTH_TARGET:.0f}%: {verdict}")

    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows,
                                        "failures": failures}, indent=2))
    for f in failures:
        print(f"gpu-kernels: FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
