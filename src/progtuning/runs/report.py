"""Results as tables and plots. Reads ``results.json`` files (or their dicts) only; never trains.

* :func:`print_run_summary` — the table ``progtuning train`` prints at the end of one run.
* :func:`build_report` — ``progtuning report DIR...``: many runs (a sweep) → Markdown and CSV tables,
  PNG plots (see the section "Sweep reports" below).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from progtuning.errors import ProgtuningError


def print_run_summary(results: dict) -> None:
    """The table ``progtuning train`` prints at the end of a run."""
    from rich.console import Console
    from rich.table import Table

    config = results["config"]
    mode = "Progtuning" if config["progtuning"] else "baseline (no Progtuning)"
    table = Table(title=f"{config['task']} · {config['model']} · {config['method']} · {mode}")
    table.add_column("")
    table.add_column("value", justify="right")
    for split, metrics in results["metrics"].items():
        for name, value in metrics.items():
            if name in ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch"):
                continue
            table.add_row(f"{split} {name}", f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("updated parameters", f"{results['updated_params']:,}")
    table.add_row("without Progtuning", f"{results['baseline_updated_params']:,}")
    table.add_row("reduction (all trainable)", f"{results['reduction']:.1%}")
    table.add_row("reduction (blocks only)", f"{results['reduction_blocks_only']:.1%}")
    from progtuning.runs.contribution import decision_lines

    for label, value in decision_lines(results):
        table.add_row(label, value)
    contribution = bool(results.get("contribution"))
    for stage in results["stages"]:
        name = f"{stage['stage']} lowest blocks frozen" if contribution else f"stage {stage['stage'] + 1}"
        table.add_row(
            f"{name} (steps {stage['start_step']}-{stage['end_step']})",
            f"{stage['trainable_params']:,} params · {stage['wall_time_s']:.1f} s",
        )
    table.add_row("wall time", f"{results['wall_time_s']:.1f} s (training {results['train_time_s']:.1f} s)")
    table.add_row("peak memory (RSS)", f"{results['peak_rss_mb']:,.0f} MiB")
    Console().print(table)


# ============================================================================================
# Sweep reports: tables (Markdown, CSV) and plots (PNG) from many results.json files.
# ============================================================================================
#
#     progtuning report runs/sweep-minilm [more dirs] --out docs/results [--markdown docs/results.md]
#
# Runs are grouped by (model, task, method); inside a group the baseline runs (no Progtuning) are
# compared with each Progtuning mode ("prog", or "prog-<variant>" from a sweep's variants). The
# score is the task's main metric on one split (default: test; no model selection ever looks at
# it). Per group and mode: median and min–max over seeds, the difference of the medians, in how
# many seeds (paired by seed) Progtuning scored at least the baseline, updated parameters (in
# parameter-epochs, see progtuning.core.counting), the reduction, the ratio of median training times
# and the median peak memory. Nothing is trained or re-evaluated here.

PROBE_FILE = "probe.json"
REPORT_BEGIN = "<!-- report:begin -->"
REPORT_END = "<!-- report:end -->"
_MODE = re.compile(r"^(base|prog)(-[A-Za-z0-9_-]+)?$")
# config keys that may differ inside one group without making its runs incomparable
_RUN_KEYS = {"seed", "output_dir", "overwrite", "resume", "progtuning", "threads", "save_model", "save_checkpoints",
             "logging_steps", "embeddings", "stages", "stage_unit", "stage_blocks", "eval_frozen_blocks", "cache_frozen",
             "schedule", "target_reduction", "contribution_threshold", "decision_interval", "signal_every"}


@dataclass
class Run:
    """One results.json, with the few fields the report uses pulled out."""

    path: Path
    results: dict
    model: str
    task: str
    method: str
    mode: str  # "base", "prog" or "prog-<variant>"
    seed: int
    metric: str

    def score(self, split: str) -> float | None:
        key = "test_score" if split == "test" else "validation_score"
        value = self.results.get(key)
        if value is None:
            value = self.results.get("metrics", {}).get(split, {}).get(self.metric)
        return None if value is None else float(value)


@dataclass
class Side:
    """Baseline or one Progtuning mode of a group: its runs' numbers."""

    runs: list[Run] = field(default_factory=list)

    def values(self, get) -> list[float]:
        out = []
        for run in self.runs:
            value = get(run)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out.append(float(value))
        return out

    def median(self, get) -> float | None:
        values = self.values(get)
        return statistics.median(values) if values else None

    def span(self, get) -> tuple[float | None, float | None]:
        values = self.values(get)
        return (min(values), max(values)) if values else (None, None)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every results.json under the given folders (or the files themselves), sorted by path.

    Runs of a per-block probe (a folder holding ``probe.json``) are not sweep runs and are left out:
    :func:`load_probes` reads their summary instead.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            probe_dirs = {p.parent for p in path.rglob(PROBE_FILE)}
            files.extend(f for f in sorted(path.rglob("results.json")) if not probe_dirs & set(f.parents))
        else:
            raise ProgtuningError(f"{path} does not exist: give run folders, sweep folders or results.json files")
    runs, seen = [], set()
    for file in files:
        key = file.resolve()
        if key in seen:
            continue
        seen.add(key)
        results = json.loads(file.read_text())
        runs.append(_run(file, results))
    return runs


