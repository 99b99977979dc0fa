"""The Markdown text of a sweep report: setup, the results table, the paper's claims, plots, probes."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from progtuning.methods.registry import method_rank

if TYPE_CHECKING:
    from progtuning.runs.report import Run


def render_markdown(
    runs: list[Run], rows: list[dict], split: str, images: dict, md_dir: Path, probes: list[dict] | None = None,
    study: list[str] | None = None,
) -> str:
    """The report's Markdown body (no title): setup, the study's sections (``study``: each arm against its
    baseline, the goal check), the table, the claims, the plots, the probes."""
    probe_lines = []
    for i, probe in enumerate(probes or []):
        probe_images = images.get("probes") or []
        probe_lines += _probe_section(probe, probe_images[i] if i < len(probe_images) else None, md_dir)
    if not runs:
        return "\n".join(probe_lines).rstrip() + "\n"
    lines = [
        f"{len(runs)} runs (results.json files). Score: each task's main metric on the **{split}** split, "
        "median [min–max] over seeds. Δ = median(Progtuning) − median(baseline). "
        "“≥ base” = seeds (paired) where Progtuning scored at least the baseline. Updated parameters are "
        "parameter-epochs (Σ over epochs of parameters trainable in that epoch); reduction = 1 − Progtuning/baseline. "
        "Train-time ratio = median over seeds of the paired ratios of training time (`train_time_s`: the Trainer's "
        "loop, per-epoch validation included), with Progtuning / without. Peak memory = median peak RSS of the run's process.",
        "",
    ]
    lines += _setup_section(runs)
    lines += study or []
    lines += ["### Results", ""]
    lines += [
        "| model | task | method | mode | metric | baseline | Progtuning | Δ | ≥ base | updated params (base → prog) "
        "| reduction (all / blocks) | train-time ratio | peak MiB (base / prog) | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join([
                row["model"], row["task"], row["method"], _mode_cell(row), row["metric"],
                _score_cell(row["base_median"], row["base_min"], row["base_max"]),
                _score_cell(row["prog_median"], row["prog_min"], row["prog_max"]),
                _signed(row["diff"]),
                f"{row['prog_wins']}/{row['pairs']}" if row["pairs"] else "—",
                f"{_params(row['base_updated_params'])} → {_params(row['prog_updated_params'])}",
                f"{_pct(row['reduction'])} / {_pct(row['reduction_blocks_only'])}",
                _num(row["time_ratio"], 2),
                f"{_num(row['base_peak_rss_mb'], 0)} / {_num(row['prog_peak_rss_mb'], 0)}",
                f"{row['n_base']}+{row['n_prog']}",
            ]) + " |"
        )
    mixed = [r for r in rows if r["mixed_settings"]]
    if mixed:
        lines += ["", "**Warning**: these groups mix runs with different settings: " + "; ".join(
            f"{r['model']}/{r['task']}/{r['method']} ({r['mixed_settings']})" for r in mixed)]
    lines += [""] + _claims_section(rows)
    if images:
        lines += ["### Plots", ""]
        if images.get("scatter"):
            lines += ["Score vs updated parameters, one point per run:", "",
                      f"![score vs updated parameters]({_rel(images['scatter'], md_dir)})", ""]
        if images.get("bars"):
            lines += ["Baseline vs Progtuning per task and method (median, whiskers min–max):", "",
                      f"![baseline vs Progtuning]({_rel(images['bars'], md_dir)})", ""]
        timelines = images.get("timelines") or []
        if timelines:
            lines += ["Stage timelines (trainable parameters and training loss over optimizer steps, every run "
                      "of a task × method; dashed = baseline):", ""]
            lines += [f"- [{Path(p).stem}]({_rel(p, md_dir)})" for p in timelines]
            lines += ["", f"![{Path(timelines[0]).stem}]({_rel(timelines[0], md_dir)})", ""]
    return "\n".join(lines + probe_lines).rstrip() + "\n"


def _probe_section(probe: dict, image: Path | None, md_dir: Path) -> list[str]:
    """A ``progtuning probe`` summary (probe.json) as a table."""
    budget = probe.get("budget", {})
    seeds = sorted({s for r in probe["blocks"] for s in r["seeds"]})
    metric = probe.get("metric") or "score"
    lines = [
        f"### Per-block probe: {probe['task']} · {probe['model']} · {probe['method']}",
        "",
        f"Embeddings ({probe.get('embeddings', 'always')}) + one block + head trained, every other block frozen, "
        f"each block in turn; {budget.get('max_train_examples') or 'all'} training examples, {_g(budget.get('epochs'))} epochs, "
        f"batch {budget.get('batch_size')}, learning rate {_g(budget.get('learning_rate'))}, max length {budget.get('max_length')}, "
        f"evaluation sets capped at {budget.get('max_eval_examples')}. Score: {metric} on **validation**, median "
        f"[min–max] over seeds {', '.join(map(str, seeds))}; test median beside it. From `{probe.get('path', 'probe.json')}`.",
        "",
        "| trained block | validation | test | seeds |",
        "|---|---|---|---|",
    ]
    entries = [(f"block {r['block']}", r) for r in probe["blocks"]]
    if probe.get("full"):
        entries.append(("all blocks (no Progtuning)", probe["full"]))
    for label, entry in entries:
        lines.append(
            f"| {label} | {_score_cell(entry['validation_median'], entry['validation_min'], entry['validation_max'])} "
            f"| {_num(entry.get('test_median'), 4)} | {len(entry['seeds'])} |"
        )
    lines.append("")
    notes = []
    if probe.get("best_block") is not None:
        notes.append(f"Best single block (validation median): {probe['best_block']}.")
    if probe.get("spearman_block_vs_score") is not None:
        notes.append(
            f"Spearman correlation of block index with the validation median: {probe['spearman_block_vs_score']:+.2f} "
            "(+1 = every higher block scored higher, the paper's Figure 1 pattern)."
        )
    if probe.get("failed"):
        notes.append(f"Failed runs (not in the table): {', '.join(probe['failed'])}.")
    if notes:
        lines += [" ".join(notes), ""]
    if image:
        lines += [f"![per-block probe {probe['task']} {probe['model']}]({_rel(image, md_dir)})", ""]
    return lines


def _setup_section(runs: list[Run]) -> list[str]:
    """What the runs were, read back from their configs (so the text can never disagree with them)."""
    def values(get, subset=None) -> str:
        found = sorted({json.dumps(get(r), sort_keys=True) for r in (subset or runs)})
        return ", ".join(v.strip('"') for v in found)

    config = lambda key: (lambda r: r.results.get("config", {}).get(key))  # noqa: E731
    lines = ["### Setup (read from the runs' configs)", ""]
    lines.append(
        f"- models: {values(lambda r: r.model)}; seeds: {values(lambda r: r.seed)}; epochs (T): {values(config('epochs'))}; "
        f"batch size: {values(config('batch_size'))}; stages: {values(config('stages'))} (null = epochs); "
        f"embeddings: {values(config('embeddings'))}; warm-up ratio: {values(config('warmup_ratio'))}; "
        f"weight decay: {values(config('weight_decay'))}"
    )
    methods = sorted({r.method for r in runs}, key=method_rank)
    lr = "; ".join(f"{m} {values(config('learning_rate'), [r for r in runs if r.method == m])}" for m in methods)
    lines.append(f"- learning rate per method: {lr}")
    method_keys = {"lora": ("lora_r", "lora_alpha", "lora_dropout"), "adapter": ("adapter_type", "adapter_reduction_factor")}
    for m, keys in method_keys.items():
        subset = [r for r in runs if r.method == m]
        if subset:
            lines.append(f"- {m}: " + ", ".join(f"{k} {values(config(k), subset)}" for k in keys))
    lines += ["", "| task | model | train / validation / test examples | max length | metric |", "|---|---|---|---|---|"]
    for (task, model) in sorted({(r.task, r.model) for r in runs}):
        subset = [r for r in runs if r.task == task and r.model == model]
        sizes = values(lambda r: "/".join(str(r.results.get("task", {}).get("sizes", {}).get(s, "-"))
                                          for s in ("train", "validation", "test")), subset)
        lines.append(f"| {task} | {model} | {sizes} | {values(config('max_length'), subset)} | {subset[0].metric} |")
    return lines + [""]


def _claims_section(rows: list[dict]) -> list[str]:
    """The paper's three claims beside what these runs measured, losses included."""
    # Progtuning arms only: a cheap baseline variant (base-<variant>) is no claim of the paper's
    everything = [r for r in rows if r["diff"] is not None and not r["mode"].startswith("base")]
    # The claims are about the paper's schedule ("prog"); variants are listed with the losses below.
    pairs = [r for r in everything if r["mode"] == "prog"]
    lines = ["### The paper's claims beside these runs", ""]
    if not pairs:
        return lines + ["No group has both baseline and (plain) Progtuning runs yet.", ""]
    lines.append("Plain Progtuning (the paper's schedule, mode `prog`) against its own baseline; "
                 "schedule variants only in the list of losses.")
    lines.append("")
    lines.append("| claim (paper) | measured here |")
    lines.append("|---|---|")
    reductions = [r["reduction"] for r in pairs if r["reduction"] is not None]
    blocks = [r["reduction_blocks_only"] for r in pairs if r["reduction_blocks_only"] is not None]
    per_method = []
    for method in sorted({r["method"] for r in pairs}, key=method_rank):
        red = [r["reduction"] for r in pairs if r["method"] == method and r["reduction"] is not None]
        if red:
            per_method.append(f"{method} {_pct(statistics.median(red))}")
    if reductions:
        lines.append(
            f"| ≈25% fewer updated parameters (BERT-base, T=3) | reduction over all trainable parameters: median "
            f"{_pct(statistics.median(reductions))} (range {_pct(min(reductions))}–{_pct(max(reductions))}; "
            f"{'; '.join(per_method)}); blocks only: median {_pct(statistics.median(blocks)) if blocks else '—'} |"
        )
    wins = [r for r in pairs if r["diff"] >= 0]
    lines.append(
        f"| accuracy equal to or above full fine-tuning | Progtuning's median ≥ its own baseline's median in "
        f"{len(wins)} of {len(pairs)} model × task × method groups; median Δ {_signed(statistics.median(r['diff'] for r in pairs))} |"
    )
    full_base = {(r["model"], r["task"]): r["base_median"] for r in rows if r["method"] == "full" and r["base_median"] is not None}
    vs_full = [(r, r["prog_median"] - full_base[(r["model"], r["task"])]) for r in pairs if (r["model"], r["task"]) in full_base]
    if vs_full:
        at_least = sum(d >= 0 for _, d in vs_full)
        lines.append(
            f"| (same, against full fine-tuning) | Progtuning (any method) median ≥ the full fine-tuning baseline's "
            f"median in {at_least} of {len(vs_full)} groups |"
        )
    for method in ("lora", "adapter", "bitfit"):
        subset = [r for r in pairs if r["method"] == method]
        if subset:
            lines.append(
                f"| works with {method} | {sum(r['diff'] >= 0 for r in subset)} of {len(subset)} model × task groups at or above the "
                f"{method} baseline; Δ median {_signed(statistics.median(r['diff'] for r in subset))}, "
                f"worst {_signed(min(r['diff'] for r in subset))} |"
            )
    losses = sorted((r for r in everything if r["diff"] < 0), key=lambda r: r["diff"])
    lines.append("")
    if losses:
        lines.append("Where Progtuning lost (median below its baseline), worst first: " + "; ".join(
            f"{r['model']}/{r['task']}/{r['method']}{'/' + r['mode'] if r['mode'] != 'prog' else ''} "
            f"{_signed(r['diff'])} ({r['prog_wins']}/{r['pairs']} seeds ≥ base)" for r in losses) + ".")
    else:
        lines.append("Progtuning's median was at or above its baseline's in every group.")
    return lines + [""]


def _mode_cell(row: dict) -> str:
    """The arm, and its baseline where that is not the plain one."""
    if not row["mode"]:
        return "—"
    baseline = row.get("baseline") or "base"
    return row["mode"] if baseline == "base" else f"{row['mode']} (vs {baseline})"


def _g(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _score_cell(median, low, high) -> str:
    if median is None:
        return "—"
    return f"{median:.4f} [{low:.4f}–{high:.4f}]"


def _signed(value) -> str:
    return "—" if value is None else f"{value:+.4f}"


def _pct(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def _num(value, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _params(value) -> str:
    if value is None:
        return "—"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
