"""Aggregate PEFT adapter folders of clients into personalised cluster and external experts.

    fedtreelora aggregate runs/client-*/ --out experts/ --weights 120 80 200 95

Each CLIENT_DIR is `save_pretrained` output of a LoRA PeftModel (adapter_config.json +
adapter_model.safetensors). For every client, OUT/<name>/ holds its cluster expert as a PEFT adapter
(`PeftModel.from_pretrained(base, OUT/<name>)`) and, unless its cluster is everyone at every layer,
OUT/<name>/external/ the external expert (`model.load_adapter(OUT/<name>/external, "external")`).
OUT/tree.json is the tree (reuse it next round with --tree), OUT/tree.png its dendrogram.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def add_arguments(parser) -> None:
    from ..core import TreeConfig
    from ..core.ops import LINKAGE_METHODS, METRICS
    from ..core.tree import HEAD_POLICIES

    tree = TreeConfig()  # the one home of the tree defaults
    parser.add_argument("client_dirs", nargs="+", metavar="CLIENT_DIR", help="PEFT adapter folders, one per client")
    parser.add_argument("--out", required=True, help="output folder (one subfolder per client, tree.json, tree.png)")
    parser.add_argument("--weights", nargs="+", type=float, help="aggregation weight per client (e.g. sample counts); default equal")
    parser.add_argument("--names", nargs="+", help="client names (output subfolders); default: the folders' names")
    parser.add_argument("--tree", help="a stored tree.json to reuse (the per-round path) instead of building one")
    parser.add_argument("--linkage", default=tree.linkage, choices=LINKAGE_METHODS, help=f"linkage method (default: {tree.linkage})")
    parser.add_argument("--metric", default=tree.metric, choices=METRICS, help=f"per-layer distance (default: {tree.metric})")
    parser.add_argument("--window", type=int, default=tree.window, help=f"K: at most K-1 more clusters per layer (default: {tree.window})")
    parser.add_argument("--tau", type=float, default=tree.tau, help=f"score of one cluster; a split needs a silhouette above it (default: {tree.tau})")
    parser.add_argument("--head", default=tree.head, choices=HEAD_POLICIES, help=f"non-layer tensors (classification head) (default: {tree.head})")
    parser.add_argument("--clip-norm", help="clip each client's layer slices to this L2 norm, or 'median'")
    parser.add_argument("--robust", default="mean", help="mean or trimmed_mean")
    parser.add_argument("--trim-ratio", type=float, default=0.1, help="share of weight trimmed at each end (trimmed_mean)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty output folder")


def _fail(message: str) -> int:
    print(f"fedtreelora aggregate: error: {message}", file=sys.stderr)
    return 2


def _client_names(args) -> list[str]:
    names = args.names or [Path(d).resolve().name for d in args.client_dirs]
    if len(names) != len(args.client_dirs):
        raise ValueError(f"--names has {len(names)} names for {len(args.client_dirs)} client folders")
    for name in names:  # each name becomes a folder directly inside --out, never anywhere else
        if not name or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name) or os.sep in name \
                or Path(name).is_absolute() or name in ("tree.json", "tree.png"):
            raise ValueError(f"client name {name!r} cannot be used as a folder inside the output folder")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"client names must be unique, got {duplicates} more than once (use --names)")
    return names


def _read_client(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{folder}: no {CONFIG_NAME} (expected PeftModel.save_pretrained output)")
    if not (folder / WEIGHTS_NAME).is_file():
        if (folder / "adapter_model.bin").exists():
            raise ValueError(f"{folder}: adapter_model.bin is a pickle and is not loaded; re-save with safe_serialization=True")
        raise ValueError(f"{folder}: no {WEIGHTS_NAME}")
    with open(folder / CONFIG_NAME) as f:
        config = json.load(f)
    return config, load_file(folder / WEIGHTS_NAME)


def _write_adapter(folder: Path, config: dict, state: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # results are views that clients share; safetensors wants one contiguous tensor per key
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, folder / WEIGHTS_NAME,
              metadata={"format": "pt"})
    with open(folder / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def run(args) -> int:
    from ..core import AggregationTree, TreeConfig, aggregate

    out = Path(args.out)
    try:
        names = _client_names(args)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to write into it")
        clients = [_read_client(Path(d)) for d in args.client_dirs]
        for (config, _), name in zip(clients, names):
            if config.get("peft_type", "LORA") != "LORA":
                raise ValueError(f"client {name!r}: peft_type {config.get('peft_type')!r}, only LoRA adapters are aggregated")
        if args.weights is not None and len(args.weights) != len(names):
            raise ValueError(f"--weights has {len(args.weights)} values for {len(names)} clients")
        clip = args.clip_norm
        if clip is not None and clip != "median":
            clip = float(clip)
        config = TreeConfig(linkage=args.linkage, metric=args.metric, window=args.window, tau=args.tau, head=args.head)
        tree = AggregationTree.from_json(Path(args.tree)) if args.tree else None
        result = aggregate({name: state for name, (_, state) in zip(names, clients)}, weights=args.weights, tree=tree,
                           config=config, clip_norm=clip, robust=args.robust, trim_ratio=args.trim_ratio)
    except (ValueError, TypeError, OSError) as e:
        return _fail(str(e))

    out.mkdir(parents=True, exist_ok=True)
    for name, (adapter_config, _) in zip(names, clients):
        target = out / name
        if target.exists():  # only with --overwrite: replace this client's previous output
            shutil.rmtree(target)
        _write_adapter(target, adapter_config, result.cluster_states[name])
        if result.external_states[name] is not None:
            _write_adapter(target / "external", adapter_config, result.external_states[name])
    result.tree.to_json(out / "tree.json")
    result.tree.plot(out / "tree.png")
    print(result.tree)
    print(f"wrote {len(names)} client adapters, tree.json and tree.png to {out}")
    return 0