def load_probes(paths: Iterable[str | Path]) -> list[dict]:
    """Every probe.json (written by ``progtuning probe``) under the given folders, with its path."""
    found: dict[Path, dict] = {}
    for path in map(Path, paths):
        candidates = [path] if path.is_file() and path.name == PROBE_FILE else sorted(path.rglob(PROBE_FILE)) if path.is_dir() else []
        for file in candidates:
            found.setdefault(file.resolve(), {**json.loads(file.read_text()), "path": str(file)})
    return list(found.values())


def _run(path: Path, results: dict) -> Run:
    config = results.get("config", {})
    task = results.get("task", {})
    model = results.get("model", {})
    return Run(
        path=path,
        results=results,
        model=str(model.get("name") or config.get("model")),
        task=str(task.get("name") or config.get("task")),
        method=str(config.get("method", "full")),
        mode=run_mode(path, config),
        seed=int(results.get("seed", config.get("seed", 0))),
        metric=str(results.get("main_metric") or task.get("main_metric") or "score"),
    )


def run_mode(path: Path, config: dict) -> str:
    """"base", "prog" or "prog-<variant>": the sweep's folder name, else derived from the config."""
    parent = Path(path).parent
    for name in (parent.parent.name, parent.name):  # .../<mode>/seed<k>/results.json, or .../<mode>/results.json
        if _MODE.match(name):
            return name
    if not config.get("progtuning", True):
        return "base"
    mode = "prog"
    if config.get("schedule", "fixed") == "contribution":
        mode += "-contribution"
        if config.get("target_reduction") is not None:
            mode += f"-r{config['target_reduction']:g}"
    if config.get("stage_blocks"):
        mode += "-explicit"
    if config.get("embeddings", "always") != "always":
        mode += f"-emb-{config['embeddings']}"
    if config.get("stages"):
        mode += f"-T{config['stages']}"
    if config.get("stage_unit", "epoch") != "epoch":
        mode += f"-{config['stage_unit']}"
    return mode


def summarize_runs(runs: list[Run], split: str = "test") -> list[dict]:
    """One row per (model, task, method, Progtuning mode): the numbers of the Markdown/CSV table."""
    groups: dict[tuple[str, str, str], dict[str, Side]] = {}
    for run in runs:
        groups.setdefault((run.model, run.task, run.method), {}).setdefault(run.mode, Side()).runs.append(run)
    rows = []
    for (model, task, method), sides in sorted(groups.items(), key=lambda kv: _group_order(kv[0])):
        base = sides.get("base", Side())
        modes = sorted(m for m in sides if m != "base") or [None]
        for mode in modes:
            prog = sides[mode] if mode else Side()
            rows.append(_row(model, task, method, mode, base, prog, split))
    return rows


_METHOD_ORDER = {"full": 0, "lora": 1, "adapter": 2, "bitfit": 3, "peft": 4}


def _group_order(key: tuple[str, str, str]):
    model, task, method = key
    return (model, task, _METHOD_ORDER.get(method, 9), method)


