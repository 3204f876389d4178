"""Federated benchmark: every method on the planted-groups and the Dirichlet-only settings, 3 seeds;
and the causal-LM setting `nlg-aclsum` (configs/nlg-aclsum.yaml: SmolLM2 on ACLSum, ROUGE-1;
fedtreelora, fedalt, fedit and local unless --methods says otherwise).

    python benchmarks/bench_federated.py [--seeds 0 1 2] [--methods ...] [--config FILE] [--out benchmarks/results]
    python benchmarks/bench_federated.py --settings nlg-aclsum --seeds 0 --threads 2

Writes benchmarks/results/federated.json (per setting, method and seed: mean/std client accuracy,
wall time) and federated.md (mean over seeds +- std over seeds of the mean client accuracy), and
prints the table. A run replaces only the settings it ran (read-merge-write under a file lock), so
the two settings can run as two processes side by side (`--settings planted-groups --threads 1` and
`--settings dirichlet-only --threads 1` on 2 cores). Long: about (#methods x 1 min + warm-up) per
setting and seed on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedtreelora.federation.config import ExperimentConfig
from fedtreelora.federation.schedule import run_experiment
from fedtreelora.federation.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "planted-groups": {"num_groups": 2, "classes_per_group": 3},
    "dirichlet-only": {"num_groups": 1, "classes_per_group": 0},
    "nlg-aclsum": {"config_file": "configs/nlg-aclsum.yaml"},   # the whole config (not overrides of --config)
}
SETTING_METHODS = {"nlg-aclsum": ["fedtreelora", "fedalt", "fedit", "local"]}


def setting_config(base: ExperimentConfig, setting: str, seed: int, threads: int = 0) -> ExperimentConfig:
    """The config of one setting and seed: `base` with the setting's overrides, or the setting's own config file."""
    values = dict(SETTINGS[setting])
    if "config_file" in values:
        cfg = ExperimentConfig.from_file(ROOT / values.pop("config_file"))
        return cfg.replace(seed=seed, **({"num_threads": threads} if threads else {}))
    return base.replace(seed=seed, **values)


def markdown(results: dict) -> str:
    lines = []
    for setting in [s for s in SETTINGS if s in results]:
        by_method = results[setting]
        metric = next((r.get("metric", "accuracy") for runs in by_method.values() for r in runs), "accuracy")
        label = {"accuracy": "accuracy", "rouge1": "ROUGE-1"}.get(metric, metric)
        lines += [f"\n**{setting}** ({json.dumps(SETTINGS[setting])}; mean client {label}, mean ± std over seeds)\n",
                  f"| method | {label} (%) | seeds | deepest cut vs planted groups (ARI) | wall per run (s) |",
                  "|---|---:|---:|---:|---:|"]
        for name, runs in by_method.items():
            acc = np.array([r[f"mean_{r.get('metric', 'accuracy')}"] for r in runs]) * 100
            wall = np.mean([r["wall_s"] for r in runs])
            aris = [r.get("deepest_ari") for r in runs]
            ari = "-" if any(a is None for a in aris) else " / ".join(f"{a:.2f}" for a in aris)
            lines.append(f"| {name} | {acc.mean():.1f} ± {acc.std():.1f} | {len(runs)} | {ari} | {wall:.0f} |")
    return "\n".join(lines).strip() + "\n"


def deepest_ari(method_state: dict, groups: list[int]) -> float | None:
    """Adjusted Rand index of the method's deepest-layer partition against the planted groups."""
    from sklearn.metrics import adjusted_rand_score
    labels = method_state.get("labels")
    if not labels or len(set(groups)) < 2:
        return None
    return float(adjusted_rand_score(groups, labels[-1]))


def save(json_path: Path, base: ExperimentConfig, results: dict, wall_s: float) -> dict:
    """Merge this run's settings into federated.json (other settings' results are kept)."""
    from filelock import FileLock
    with FileLock(str(json_path) + ".lock"):
        old = json.loads(json_path.read_text()) if json_path.is_file() else {}
        merged = {"config": base.to_dict(), "settings": SETTINGS,
                  "results": {**old.get("results", {}), **results},
                  "wall_s": {**old.get("wall_s", {}), **{s: wall_s for s in results}}}
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        tmp.replace(json_path)
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="methods to run (default: all; nlg-aclsum: fedtreelora fedalt fedit local)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--config", help="YAML/JSON base settings (as for `fedtreelora simulate`)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--run-root", default="runs/bench_federated")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of this process (0 = torch's default)")
    args = parser.parse_args(argv)
    base = ExperimentConfig.from_file(args.config) if args.config else ExperimentConfig()
    if args.threads:
        base = base.replace(num_threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "federated.json"
    results = {}
    started = time.perf_counter()
    for setting in args.settings:
        methods = args.methods or SETTING_METHODS.get(setting, list(METHODS))
        results[setting] = {m: [] for m in methods}
        for seed in args.seeds:
            cfg = setting_config(base, setting, seed, args.threads)
            summary = run_experiment(cfg, methods, Path(args.run_root) / f"{setting}-seed{seed}", resume=True)
            metric = cfg.metric_name
            for name, r in summary["methods"].items():
                results[setting][name].append({"seed": seed, "metric": metric, f"mean_{metric}": r[f"mean_{metric}"],
                                               f"std_{metric}": r[f"std_{metric}"], "wall_s": r["wall_s"],
                                               "warmup_wall_s": summary["warmup_wall_s"],
                                               "n_clusters": r["method_state"].get("n_clusters"),
                                               "deepest_ari": deepest_ari(r["method_state"], summary["groups"])})
            # written after every seed so a long run leaves what it measured
            merged = save(json_path, base, results, time.perf_counter() - started)
    table = markdown(merged["results"])
    (out / "federated.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
