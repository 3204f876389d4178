"""Outputs of a simulate run: metrics.json, table.md, accuracy per round (PNG), tree.json + dendrogram."""
from __future__ import annotations

import json
import os
from pathlib import Path


def format_table(summary: dict) -> str:
    """Markdown table: method, mean and std of per-client accuracy, rounds, wall time."""
    lines = ["| method | mean acc (%) | std (%) | rounds | wall (s) |", "|---|---:|---:|---:|---:|"]
    for name, r in summary["methods"].items():
        lines.append(f"| {name} | {100 * r['mean_accuracy']:.1f} | {100 * r['std_accuracy']:.1f} | "
                     f"{r['rounds']} | {r['wall_s']:.1f} |")
    lines.append(f"\nshared warm-up: {summary['warmup_wall_s']:.1f} s (not included in the per-method wall times)")
    return "\n".join(lines)


def plot_accuracy(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in summary["methods"].items():
        rounds = [h["round"] for h in r["history"]]
        ax.plot(rounds, [100 * h["mean_accuracy"] for h in r["history"]], marker="o", label=name)
    warm = summary["config"]["warmup_rounds"]
    if warm:
        ax.axvline(warm + 0.5, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("round")
    ax.set_ylabel("mean per-client accuracy (%)")
    ax.set_title("personalised accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(run_dir: Path, summary: dict, results: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_text(run_dir / "metrics.json", json.dumps(summary, indent=1))
    _atomic_text(run_dir / "table.md", format_table(summary) + "\n")
    plot_accuracy(summary, run_dir / "accuracy.png")
    tree_method = results.get("fedtreelora", {}).get("_method")
    if tree_method is not None:
        _atomic_text(run_dir / "tree.json", json.dumps(tree_method.tree.to_dict(), indent=1))
        tree_method.tree.plot(str(run_dir / "tree.png"))
