"""Each arm against its own baseline: the numbers a study reports, read from results.json files.

For every (model, task, method) and every arm (a Progtuning mode, or a cheap baseline variant)
the baseline is the one its results name (``mode.compared_with``: the plain baseline ``base``
unless the sweep named another, e.g. frozen embeddings). An arm compared with such a cheap
baseline gets a second row against ``base`` too, marked ``primary: False``: the first answers
"does the schedule earn its keep beyond freezing the embeddings?", the second "what does a user
gain over plain fine-tuning?". Pairs named in ``extra_pairs`` (``progtuning report --compare
prog-contrib:prog-fast``) add head-to-head rows of two arms, e.g. two schedules at the same
saving. Runs are paired by seed, and each row holds:

* **Δ** of the task's main metric on the test split, arm − baseline, median over the paired seeds,
  with a 95% bootstrap interval over seeds × examples (:mod:`progtuning.runs.bootstrap`; each
  resample rescored with the task's own metric function, :func:`progtuning.tasks.rescore.metric_for`)
  and the verdict that interval allows (better / worse / no difference). Runs without per-example
  outputs (older results, QA) get Δ from their stored scores and no interval. Δ is also given in
  *points* (× 100, or as is for metrics already in percent: SQuAD);
* the **reduction** in updated parameters (parameter-epochs) against *that* baseline's runs:
  1 − arm / baseline (an arm given more epochs can update more than its baseline: a negative
  reduction);
* the **train-time ratio**: the median over seeds of the paired ratios arm / baseline of
  ``train_time_s``;
* **peak memory**: the median peak RSS of each side;
* **time to reach** the baseline's final validation score, from both runs' ``validation_curve``:
  the arm's training time until its first evaluation at or above that score, over the baseline's
  training time until its last one; median over seeds, a seed that never reaches it counting as
  infinitely slow ("not reached" when the median is).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from progtuning.methods.registry import method_rank
from progtuning.runs.bootstrap import PairedDelta, Resampler, paired_bootstrap
from progtuning.runs.results import is_baseline_label

if TYPE_CHECKING:
    from progtuning.runs.report import Run

COMPARISON_COLUMNS = (
    "model", "task", "method", "arm", "baseline", "primary", "arm_is_baseline", "metric", "split", "seeds", "examples",
    "base_score", "arm_score", "delta", "delta_low", "delta_high", "verdict", "points_per_unit",
    "base_updated_params", "arm_updated_params", "reduction", "base_train_time_s", "arm_train_time_s",
    "time_ratio", "base_peak_rss_mb", "arm_peak_rss_mb", "base_peak_gpu_mb", "arm_peak_gpu_mb",
    "arm_last_stage_gpu_mb", "time_to_reach_ratio", "reached", "base_epochs", "arm_epochs", "resamples",
)


def compare_runs(
    runs: Iterable[Run], split: str = "test", resamples: int = 1000, seed: int = 0,
    extra_pairs: Iterable[tuple[str, str]] = (),
) -> list[dict]:
    """One row per (model, task, method, arm): see the module docstring. ``resamples=0``: no intervals.
    ``extra_pairs``: (arm, other arm) rows wherever both ran."""
    extra_pairs = list(extra_pairs)
    groups: dict[tuple[str, str, str], dict[str, list[Run]]] = {}
    for run in runs:
        groups.setdefault((run.model, run.task, run.method), {}).setdefault(run.mode, []).append(run)
    resamplers: dict[tuple, Resampler] = {}  # per task and metric: a baseline's rescores serve all its arms
    rows = []
    for (model, task, method), sides in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], method_rank(kv[0][2]))):
        for arm in sorted(m for m in sides if m != "base"):
            arm_runs = sides[arm]
            baseline = arm_runs[0].compared_with or "base"
            baselines = [baseline] + (["base"] if baseline != "base" and "base" in sides else [])
            for other in baselines:
                row = _compare(model, task, method, arm, other, sides.get(other, []), arm_runs, split, resamples, seed,
                               resamplers)
                row["primary"] = other == baseline
                rows.append(row)
        for arm, other in extra_pairs:
            if arm in sides and other in sides:
                row = _compare(model, task, method, arm, other, sides[other], sides[arm], split, resamples, seed,
                               resamplers)
                row["primary"] = False
                rows.append(row)
    return rows


def _compare(model, task, method, arm, baseline, base_runs, arm_runs, split, resamples, seed, resamplers) -> dict:
    by_seed = {r.seed: r for r in base_runs}
    pairs = [(by_seed[r.seed], r) for r in sorted(arm_runs, key=lambda r: r.seed) if r.seed in by_seed]
    metric = (arm_runs or base_runs)[0].metric
    row: dict[str, Any] = {
        "model": model, "task": task, "method": method, "arm": arm, "baseline": baseline,
        "arm_is_baseline": is_baseline_label(arm), "metric": metric, "split": split, "seeds": len(pairs),
        "points_per_unit": _points_per_unit(arm_runs[0]),
        "base_epochs": _median(r.results.get("config", {}).get("epochs") for r, _ in pairs),
        "arm_epochs": _median(r.results.get("config", {}).get("epochs") for _, r in pairs),
    }
    scores = [(b.score(split), a.score(split)) for b, a in pairs]
    scored = [(b, a) for b, a in scores if b is not None and a is not None]
    row["base_score"] = _median(b for b, _ in scored)
    row["arm_score"] = _median(a for _, a in scored)
    interval = _interval(pairs, split, resamples, seed, resamplers) if pairs and resamples > 0 else None
    if interval is not None:
        row.update(delta=interval.delta, delta_low=interval.low, delta_high=interval.high, verdict=interval.verdict,
                   examples=interval.examples, resamples=interval.resamples)
    else:
        row.update(delta=_median(a - b for b, a in scored), delta_low=None, delta_high=None, verdict=None,
                   examples=None, resamples=0)
    base_updated = _median(b.results.get("updated_params") for b, _ in pairs)
    arm_updated = _median(a.results.get("updated_params") for _, a in pairs)
    row.update(
        base_updated_params=base_updated,
        arm_updated_params=arm_updated,
        reduction=(1 - arm_updated / base_updated) if base_updated and arm_updated is not None else None,
        base_train_time_s=_median(b.results.get("train_time_s") for b, _ in pairs),
        arm_train_time_s=_median(a.results.get("train_time_s") for _, a in pairs),
        time_ratio=_median(_ratio(a.results.get("train_time_s"), b.results.get("train_time_s")) for b, a in pairs),
        base_peak_rss_mb=_median(b.results.get("peak_rss_mb") for b, _ in pairs),
        arm_peak_rss_mb=_median(a.results.get("peak_rss_mb") for _, a in pairs),
        base_peak_gpu_mb=_median(peak_gpu_mb(b.results) for b, _ in pairs),
        arm_peak_gpu_mb=_median(peak_gpu_mb(a.results) for _, a in pairs),
        arm_last_stage_gpu_mb=_median(peak_gpu_mb(a.results, last_stage=True) for _, a in pairs),
    )
    reach = [time_to_reach_ratio(b.results.get("validation_curve"), a.results.get("validation_curve")) for b, a in pairs]
    reach = [r for r in reach if r is not None]
    row["time_to_reach_ratio"] = float(np.median(reach)) if reach else None  # inf: not reached
    row["reached"] = f"{sum(math.isfinite(r) for r in reach)}/{len(reach)}" if reach else None
    return row


def peak_gpu_mb(results: dict, last_stage: bool = False) -> float | None:
    """A run's peak GPU memory (the largest over its stages, or its last stage's); None for a CPU run.

    The whole run's peak is the first stage's, where every block trains, so it equals the baseline's;
    what the schedule saves shows in the later stages, where the frozen blocks keep no activations.
    """
    stages = results.get("stages") or []
    peaks = [s.get("peak_gpu_mb") for s in (stages[-1:] if last_stage else stages)]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def _interval(pairs, split, resamples, seed, resamplers) -> PairedDelta | None:
    """The bootstrap over the pairs' per-example outputs; None where they are missing or not comparable."""
    from progtuning.tasks.rescore import metric_for

    kept = [(b.results.get("per_example", {}).get(split), a.results.get("per_example", {}).get(split)) for b, a in pairs]
    if any(b is None or a is None for b, a in kept):
        return None
    labels = kept[0][0]["labels"]
    if any(b["labels"] != labels or a["labels"] != labels for b, a in kept):
        return None  # not the same test examples in the same order: nothing to pair
    task = pairs[0][1].results.get("task", {})
    metric, name = metric_for(task), pairs[0][1].metric
    if metric is None:
        return None
    key = (task.get("name"), name, len(labels))
    if key not in resamplers:
        from progtuning.tasks.resampled import resampled_scores

        resamplers[key] = Resampler(
            lambda outputs, y: metric(outputs, y)[name], resamples, seed,
            fast=lambda outputs, y, weights: resampled_scores(metric, name, outputs, y, weights),
        )
    keys = ([str(b.path) for b, _ in pairs], [str(a.path) for _, a in pairs])
    return paired_bootstrap(
        [np.asarray(b["outputs"]) for b, _ in kept], [np.asarray(a["outputs"]) for _, a in kept],
        np.asarray(labels), resamplers[key].score, resampler=resamplers[key], keys=keys,
    )


def time_to_reach_ratio(base_curve: list | None, arm_curve: list | None) -> float | None:
    """The arm's training time to the baseline's final validation score, over the baseline's (inf: never)."""
    if not base_curve or not arm_curve:
        return None
    target, base_time = base_curve[-1]["score"], base_curve[-1]["train_time_s"]
    if target is None or not base_time:
        return None
    for point in arm_curve:
        if point["score"] is not None and point["score"] >= target:
            return point["train_time_s"] / base_time
    return math.inf


def _points_per_unit(run: Run) -> float:
    """Δ in points: metrics in [0, 1] (accuracy, F1, correlations) × 100; SQuAD's are percent already."""
    return 1.0 if run.results.get("task", {}).get("kind") == "extractive_qa" else 100.0


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _median(values: Iterable) -> float | None:
    found = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(found) if found else None
