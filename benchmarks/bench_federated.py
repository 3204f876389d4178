"""Federated benchmark: every method on the planted-groups and the Dirichlet-only settings, 3 seeds.

    python benchmarks/bench_federated.py [--seeds 0 1 2] [--methods ...] [--config FILE] [--out benchmarks/results]

Writes benchmarks/results/federated.json (per setting, method and seed: mean/std client accuracy,
wall time) and federated.md (mean over seeds +- std over seeds of the mean client accuracy), and
prints the table. Long: about (#methods x 1.5 min + warm-up) per setting and seed on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedtreelora.config import ExperimentConfig
from fedtreelora.federation import run_experiment
from fedtreelora.methods import METHODS

SETTINGS = {
    "planted-groups": {"num_groups": 2},
    "dirichlet-only": {"num_groups": 1},
}


def markdown(results: dict) -> str:
    lines = []
    for setting, by_method in results.items():
        lines += [f"\n**{setting}** (mean client accuracy, mean ± std over seeds)\n",
                  "| method | accuracy (%) | seeds | wall per run (s) |", "|---|---:|---:|---:|"]
        for name, runs in by_method.items():
            acc = np.array([r["mean_accuracy"] for r in runs]) * 100
            wall = np.mean([r["wall_s"] for r in runs])
            lines.append(f"| {name} | {acc.mean():.1f} ± {acc.std():.1f} | {len(runs)} | {wall:.0f} |")
    return "\n".join(lines).strip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--config", help="YAML/JSON base settings (as for `fedtreelora simulate`)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--run-root", default="runs/bench_federated")
    args = parser.parse_args(argv)
    base = ExperimentConfig.from_file(args.config) if args.config else ExperimentConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "federated.json"
    results = {}
    started = time.perf_counter()
    for setting in args.settings:
        results[setting] = {m: [] for m in args.methods}
        for seed in args.seeds:
            cfg = base.replace(seed=seed, **SETTINGS[setting])
            summary = run_experiment(cfg, args.methods, Path(args.run_root) / f"{setting}-seed{seed}", resume=True)
            for name, r in summary["methods"].items():
                results[setting][name].append({"seed": seed, "mean_accuracy": r["mean_accuracy"],
                                               "std_accuracy": r["std_accuracy"], "wall_s": r["wall_s"],
                                               "warmup_wall_s": summary["warmup_wall_s"],
                                               "n_clusters": r["method_state"].get("n_clusters")})
            # written after every seed so a long run leaves what it measured
            json_path.write_text(json.dumps({"config": base.to_dict(), "settings": SETTINGS, "results": results,
                                             "total_wall_s": time.perf_counter() - started}, indent=1))
    table = markdown(results)
    (out / "federated.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
