"""The PNG plots of a sweep report (matplotlib, Agg): score vs parameters, bars, stage timelines, probes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from progtuning.methods.registry import method_rank

if TYPE_CHECKING:
    from progtuning.runs.report import Run


_COLORS = {"full": "tab:blue", "lora": "tab:orange", "adapter": "tab:green", "bitfit": "tab:red", "peft": "tab:purple"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(count: int):
    plt = _pyplot()
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.axis("off")
    return plt, fig, flat[:count]


def _count(number: float, noun: str) -> str:
    """``1 epoch``, ``2 epochs``, ``0.5 epochs``, ``1,000 training examples``."""
    text = f"{number:,}" if isinstance(number, int) else f"{number:g}"
    return f"{text} {noun}" if number == 1 else f"{text} {noun}s"


def _compact(value: float, _position=None) -> str:
    """Axis labels people read at a glance: 950, 12.5k, 3.4M, 1.1B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _compact_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(_compact)


def _parameter_axis(ax, values: list) -> None:
    """Parameter counts on x: a log scale when they span a factor of ten or more, else a linear one with a
    few compactly labelled ticks (log ticks inside one decade crowd together); padded so no point sits on an edge."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    values = [v for v in values if v]
    if not values:
        return
    low, high = min(values), max(values)
    if low > 0 and high / low >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(low / 1.6, high * 1.6)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        pad = (high - low) * 0.12 or high * 0.05 or 1
        ax.set_xlim(low - pad, high + pad)
    ax.xaxis.set_major_formatter(_compact_formatter())


def _bars_from_zero(ax, values: list) -> None:
    """A bar's length is its value: the axis starts at 0 (or below, for negative scores), with room for labels."""
    from matplotlib.container import BarContainer

    heights = [bar.get_height() for c in ax.containers if isinstance(c, BarContainer) for bar in c]
    values = [v for v in [*values, *heights] if v is not None and v == v]
    low = min([0.0, *values])
    high = max([0.0, *values])
    span = (high - low) or 1.0
    ax.set_ylim(low - (0.08 * span if low < 0 else 0), high + 0.12 * span)


def plot_metric_vs_params(runs: list[Run], path: Path, split: str = "test") -> Path:
    """One panel per (model, task): score vs updated parameters, one point per run."""
    keys = sorted({(r.model, r.task) for r in runs})
    plt, fig, axes = _panels(len(keys))
    markers = {"base": "o", "prog": "^"}
    for ax, (model, task) in zip(axes, keys):
        subset = [r for r in runs if (r.model, r.task) == (model, task) and r.score(split) is not None]
        for run in subset:
            marker = markers.get(run.mode, "s")
            ax.scatter(
                run.results.get("updated_params") or float("nan"), run.score(split), marker=marker,
                color=_COLORS.get(run.method, "gray"), alpha=0.75, s=36,
                facecolors="none" if run.mode == "base" else None,
            )
        _parameter_axis(ax, [r.results.get("updated_params") for r in subset])
        ax.set_title(f"{task} · {model}", fontsize=10)
        ax.set_xlabel("updated parameters (parameter-epochs)")
        ax.set_ylabel(f"{subset[0].metric if subset else 'score'} ({split})")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=m)
               for m, c in _COLORS.items() if any(r.method == m for r in runs)]
    handles += [plt.Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="", label="baseline"),
                plt.Line2D([], [], color="black", marker="^", linestyle="", label="Progtuning")]
    if any(r.mode not in markers for r in runs):
        handles.append(plt.Line2D([], [], color="black", marker="s", linestyle="", label="Progtuning variant"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(rows: list[dict], path: Path) -> Path:
    """One panel per (model, task): per method, the baseline bar beside each Progtuning mode's."""
    keys = sorted({(r["model"], r["task"]) for r in rows})
    plt, fig, axes = _panels(len(keys))
    for ax, (model, task) in zip(axes, keys):
        subset = [r for r in rows if (r["model"], r["task"]) == (model, task)]
        methods = sorted({r["method"] for r in subset}, key=method_rank)
        modes = sorted({r["mode"] for r in subset if r["mode"]})
        series = [("baseline", None)] + [(m, m) for m in modes]
        width = 0.8 / len(series)
        lows = []
        for i, (label, mode) in enumerate(series):
            heights, errors = [], [[], []]
            for method in methods:
                row = next((r for r in subset if r["method"] == method and (mode is None or r["mode"] == mode)), None)
                prefix = "base" if mode is None else "prog"
                med = row[f"{prefix}_median"] if row else None
                heights.append(med if med is not None else float("nan"))
                errors[0].append(med - row[f"{prefix}_min"] if med is not None else 0)
                errors[1].append(row[f"{prefix}_max"] - med if med is not None else 0)
                if med is not None:
                    lows += [row[f"{prefix}_min"], row[f"{prefix}_max"]]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(methods))]
            bars = ax.bar(xs, heights, width, yerr=errors, capsize=3, label=label,
                          color="lightgray" if mode is None else None, edgecolor="black", linewidth=0.5)
            # the value inside its bar: above it, the whisker would run through the text
            ax.bar_label(bars, labels=[f"{h:.3f}" if h == h else "" for h in heights], fontsize=8, label_type="center")
        ax.set_xticks(range(len(methods)), methods)
        _bars_from_zero(ax, lows)
        metric = subset[0]["metric"] if subset else "score"
        ax.set_title(f"{task} · {model}", fontsize=10)
        ax.set_ylabel(f"{metric} ({subset[0]['split'] if subset else ''}), median and range")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(series), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_timeline(results: dict) -> tuple[list[int], list[int]]:
    """Step and trainable-parameter points of a run's stages, as a step line.

    A contribution run draws its *realised* stages (its decision log survives a resume); the rest
    draw the stage records the callback wrote.
    """
    stages = results.get("stages", [])
    realised = (results.get("contribution") or {}).get("realised_stages")
    if realised:
        trainable = {s["index"]: s["trainable_params"] for s in results.get("accounting", {}).get("stages", [])}
        stages = [{**s, "trainable_params": trainable.get(s["stage"], 0)} for s in realised]
    xs, ys = [], []
    for stage in stages:
        end = stage.get("end_step")
        if end is None:
            end = results.get("steps", stage["start_step"])
        xs += [stage["start_step"], end]
        ys += [stage["trainable_params"], stage["trainable_params"]]
    return xs, ys