def _row(model, task, method, mode, base: Side, prog: Side, split: str) -> dict:
    score = lambda run: run.score(split)  # noqa: E731
    field_ = lambda name: (lambda run: run.results.get(name))  # noqa: E731
    metric = (base.runs or prog.runs)[0].metric
    b_med, p_med = base.median(score), prog.median(score)
    b_min, b_max = base.span(score)
    p_min, p_max = prog.span(score)
    # paired by seed: in how many seeds did Progtuning score at least the baseline?
    b_by_seed = {r.seed: r.score(split) for r in base.runs}
    pairs = [(b_by_seed[r.seed], r.score(split)) for r in prog.runs if b_by_seed.get(r.seed) is not None and r.score(split) is not None]
    b_time, p_time = base.median(field_("train_time_s")), prog.median(field_("train_time_s"))
    configs = [r.results.get("config", {}) for r in base.runs + prog.runs]
    return {
        "model": model,
        "task": task,
        "method": method,
        "mode": mode or "",
        "metric": metric,
        "split": split,
        "n_base": len(base.values(score)),
        "n_prog": len(prog.values(score)),
        "seeds": ",".join(str(s) for s in sorted({r.seed for r in base.runs + prog.runs})),
        "base_median": b_med,
        "base_min": b_min,
        "base_max": b_max,
        "prog_median": p_med,
        "prog_min": p_min,
        "prog_max": p_max,
        "diff": (p_med - b_med) if b_med is not None and p_med is not None else None,
        "prog_wins": sum(p >= b for b, p in pairs),
        "pairs": len(pairs),
        "base_updated_params": base.median(field_("updated_params")),
        "prog_updated_params": prog.median(field_("updated_params")),
        "reduction": prog.median(field_("reduction")),
        "reduction_blocks_only": prog.median(field_("reduction_blocks_only")),
        "base_train_time_s": b_time,
        "prog_train_time_s": p_time,
        "time_ratio": (p_time / b_time) if b_time and p_time is not None else None,
        "base_peak_rss_mb": base.median(field_("peak_rss_mb")),
        "prog_peak_rss_mb": prog.median(field_("peak_rss_mb")),
        "mixed_settings": ", ".join(_mixed_keys(configs)),
    }


def _mixed_keys(configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - _RUN_KEYS)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
CSV_COLUMNS = (
    "model", "task", "method", "mode", "metric", "split", "n_base", "n_prog", "seeds",
    "base_median", "base_min", "base_max", "prog_median", "prog_min", "prog_max", "diff",
    "prog_wins", "pairs", "base_updated_params", "prog_updated_params", "reduction",
    "reduction_blocks_only", "base_train_time_s", "prog_train_time_s", "time_ratio",
    "base_peak_rss_mb", "prog_peak_rss_mb", "mixed_settings",
)
RUN_COLUMNS = (
    "path", "model", "task", "method", "mode", "seed", "metric", "validation_score", "test_score",
    "updated_params", "baseline_updated_params", "reduction", "reduction_blocks_only", "train_time_s",
    "wall_time_s", "peak_rss_mb", "epochs", "learning_rate", "train_examples",
)


