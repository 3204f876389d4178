"""Run the federated experiment in-process: a shared warm-up, then every method, on one data split.

With no arguments: the hierarchical setting (configs/hierarchical.yaml): all-MiniLM-L6-v2 (offline
package) on BBC News (offline package, 16 tokens per document), 16 data-starved clients in 4 planted
groups nested in 2 super-groups, LoRA r=4 on query/value plus the head, 2 warm-up + 2 federated
rounds of 8 steps at batch 16; methods fedtreelora, local and fedit (about 2 minutes on 2 cores). Prints a table and
writes the run folder: metrics.json, table.md, accuracy.png, tree.json, tree.png, config.json, checkpoints/.
"""
from __future__ import annotations

import argparse
import json
import sys


def _settings_help() -> str:
    from ..federation.config import ExperimentConfig
    rows = [f"  {name:<20} {json.dumps(default):<24} {text}" for name, default, text in ExperimentConfig.fields_help()]
    from ..federation.methods import DEFAULT_METHODS, METHODS
    methods = [f"  {name:<20} {cls.description}{'' if name in DEFAULT_METHODS else ' (not in the default list)'}"
               for name, cls in METHODS.items()]
    return ("settings (keys of --config FILE, YAML or JSON, or --set KEY=VALUE; default shown):\n" + "\n".join(rows)
            + "\n\nmethods:\n" + "\n".join(methods))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _settings_help()
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with any of the settings below")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one setting (VALUE parsed as YAML: 3, 0.5, [query,value]); repeatable")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="methods to run (default: fedtreelora local fedit; every method is listed below)")
    parser.add_argument("--run-dir", default="runs/simulate", help="run folder (default: runs/simulate)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="start over when --run-dir already holds a run (it is never replaced otherwise)")
    parser.add_argument("--seed", type=int, help="shortcut for --set seed=N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_config(args):
    import yaml
    from ..federation.config import ExperimentConfig
    values = ExperimentConfig.read_file(args.config) if args.config else {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(value)
    if args.seed is not None:
        values["seed"] = args.seed
    return ExperimentConfig.from_dict(values)


def run(args) -> int:
    from ..federation.schedule import CheckpointError, RunFolderError, run_experiment
    from ..report import format_table
    try:
        config = build_config(args)
    except (ValueError, OSError) as exc:
        print(f"fedtreelora simulate: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_experiment(config, args.methods, args.run_dir, resume=args.resume, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    except (RunFolderError, CheckpointError) as exc:
        print(f"fedtreelora simulate: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"run folder: {args.run_dir}")
    return 0