def plot_timelines(runs: list[Run], out_dir: Path) -> list[Path]:
    """One PNG per (model, task, method): trainable parameters and training loss over steps, every run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = []
    for model, task, method in sorted({(r.model, r.task, r.method) for r in runs}, key=lambda key: (key[0], key[1], method_rank(key[2]))):
        subset = sorted((r for r in runs if (r.model, r.task, r.method) == (model, task, method)),
                        key=lambda r: (r.mode, r.seed))
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 5.5), sharex=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        modes = sorted({r.mode for r in subset if r.mode != "base"})
        seeds = sorted({r.seed for r in subset})
        for run in subset:
            # colour = seed, line style = mode (dashed baseline), so a run's twin is easy to find
            color = colors[seeds.index(run.seed) % len(colors)]
            style = "--" if run.mode == "base" else ["-", ":", "-."][modes.index(run.mode) % 3]
            label = f"{run.mode} seed {run.seed}"
            xs, ys = stage_timeline(run.results)
            if xs:
                top.plot(xs, ys, style, color=color, label=label)
            for decision in (run.results.get("contribution") or {}).get("decisions", []):
                if decision.get("froze_blocks"):  # where the contribution schedule froze blocks, and which
                    top.axvline(decision["step"], color=color, alpha=0.25, linewidth=0.8)
                    blocks = decision["froze_blocks"]
                    top.annotate(f"-{blocks[0]}" if len(blocks) == 1 else f"-{blocks[0]}..{blocks[-1]}",
                                 (decision["step"], top.get_ylim()[1]), fontsize=6, color=color,
                                 rotation=90, va="top", ha="right")
            losses = [(e["step"], e["loss"]) for e in run.results.get("log_history", []) if "loss" in e and "step" in e]
            if losses:
                bottom.plot(*zip(*losses), style, color=color, marker=".", markersize=3, label=label)
        top.set_ylabel("trainable parameters")
        top.yaxis.set_major_formatter(_compact_formatter())
        top.set_ylim(bottom=0)
        top.set_title(f"{task} · {model} · {method}", fontsize=10)
        top.grid(alpha=0.3)
        top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        bottom.set_ylabel("training loss")
        bottom.set_xlabel("optimizer step")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{model}_{task}_{method}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_probe(summary: dict, path: str | Path) -> Path:
    """Bars: median validation score per block (whiskers min–max, dots per seed); line: all blocks."""
    plt = _pyplot()
    path = Path(path)
    rows = summary["blocks"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [r["block"] for r in rows]
    med = [r["validation_median"] if r["validation_median"] is not None else float("nan") for r in rows]
    low = [m - r["validation_min"] if r["validation_min"] is not None else 0 for m, r in zip(med, rows)]
    high = [r["validation_max"] - m if r["validation_max"] is not None else 0 for m, r in zip(med, rows)]
    bars = ax.bar(xs, med, 0.6, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.7,
                  label="embeddings + this block + head")
    for r in rows:
        ax.scatter([r["block"]] * len(r["validation"]), r["validation"], color="black", s=10, zorder=3)
    values = [v for r in rows for v in r["validation"]]
    full = summary.get("full")
    if full and full["validation_median"] is not None:
        ax.axhline(full["validation_median"], color="tab:red", linestyle="--", label="all blocks (full fine-tuning)")
        values += full["validation"]
    _bars_from_zero(ax, values)
    ax.bar_label(bars, labels=[f"{m:.3f}" if m == m else "" for m in med], fontsize=7, label_type="center")
    ax.set_xticks(xs)
    ax.set_xlabel("trained block (0 = bottom)")
    ax.set_ylabel(f"{summary['metric'] or 'score'} (validation)")
    budget = summary["budget"]
    limit = budget["max_train_examples"]
    examples = _count(limit, "training example") if limit else "all training examples"
    ax.set_title(
        f"{summary['task']} · {summary['model']} · {summary['method']}: "
        f"{examples}, {_count(budget['epochs'], 'epoch')}",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
