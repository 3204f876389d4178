"""Tables and figures of a run: the results table, the main metric per round, the client tree's dendrogram.

The main metric is the task's (`summary["metric"]`): accuracy for classification, ROUGE-1 F1 for
causal_lm; both are stored as fractions and shown in percent.

Figures are drawn on matplotlib `Figure` objects with an Agg canvas of their own: no pyplot state,
no display needed, and the caller's matplotlib backend is never changed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .core.files import atomic_write_text

__all__ = ["format_table", "plot_accuracy", "plot_tree", "cut_heights", "write_outputs", "plot_seed_means",
           "plot_per_client_against"]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


METRIC_LABELS = {"accuracy": "acc", "rouge1": "ROUGE-1"}


def summary_metric(summary: dict) -> str:
    """The run's main metric ("accuracy" for runs recorded before tasks had their own)."""
    return summary.get("metric", "accuracy")


def format_table(summary: dict) -> str:
    """Markdown table: method, mean and std of the per-client main metric (%), rounds, wall time.

    With client groups named (`summary["group_names"]`, e.g. the ACLSum tasks), one more column per
    group holds the mean over that group's clients.
    """
    metric = summary_metric(summary)
    label = METRIC_LABELS.get(metric, metric)
    names = summary.get("group_names") or []
    groups = np.asarray(summary.get("groups", []))
    per_group = len(names) > 1 and len(groups) > 0
    extra = "".join(f" {n} (%) |" for n in names) if per_group else ""
    lines = [f"| method | mean {label} (%) | std (%) |{extra} rounds | wall (s) |",
             "|---|---:|---:|" + ("---:|" * len(names) if per_group else "") + "---:|---:|"]
    for name, r in summary["methods"].items():
        cells = ""
        if per_group:
            values = np.array([np.nan if v is None else v for v in r[metric]], dtype=np.float64)
            cells = "".join(f" {100 * np.nanmean(values[groups == g]):.1f} |" if np.any(groups == g) else " - |"
                            for g in range(len(names)))
        lines.append(f"| {name} | {100 * r[f'mean_{metric}']:.1f} | {100 * r[f'std_{metric}']:.1f} |{cells} "
                     f"{r['rounds']} | {r['wall_s']:.1f} |")
    lines.append(f"\nshared warm-up: {summary['warmup_wall_s']:.1f} s (not included in the per-method wall times)")
    return "\n".join(lines)


