"""Sweep reports: Markdown and CSV tables and PNG plots from many results.json files. Never trains.

    progtuning report runs/sweep-minilm [more dirs] --out docs/results [--markdown docs/results.md] [--bootstrap 1000]

This module finds the runs, groups them and computes the table rows (:func:`summarize_runs`), and
writes the report (:func:`build_report`); the Markdown text is :mod:`progtuning.runs.report_markdown`,
the plots :mod:`progtuning.runs.report_plots`. The study's statistics (each arm against its own
baseline with a bootstrap interval, and the goal check) are :mod:`progtuning.runs.comparisons`,
:mod:`progtuning.runs.goal` and :mod:`progtuning.runs.report_study`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from progtuning.errors import ProgtuningError
from progtuning.methods.registry import method_rank
from progtuning.runs.results import PROBE_FILE, RESULTS_FILE, read_results

# Runs are grouped by (model, task, method); inside a group each arm (a Progtuning mode: "prog", or
# "prog-<variant>" from a sweep's variants; or a cheap baseline variant "base-<variant>") is compared
# with the baseline its results.json names (mode.compared_with: "base", the runs without
# Progtuning, unless the sweep named another; older files: their sweep folder name, see runs.results). The
# score is the task's main metric on one split (default: test; no model selection ever looks at
# it). Per group and mode: median and min–max over seeds, the difference of the medians, in how
# many seeds (paired by seed) Progtuning scored at least the baseline, updated parameters (in
# parameter-epochs, see progtuning.core.counting), the reduction, the median of the paired ratios of
# training times and the median peak memory. Nothing is trained or re-evaluated here.

REPORT_BEGIN = "<!-- report:begin -->"
REPORT_END = "<!-- report:end -->"
# config keys that may differ inside one group without making its runs incomparable
_RUN_KEYS = {"seed", "output_dir", "overwrite", "resume", "progtuning", "threads", "save_model", "save_checkpoints",
             "logging_steps", "embeddings", "stages", "stage_unit", "stage_blocks", "eval_frozen_blocks", "cache_frozen",
             "variant", "schedule", "target_reduction", "contribution_threshold", "decision_interval", "signal_every"}


@dataclass
class Run:
    """One results.json, with the few fields the report uses pulled out."""

    path: Path
    results: dict
    model: str
    task: str
    method: str
    mode: str  # "base", "prog", "prog-<variant>" or "base-<variant>"
    seed: int
    metric: str
    compared_with: str | None = None  # the label of this arm's baseline (None: the plain baseline itself)

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
            files.extend(f for f in sorted(path.rglob(RESULTS_FILE)) if not probe_dirs & set(f.parents))
        else:
            raise ProgtuningError(f"{path} does not exist: give run folders, sweep folders or results.json files")
    runs, seen = [], set()
    for file in files:
        key = file.resolve()
        if key in seen:
            continue
        seen.add(key)
        runs.append(_run(file, read_results(file)))
    return runs


def load_probes(paths: Iterable[str | Path]) -> list[dict]:
    """Every probe.json (written by ``progtuning probe``) under the given folders, with its path."""
    found: dict[Path, dict] = {}
    for path in map(Path, paths):
        candidates = [path] if path.is_file() and path.name == PROBE_FILE else sorted(path.rglob(PROBE_FILE)) if path.is_dir() else []
        for file in candidates:
            found.setdefault(file.resolve(), {**json.loads(file.read_text()), "path": str(file)})
    return list(found.values())


def select_runs(runs: list[Run], tasks: Iterable[str] | None = None, arms: Iterable[str] | None = None) -> list[Run]:
    """The runs of the given tasks and arms (None: all), each kept arm with the baseline it names.

    One study folder can hold several sweeps' arms (the study, its ablations on two tasks): this is
    how a report shows one of them. A name that matches no run is an error that lists the names.
    """
    tasks = None if tasks is None else set(tasks)
    arms = None if arms is None else set(arms)
    for kind, wanted, have in (("task", tasks, {r.task for r in runs}), ("arm", arms, {r.mode for r in runs})):
        unknown = sorted((wanted or set()) - have)
        if unknown:
            raise ProgtuningError(f"no runs of {kind} {', '.join(unknown)}: the runs have {', '.join(sorted(have))}")
    if tasks is not None:
        runs = [r for r in runs if r.task in tasks]
    if arms is not None:
        keep = arms | {r.compared_with or "base" for r in runs if r.mode in arms}
        runs = [r for r in runs if r.mode in keep]
    return runs


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
        mode=results["mode"]["label"],
        seed=int(results.get("seed", config.get("seed", 0))),
        metric=str(results.get("main_metric") or task.get("main_metric") or "score"),
        compared_with=results["mode"].get("compared_with"),
    )


def summarize_runs(runs: list[Run], split: str = "test") -> list[dict]:
    """One row per (model, task, method, Progtuning mode): the numbers of the Markdown/CSV table."""
    groups: dict[tuple[str, str, str], dict[str, Side]] = {}
    for run in runs:
        groups.setdefault((run.model, run.task, run.method), {}).setdefault(run.mode, Side()).runs.append(run)
    rows = []
    for (model, task, method), sides in sorted(groups.items(), key=lambda kv: group_order(kv[0])):
        modes = sorted(m for m in sides if m != "base") or [None]
        for mode in modes:
            prog = sides[mode] if mode else Side()
            baseline = (prog.runs[0].compared_with if prog.runs else None) or "base"
            rows.append(_row(model, task, method, mode, sides.get(baseline, Side()), prog, split, baseline))
    return rows


def group_order(key: tuple[str, str, str]):
    """(model, task, method) groups: by model, task, then methods in registry order."""
    model, task, method = key
    return (model, task, method_rank(method))


def _row(model, task, method, mode, base: Side, prog: Side, split: str, baseline: str = "base") -> dict:
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
    # the train-time ratio: median of the paired (same-seed) ratios, as the study's comparisons give it
    b_time_by_seed = {r.seed: r.results.get("train_time_s") for r in base.runs}
    time_ratios = [r.results["train_time_s"] / b_time_by_seed[r.seed] for r in prog.runs
                   if b_time_by_seed.get(r.seed) and r.results.get("train_time_s") is not None]
    base_params, prog_params = base.median(field_("updated_params")), prog.median(field_("updated_params"))
    # against the baseline this row names (a run records its reduction against plain fine-tuning)
    reduction = 1 - prog_params / base_params if base_params and prog_params is not None else prog.median(field_("reduction"))
    # a warning is about the seeds of one arm disagreeing, not about how an arm differs from its baseline
    mixed = sorted(set(_mixed_keys([r.results.get("config", {}) for r in base.runs]))
                   | set(_mixed_keys([r.results.get("config", {}) for r in prog.runs])))
    return {
        "model": model,
        "task": task,
        "method": method,
        "mode": mode or "",
        "baseline": baseline,
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
        "base_updated_params": base_params,
        "prog_updated_params": prog_params,
        "reduction": reduction,
        "reduction_blocks_only": prog.median(field_("reduction_blocks_only")),
        "base_train_time_s": b_time,
        "prog_train_time_s": p_time,
        "time_ratio": statistics.median(time_ratios) if time_ratios else None,
        "base_peak_rss_mb": base.median(field_("peak_rss_mb")),
        "prog_peak_rss_mb": prog.median(field_("peak_rss_mb")),
        "mixed_settings": ", ".join(mixed),
    }


def _mixed_keys(configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - _RUN_KEYS)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
CSV_COLUMNS = (
    "model", "task", "method", "mode", "baseline", "metric", "split", "n_base", "n_prog", "seeds",
    "base_median", "base_min", "base_max", "prog_median", "prog_min", "prog_max", "diff",
    "prog_wins", "pairs", "base_updated_params", "prog_updated_params", "reduction",
    "reduction_blocks_only", "base_train_time_s", "prog_train_time_s", "time_ratio",
    "base_peak_rss_mb", "prog_peak_rss_mb", "mixed_settings",
)
GOAL_COLUMNS = ("model", "method", "arm", "baseline", "own_baseline", "tasks", "passing", "met", "passing_tasks", "failing")
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
    bootstrap: int = 1000,
    compare: Iterable[tuple[str, str]] = (),
    tasks: Iterable[str] | None = None,
    arms: Iterable[str] | None = None,
) -> dict:
    """Write ``results.md``, ``results.csv`` (one row per group), ``runs.csv`` (one per run),
    ``comparisons.csv`` (each arm against its baseline), ``goal.csv`` and PNGs.

    ``bootstrap``: resamples of the paired bootstrap (0: Δ without intervals). ``compare``: extra
    head-to-head pairs (arm, other arm), e.g. ``("prog-contrib", "prog-fast")``. ``tasks`` /
    ``arms``: report only these (see :func:`select_runs`).

    ``markdown``: write the Markdown there instead of ``out_dir/results.md``; if that file exists
    and holds the markers ``<!-- report:begin -->`` … ``<!-- report:end -->``, only the text
    between them is replaced (hand-written text around them stays). Returns the paths written and
    the summary rows.
    """
    if split not in ("test", "validation"):
        raise ProgtuningError(f"split must be test or validation, got {split!r}")
    dirs = list(dirs)
    runs = select_runs(load_runs(dirs), tasks, arms)
    probes = load_probes(dirs)
    if not runs and not probes:
        raise ProgtuningError(f"no results.json under {', '.join(map(str, dirs))}: run a sweep (or train) first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize_runs(runs, split)
    from progtuning.runs.comparisons import COMPARISON_COLUMNS, compare_runs
    from progtuning.runs.goal import goal_check
    from progtuning.runs.report_study import render_comparisons, render_goal

    comparisons = compare_runs(runs, split, resamples=bootstrap, extra_pairs=compare)
    goal = goal_check(comparisons)
    written: dict[str, Any] = {"rows": rows, "runs": len(runs), "probes": len(probes),
                               "comparisons": comparisons, "goal": goal}

    from progtuning.runs.report_markdown import render_markdown
    from progtuning.runs.report_plots import plot_bars, plot_metric_vs_params, plot_probe, plot_timelines

    images: dict[str, Any] = {}
    if runs:
        written["csv"] = _write_csv(out_dir / "results.csv", CSV_COLUMNS, rows)
        written["runs_csv"] = _write_csv(out_dir / "runs.csv", RUN_COLUMNS, [_run_row(r) for r in runs])
        written["comparisons_csv"] = _write_csv(out_dir / "comparisons.csv", COMPARISON_COLUMNS, comparisons)
        written["goal_csv"] = _write_csv(out_dir / "goal.csv", GOAL_COLUMNS, [g.to_dict() for g in goal])
        if plots:
            images["scatter"] = plot_metric_vs_params(runs, out_dir / "metric_vs_params.png", split)
            images["bars"] = plot_bars(rows, out_dir / "bars.png")
            images["timelines"] = plot_timelines(runs, out_dir / "timelines")
    if probes and plots:
        images["probes"] = [
            plot_probe(p, out_dir / f"probe-{p['task']}-{p['model']}-{p['method']}.png") for p in probes
        ]
    written["images"] = images

    md_path = Path(markdown) if markdown else out_dir / "results.md"
    study = (render_comparisons(comparisons, split) + render_goal(goal)) if comparisons else []
    body = render_markdown(runs, rows, split, images, md_path.parent, probes, study)
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
