"""Federated benchmark: every method on the settings of configs/ (`SETTINGS`: the default `hierarchical`
and its variants, one-domain, planted groups, Dirichlet-only), seeds 0, 1, 2 unless --seeds says otherwise.

    python benchmarks/bench_federated.py [--settings hierarchical] [--seeds 0 1 2] [--methods ...] [--out benchmarks/results]
and the causal-LM setting `nlg-aclsum` (configs/nlg-aclsum.yaml: SmolLM2 on ACLSum, ROUGE-1;
fedtreelora, fedalt, fedit and local unless --methods says otherwise):

    python benchmarks/bench_federated.py --settings nlg-aclsum --seeds 0 --threads 2

Writes benchmarks/results/federated.json (per setting, method and seed: mean/std and per-client
accuracy, wall time, cuts) and federated.md (mean over seeds +- std over seeds of the mean client
accuracy, and per seed the paired difference fedtreelora minus each method), two figures per
setting (federated-<setting>-methods.png: mean accuracy per method with error bars over seeds;
federated-<setting>-clients.png: each client's accuracy against local training's), and prints the
table. A run replaces only the settings, methods and seeds it ran (read-merge-write under a file
lock), so two settings, or two seeds of one setting, can run as two processes side by side (`--settings planted-groups --threads 1` and
`--settings dirichlet-only --threads 1` on 2 cores). Long: about (#methods x 1 min + warm-up) per
setting and seed on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedtreelora.federation.config import ExperimentConfig
from fedtreelora.federation.schedule import run_experiment
from fedtreelora.federation.methods import METHODS, make_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETTINGS = {name: CONFIGS / f"{name}.yaml" for name in ("hierarchical", "hierarchical-disjoint", "hierarchical-overlap",
                                                        "hierarchical-starved", "hierarchical-starved-local-head",
                                                        "hierarchical-wide", "hierarchical-pairs", "one-domain",
                                                        "planted-groups", "dirichlet-only", "nlg-aclsum")}
SETTING_METHODS = {"nlg-aclsum": ["fedtreelora", "fedalt", "fedit", "local"]}


def setting_config(name: str) -> ExperimentConfig:
    return ExperimentConfig.from_file(SETTINGS[name])


def markdown(results: dict) -> str:
    lines = []
    for setting in [s for s in SETTINGS if s in results]:
        by_method = results[setting]
        metric = next((r.get("metric", "accuracy") for runs in by_method.values() for r in runs), "accuracy")
        label = {"accuracy": "accuracy", "rouge1": "ROUGE-1"}.get(metric, metric)
        lines += [f"\n**{setting}** (`configs/{setting}.yaml`; mean client {label}, mean ± std over seeds)\n",
                  f"| method | {label} (%) | seeds | deepest cut vs planted groups (ARI) | wall per run (s) |",
                  "|---|---:|---:|---:|---:|"]
        for name, runs in by_method.items():
            acc = np.array([r[f"mean_{r.get('metric', 'accuracy')}"] for r in runs]) * 100
            wall = np.mean([r["wall_s"] for r in runs])
            aris = [r.get("deepest_ari") for r in runs]
            ari = "-" if any(a is None for a in aris) else " / ".join(f"{a:.2f}" for a in aris)
            lines.append(f"| {name} | {acc.mean():.1f} ± {acc.std():.1f} | {len(runs)} | {ari} | {wall:.0f} |")
        lines += paired(by_method)
    return "\n".join(lines).strip() + "\n"


def paired(by_method: dict) -> list[str]:
    """Per seed, fedtreelora's mean client accuracy minus each method's (points), and their mean."""
    if "fedtreelora" not in by_method:
        return []
    key = lambda r: r[f"mean_{r.get('metric', 'accuracy')}"]   # noqa: E731
    ours = {r["seed"]: key(r) for r in by_method["fedtreelora"]}
    seeds = sorted(ours)
    lines = ["", "fedtreelora minus each method, per seed (points of the mean client metric):", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
    for name, runs in by_method.items():
        if name == "fedtreelora":
            continue
        theirs = {r["seed"]: key(r) for r in runs}
        diffs = {s: 100 * (ours[s] - theirs[s]) for s in seeds if s in theirs}
        if diffs:   # a seed one of the two did not run shows as "-"
            lines.append(f"| {name} | " + " | ".join(f"{diffs[s]:+.1f}" if s in diffs else "-" for s in seeds)
                         + f" | {np.mean(list(diffs.values())):+.1f} |")
    return lines


def deepest_ari(method_state: dict, groups: list[int]) -> float | None:
    """Adjusted Rand index of the method's deepest-layer partition against the planted groups."""
    from sklearn.metrics import adjusted_rand_score
    labels = method_state.get("labels")
    if not labels or len(set(groups)) < 2:
        return None
    return float(adjusted_rand_score(groups, labels[-1]))