def build_report(
    dirs: Iterable[str | Path],
    out_dir: str | Path,
    split: str = "test",
    markdown: str | Path | None = None,
    title: str = "Progtuning sweep results",
    plots: bool = True,
) -> dict:
    """Write ``results.md``, ``results.csv`` (one row per group), ``runs.csv`` (one per run) and PNGs.

    ``markdown``: write the Markdown there instead of ``out_dir/results.md``; if that file exists
    and holds the markers ``<!-- report:begin -->`` … ``<!-- report:end -->``, only the text
    between them is replaced (hand-written text around them stays). Returns the paths written and
    the summary rows.
    """
    if split not in ("test", "validation"):
        raise ProgtuningError(f"split must be test or validation, got {split!r}")
    dirs = list(dirs)
    runs = load_runs(dirs)
    probes = load_probes(dirs)
    if not runs and not probes:
        raise ProgtuningError(f"no results.json under {', '.join(map(str, dirs))}: run a sweep (or train) first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize_runs(runs, split)
    written: dict[str, Any] = {"rows": rows, "runs": len(runs), "probes": len(probes)}

    images: dict[str, Any] = {}
    if runs:
        written["csv"] = _write_csv(out_dir / "results.csv", CSV_COLUMNS, rows)
        written["runs_csv"] = _write_csv(out_dir / "runs.csv", RUN_COLUMNS, [_run_row(r) for r in runs])
        if plots:
            images["scatter"] = plot_metric_vs_params(runs, out_dir / "metric_vs_params.png", split)
            images["bars"] = plot_bars(rows, out_dir / "bars.png")
            images["timelines"] = plot_timelines(runs, out_dir / "timelines")
    if probes and plots:
        from progtuning.runs.probe import plot_probe

        images["probes"] = [
            plot_probe(p, out_dir / f"probe-{p['task']}-{p['model']}-{p['method']}.png") for p in probes
        ]
    written["images"] = images

    md_path = Path(markdown) if markdown else out_dir / "results.md"
    body = render_markdown(runs, rows, split, images, md_path.parent, probes)
    if md_path.is_file() and REPORT_BEGIN in (text := md_path.read_text()) and REPORT_END in text:
        # inside a hand-written document, under its own heading: no title of ours
        head, rest = text.split(REPORT_BEGIN, 1)
        _, tail = rest.split(REPORT_END, 1)
        md_path.write_text(f"{head}{REPORT_BEGIN}\n{body}\n{REPORT_END}{tail}")
    else:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(f"## {title}\n\n{body}")
    written["markdown"] = md_path
    return written


def _write_csv(path: Path, columns: Iterable[str], rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def _run_row(run: Run) -> dict:
    r, config = run.results, run.results.get("config", {})
    return {
        "path": str(run.path), "model": run.model, "task": run.task, "method": run.method, "mode": run.mode,
        "seed": run.seed, "metric": run.metric, "validation_score": r.get("validation_score"),
        "test_score": r.get("test_score"), "updated_params": r.get("updated_params"),
        "baseline_updated_params": r.get("baseline_updated_params"), "reduction": r.get("reduction"),
        "reduction_blocks_only": r.get("reduction_blocks_only"), "train_time_s": r.get("train_time_s"),
        "wall_time_s": r.get("wall_time_s"), "peak_rss_mb": r.get("peak_rss_mb"), "epochs": config.get("epochs"),
        "learning_rate": config.get("learning_rate"),
        "train_examples": r.get("task", {}).get("sizes", {}).get("train"),
    }


# -- Markdown ----------------------------------------------------------------------------------
def render_markdown(
    runs: list[Run], rows: list[dict], split: str, images: dict, md_dir: Path, probes: list[dict] | None = None
) -> str:
    """The report's Markdown body (no title): setup, the table, the claims, the plots, the probes."""
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
        "Train-time ratio = median training time (`train_time_s`: the Trainer's loop, per-epoch validation included) "
        "with Progtuning / without. Peak memory = median peak RSS of the run's process.",
        "",
    ]
    lines += _setup_section(runs)
    lines += ["### Results", ""]
    lines += [
        "| model | task | method | mode | metric | baseline | Progtuning | Δ | ≥ base | updated params (base → prog) "
        "| reduction (all / blocks) | train-time ratio | peak MiB (base / prog) | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join([
                row["model"], row["task"], row["method"], row["mode"] or "—", row["metric"],
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
    methods = sorted({r.method for r in runs}, key=lambda m: _METHOD_ORDER.get(m, 9))
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
    everything = [r for r in rows if r["diff"] is not None]
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
    for method in sorted({r["method"] for r in pairs}, key=lambda m: _METHOD_ORDER.get(m, 9)):
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


# -- plots -------------------------------------------------------------------------------------
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
        ax.set_xscale("log")
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
        methods = sorted({r["method"] for r in subset}, key=lambda m: _METHOD_ORDER.get(m, 9))
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
                    lows.append(row[f"{prefix}_min"])
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(methods))]
            ax.bar(xs, heights, width, yerr=errors, capsize=3, label=label,
                   color="lightgray" if mode is None else None, edgecolor="black", linewidth=0.5)
        ax.set_xticks(range(len(methods)), methods)
        if lows:
            low = min(lows)
            ax.set_ylim(max(0.0, low - 0.1 * max(abs(low), 0.1)) if low >= 0 else low * 1.1, None)
        metric = subset[0]["metric"] if subset else "score"
        ax.set_title(f"{task} · {model}", fontsize=10)
        ax.set_ylabel(f"{metric} ({subset[0]['split'] if subset else ''})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
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
    for model, task, method in sorted({(r.model, r.task, r.method) for r in runs}, key=_group_order):
        subset = sorted((r for r in runs if (r.model, r.task, r.method) == (model, task, method)),
                        key=lambda r: (r.mode, r.seed))
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
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
        top.set_title(f"{task} · {model} · {method}", fontsize=10)
        top.grid(alpha=0.3)
        top.legend(fontsize=6, ncol=2)
        bottom.set_ylabel("training loss")
        bottom.set_xlabel("optimizer step")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{model}_{task}_{method}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
