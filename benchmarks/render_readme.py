"""Write the benchmark tables of README.md from benchmarks/results/*.json (between BENCHMARKS markers).

    python benchmarks/render_readme.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- BENCHMARKS -->", "<!-- /BENCHMARKS -->"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def section() -> str:
    parts = ["## Benchmarks", "",
             "Measured by the scripts in `benchmarks/` (ours and the plain stack a user would write, same process, "
             "same inputs; results in `benchmarks/results/`). Targets from the design; a NO is a target not met.", ""]
    ops = _load("ops.json")
    if ops:
        parts += [f"`python benchmarks/bench_ops.py` ({ops['device']}, {ops['cpu_count']} cores, {ops['threads']} threads, "
                  f"torch {ops['torch']}):", "", ops["table"], ""]
        parts += [f"- {r['op']}: {r['notes']}" for r in ops["rows"]] + [""]
    agg = _load("aggregate.json")
    if agg:
        parts += [f"`python benchmarks/bench_aggregate.py` ({agg['threads']} threads):", "", agg["table"], ""]
        parts += [f"- {r['step']}: {r['notes']}" for r in agg["rows"]] + [""]
    cuda = _load("ops_cuda.json")
    parts += (["`python benchmarks/bench_ops.py --device cuda` on " + cuda["device"] + ":", "", cuda["table"], ""] if cuda else
              ["GPU figures (tree_reduce against the copy bandwidth): not measured yet; `benchmarks/gpu_check.sh` "
               "produces them on a GPU machine.", ""])
    scale = _load("scale.json")
    if scale and not scale.get("quick"):
        parts += scale_table(scale)
    fed = RESULTS / "federated.md"
    if fed.is_file():
        parts += ["`python benchmarks/bench_federated.py`:", "", fed.read_text().strip(), ""]
    return "\n".join(parts)


def scale_table(scale: dict) -> list[str]:
    """bench_scale.py's rows: time and peak memory of build_tree, extend_tree and aggregate per N."""
    sh = scale["shape"]
    yes = {True: "yes", False: "NO", None: "-"}
    lines = [f"`python benchmarks/bench_scale.py` (L={sh['layers']}, q and v, d={sh['d']}, r={sh['r']}, "
             f"{scale['dtype']}, {scale['threads']} threads, {scale['cpu_count']} cores):", "",
             "| N | inputs (GB) | build_tree (s) | GEMM floor (s) | build / GEMMs (<= 1.3) | build peak over inputs "
             "(GB, <= 3) | same tree in memory | extend_tree 100 new (s, < 10) | aggregate (s) | aggregate peak "
             "over inputs (GB) | load before -> after |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in scale["rows"]:
        m = r["met"]
        lines.append(f"| {r['n']:,} | {r['inputs_gb']:.2f} | {r['build_s']:.1f} | {r['gemm_s']:.1f} | "
                     f"{r['build_over_gemm']:.2f} ({yes[m['build_le_1.3x_gemm']]}) | "
                     f"{r['build_peak_over_inputs_gb']:.2f} ({yes[m['build_peak_le_inputs_plus_3gb']]}) | "
                     f"{yes[r['same_as_in_memory']]} | {r['extend_s']:.2f}{'*' if r.get('extend_remeasured') else ''} ({yes[m['extend_lt_10s']]}) | "
                     f"{r['aggregate_s']:.1f} | {r['aggregate_peak_over_inputs_gb']:.2f} | "
                     f"{r['load_before']} -> {r['load_after']} |")
    again = [f"- \\* extend_tree measured again after a change, alone ({r['extend_remeasured']}), into the tree of "
             "the same planted clients built at d=8, r=1" for r in scale["rows"] if r.get("extend_remeasured")][:1]
    return lines + ["", f"- {scale['notes']}", *again, "", "![time against N](benchmarks/results/scale.png)", ""]


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        print(f"README.md has no {BEGIN} marker", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else rest
    readme.write_text(f"{head}{BEGIN}\n{section()}\n{END}{tail}")
    print("README.md benchmark section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