MIXING_KEYS = {"mixing_lr", "mixing_init"}   # read only by methods that learn lam
CUT_KEYS = {"tau", "window"}                  # read only by methods that search the layer-wise cuts


def reads(method: str, key: str) -> bool:
    """Whether `method`'s results can depend on the setting `key` (a method that no longer exists: yes)."""
    if key not in MIXING_KEYS | CUT_KEYS or method not in METHODS:
        return True
    m = make_method(method)
    return m.learns_lam if key in MIXING_KEYS else m.searches_cuts


def still_valid(method: str, old_config: dict | None, config: dict) -> bool:
    """Whether `method`'s stored results were measured under `config`: the same settings, or settings
    that differ only in what the method never reads (how lam is learnt, for a method without a
    learnt lam: local, FedIT, flat, the oracle, lam held fixed; tau and window, for a method without
    the layer-wise cut search: all but FedTreeLoRA, its lam ablations and per-layer clustering)."""
    if old_config is None:
        return False
    old_config = ExperimentConfig.complete(old_config)   # settings added since it ran: at their earlier behaviour
    changed = {k for k in set(old_config) | set(config) if old_config.get(k) != config.get(k)}
    return not any(reads(method, k) for k in changed)


def in_method_order(by_method: dict) -> dict:
    """The methods in `METHODS` order (tables and figures keep one order whichever run measured a row)."""
    return {m: by_method[m] for m in sorted(by_method, key=lambda m: list(METHODS).index(m) if m in METHODS else len(METHODS))}


def by_seed(kept: list[dict], new: list[dict]) -> list[dict]:
    """A method's runs: the new ones, and the kept ones of the seeds this run did not measure, by seed."""
    seeds = {r["seed"] for r in new}
    return sorted([r for r in kept if r["seed"] not in seeds] + list(new), key=lambda r: r["seed"])


def save(json_path: Path, results: dict, configs: dict) -> dict:
    """Merge this run's settings, methods and seeds into federated.json: the seeds it ran replace
    theirs; other settings are kept, and so are other methods and seeds of a setting whose results
    `still_valid` holds (so two processes may run two seeds of one setting side by side). `configs`:
    per setting, the config (without seed and threads) the run used."""
    from filelock import FileLock
    with FileLock(str(json_path) + ".lock"):
        old = json.loads(json_path.read_text()) if json_path.is_file() else {}
        kept = {s: {m: v for m, v in old.get("results", {}).get(s, {}).items()
                    if still_valid(m, old.get("settings", {}).get(s), configs[s])} for s in results}
        merged = {"settings": {**old.get("settings", {}), **configs},
                  "results": {**old.get("results", {}),
                              **{s: in_method_order({**kept[s], **{m: by_seed(kept[s].get(m, []), runs)
                                                                   for m, runs in results[s].items()}})
                                 for s in results}}}   # each run's own wall times are in its record
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        tmp.replace(json_path)
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="methods to run (default: all; nlg-aclsum: fedtreelora fedalt fedit local)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--run-root", default="runs/bench_federated")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of this process (0 = torch's default)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "federated.json"
    results = {}
    configs = {s: setting_config(s) for s in args.settings}   # read once: what this run measures
    for setting in args.settings:
        methods = args.methods or SETTING_METHODS.get(setting, list(METHODS))
        results[setting] = {m: [] for m in methods}
        for seed in args.seeds:
            cfg = configs[setting].replace(seed=seed, **({"num_threads": args.threads} if args.threads else {}))
            summary = run_experiment(cfg, methods, Path(args.run_root) / f"{setting}-seed{seed}", resume=True)
            metric = cfg.metric_name
            for name, r in summary["methods"].items():
                results[setting][name].append({"seed": seed, "metric": metric, f"mean_{metric}": r[f"mean_{metric}"],
                                               f"std_{metric}": r[f"std_{metric}"], "wall_s": r["wall_s"],
                                               metric: r[metric],
                                               "warmup_wall_s": summary["warmup_wall_s"],
                                               "n_clusters": r["method_state"].get("n_clusters"),
                                               "deepest_ari": deepest_ari(r["method_state"], summary["groups"])})
            # written after every seed so a long run leaves what it measured
            merged = save(json_path, {setting: results[setting]}, {setting: configs[setting].to_dict()})
    table = markdown(merged["results"])
    (out / "federated.md").write_text(table)
    from fedtreelora.report import plot_per_client_against, plot_seed_means
    for setting in args.settings:
        plot_seed_means(merged["results"][setting], out / f"federated-{setting}-methods.png", title=setting)
        if "local" in merged["results"][setting]:
            plot_per_client_against(merged["results"][setting], "local", out / f"federated-{setting}-clients.png",
                                    title=setting)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