def plot_accuracy(summary: dict, path) -> None:
    """Mean per-client main metric (accuracy or ROUGE-1) per round of every method (Figure API: the
    caller's backend is left alone)."""
    metric = summary_metric(summary)
    label = {"accuracy": "accuracy", "rouge1": "ROUGE-1 F1"}.get(metric, metric)
    fig = _figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, r in summary["methods"].items():
        rounds = [h["round"] for h in r["history"]]
        ax.plot(rounds, [100 * h[f"mean_{metric}"] for h in r["history"]], marker="o", label=name)
    warm = summary["config"]["warmup_rounds"]
    if warm:
        ax.axvline(warm + 0.5, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("round")
    ax.set_ylabel(f"mean per-client {label} (%)")
    ax.set_title(f"personalised {label} per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_seed_means(by_method: dict, path, title: str = "") -> None:
    """Mean client accuracy per method, mean over seeds with the std over seeds as error bars.

    by_method: {method: [{"seed", "mean_accuracy", ...} per seed]} (bench_federated's records)."""
    names = list(by_method)
    metric = next((r.get("metric", "accuracy") for runs in by_method.values() for r in runs), "accuracy")
    acc = [100 * np.array([r[f"mean_{metric}"] for r in by_method[m]]) for m in names]
    fig = _figure(figsize=(max(5.0, 0.8 * len(names) + 2), 4.0))
    ax = fig.add_subplot()
    colours = ["#d95f02" if m == "fedtreelora" else "#7570b3" if m.startswith("oracle-") else "#1b9e77" for m in names]
    ax.bar(range(len(names)), [a.mean() for a in acc], yerr=[a.std() for a in acc], color=colours, capsize=4)
    for i, a in enumerate(acc):   # every seed as a dot: the spread is visible, not only summarised
        ax.plot([i] * len(a), a, "k.", markersize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    lo = min(float(a.min()) for a in acc)
    ax.set_ylim(max(0.0, lo - 10), 100)
    ax.set_ylabel(f"mean client {METRIC_LABELS.get(metric, metric)} (%)")
    ax.set_title(f"{title}: mean over {max(len(a) for a in acc)} seeds, bars = std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)


def plot_per_client_against(by_method: dict, reference: str, path, title: str = "") -> None:
    """Each client's accuracy (every seed) under each method against its accuracy under `reference`:
    points above the diagonal gain from the method, points below lose."""
    metric = next((r.get("metric", "accuracy") for runs in by_method.values() for r in runs), "accuracy")
    ref = {r["seed"]: r[metric] for r in by_method[reference]}
    others = [m for m in by_method if m != reference and all(metric in r for r in by_method[m])]
    fig = _figure(figsize=(4.8, 4.6))
    ax = fig.add_subplot()
    markers = "osD^v<>pPX*"
    for i, m in enumerate(others):
        xs, ys = [], []
        for r in by_method[m]:
            for a, b in zip(ref.get(r["seed"], []), r[metric]):
                if a is not None and b is not None:
                    xs.append(100 * a), ys.append(100 * b)
        ax.scatter(xs, ys, s=14, marker=markers[i % len(markers)], alpha=0.7, label=m,
                   zorder=3 if m == "fedtreelora" else 2)
    ax.plot([0, 100], [0, 100], color="0.5", linewidth=1, linestyle="--")
    label = METRIC_LABELS.get(metric, metric)
    ax.set_xlabel(f"client {label} under {reference} (%)")
    ax.set_ylabel(f"client {label} under the method (%)")
    ax.set_title(f"{title}: who gains, who loses", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def write_outputs(run_dir, summary: dict, tree=None) -> None:
    """metrics.json, table.md and <metric>.png (accuracy.png, rouge1.png) of a run; tree.json and tree.png when a tree is given."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=1))
    atomic_write_text(run_dir / "table.md", format_table(summary) + "\n")
    plot_accuracy(summary, run_dir / f"{summary_metric(summary)}.png")
    if tree is not None:
        tree.to_json(run_dir / "tree.json")
        tree.plot(str(run_dir / "tree.png"))


# -- the client tree ---------------------------------------------------------------------------
def cut_heights(z: np.ndarray, counts) -> list[float]:
    """A height at which a horizontal line cuts the dendrogram of z into exactly c clusters, per c.

    Cutting into c clusters undoes the last c - 1 merges (cut_tree semantics), so the line lies
    between the height of merge N - c (the last one kept) and merge N - c + 1 (the first undone).
    """
    heights = np.asarray(z)[:, 2]
    n = len(heights) + 1
    top = float(heights.max()) if len(heights) else 1.0
    out = []
    for c in counts:
        below = float(heights[n - c - 1]) if n - c - 1 >= 0 else 0.0
        above = float(heights[n - c]) if n - c < len(heights) else top * 1.08 + 1e-12
        out.append(0.5 * (below + above))
    return out


def _layer_ranges(counts: list[int]) -> list[tuple[int, int, int]]:
    """(first layer, last layer, count) for each run of layers with the same count (1-based layers)."""
    runs = []
    for l, c in enumerate(counts, start=1):
        if runs and runs[-1][2] == c:
            runs[-1] = (runs[-1][0], l, c)
        else:
            runs.append((l, l, c))
    return runs


def plot_tree(tree, path, title: str | None = None):
    """Save the dendrogram of tree.linkage with one labelled line per distinct layer cut; returns the Figure.

    Clients placed by `extend_tree` are not in the linkage: they are listed under the dendrogram,
    marked *, each with the clustered clients of its deepest-layer cluster.
    """
    from scipy.cluster.hierarchy import dendrogram

    z = tree.linkage.detach().cpu().double().numpy()
    n = tree.n_linked
    all_names = list(tree.client_names) if tree.client_names else [str(k) for k in range(tree.n_clients)]
    names = all_names[:n]
    counts = [int(c) for c in tree.n_clusters.tolist()]
    fig = _figure(figsize=(max(6.0, 0.35 * n + 3.0), 4.2))
    ax = fig.add_subplot()
    if n < 2:
        ax.text(0.5, 0.5, f"one client ({names[0]}): nothing to cluster", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        heights = cut_heights(z, [c for _, _, c in _layer_ranges(counts)])
        deepest = cut_heights(z, [max(counts)])[0]
        dendrogram(z, ax=ax, labels=names, color_threshold=deepest if max(counts) > 1 else 0.0,
                   above_threshold_color="0.35", leaf_rotation=90 if n > 12 else 0)
        colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
        top = max(heights + [float(z[:, 2].max())]) * 1.15 + 1e-12
        right, last_y = True, None
        for i, ((first, last, c), y) in enumerate(zip(_layer_ranges(counts), heights)):
            layers = f"layer {first}" if first == last else f"layers {first}-{last}"
            colour = colours[i % len(colours)]
            ax.axhline(y, color=colour, linestyle="--", linewidth=1.2)
            if last_y is not None and abs(y - last_y) < 0.05 * top:   # close cuts: labels on alternate sides
                right = not right
            last_y = y
            ax.annotate(f"{layers}: {c} cluster{'s' if c != 1 else ''}", xy=(1.0 if right else 0.0, y),
                        xycoords=("axes fraction", "data"), xytext=(-4 if right else 4, 3), textcoords="offset points",
                        ha="right" if right else "left", va="bottom", color=colour, fontsize=9,
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
        ax.set_ylim(0, top)
        ax.set_ylabel(f"{tree.config.metric} distance (mean over layers)")
        ax.set_xlabel("client")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    placed = list(getattr(tree, "placed", []) or [])
    if placed:
        deepest_labels = tree.labels[-1].tolist()
        notes = []
        for k in placed[:12]:
            mates = [names[i] for i in range(n) if deepest_labels[i] == deepest_labels[k]]
            notes.append(f"{all_names[k]}* -> {{{', '.join(mates[:4])}{', ...' if len(mates) > 4 else ''}}}")
        more = f" (+{len(placed) - 12} more)" if len(placed) > 12 else ""
        fig.supxlabel(f"placed by extend_tree (not in the dendrogram){more}: " + "; ".join(notes), fontsize=7,
                      color="#7570b3", wrap=True)
    ax.set_title(title or f"FedTreeLoRA client tree ({tree.config.linkage} linkage, {len(counts)} layers, "
                          f"window {tree.config.window}, tau {tree.config.tau})", fontsize=10)
    fig.savefig(path, dpi=150)
    return fig
