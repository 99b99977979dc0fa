"""The study's sections of a report, as Markdown: each arm against its baseline, and the goal check.

The numbers come from :func:`progtuning.runs.comparisons.compare_runs` and
:func:`progtuning.runs.goal.goal_check`; this module only formats them.
"""

from __future__ import annotations

import math

from progtuning.runs.goal import MAX_TIME_RATIO, MIN_DELTA_POINTS, MIN_REDUCTION, GoalResult
from progtuning.runs.report_markdown import _params


def render_comparisons(rows: list[dict], split: str) -> list[str]:
    """The table of every arm against its own baseline, with the bootstrap interval and verdict."""
    if not rows:
        return []
    resamples = max((r.get("resamples") or 0 for r in rows), default=0)
    on_gpu = any(r.get("arm_peak_gpu_mb") is not None for r in rows)  # the GPU column only for GPU runs
    lines = [
        "### Each arm against its own baseline",
        "",
        f"Δ = arm − baseline in points of the task's main metric on the **{split}** split (× 100; SQuAD's are "
        "percent already), the median over seeds of the paired (same-seed) differences. The interval is a 95% "
        f"bootstrap over seeds × test examples ({resamples} resamples, each rescored with the task's own metric); the "
        "verdict is *better* or *worse* only where the interval excludes 0, else *no difference*. Reduction: "
        "1 − updated parameters (parameter-epochs) of the arm / of *this* baseline. Train-time ratio: median of "
        "the paired ratios of `train_time_s`. Time to reach: the arm's training time until its validation score "
        "first reached the baseline's final one, over the baseline's training time (median over seeds; a seed that "
        "never reached it counts as infinitely slow). Peak memory: median peak RSS"
        + ("; peak GPU memory: `torch.cuda.max_memory_allocated`, over the whole run (its first stage) and over "
           "the arm's last stage" if on_gpu else "") + ". Arms marked † are cheap "
        "baselines shown against the plain one; a baseline in *italics* is not the arm's own (an arm compared with "
        "a cheap baseline is shown against the plain one too, for what it gains over plain fine-tuning).",
        "",
        "| model | task | method | arm | vs | metric | baseline | arm score | Δ (pt) | 95% interval | verdict "
        "| updated params (base → arm) | reduction | train-time ratio | time to reach | peak MiB (base / arm) "
        + ("| peak GPU MiB (base / arm / arm's last stage) " if on_gpu else "")
        + "| epochs (base / arm) | seeds |",
        "|---" * (18 + on_gpu) + "|",
    ]
    for row in rows:
        scale = row.get("points_per_unit") or 100.0
        interval = "—"
        if row.get("delta_low") is not None:
            interval = f"[{row['delta_low'] * scale:+.2f}, {row['delta_high'] * scale:+.2f}]"
        lines.append("| " + " | ".join([
            row["model"], row["task"], row["method"], row["arm"] + (" †" if row.get("arm_is_baseline") else ""),
            row["baseline"] if row.get("primary", True) else f"*{row['baseline']}*", row["metric"], _num(row.get("base_score"), 4), _num(row.get("arm_score"), 4),
            _signed(row.get("delta"), scale), interval, row.get("verdict") or "—",
            f"{_params(row.get('base_updated_params'))} → {_params(row.get('arm_updated_params'))}",
            _pct(row.get("reduction")), _num(row.get("time_ratio"), 2), _reach(row),
            f"{_num(row.get('base_peak_rss_mb'), 0)} / {_num(row.get('arm_peak_rss_mb'), 0)}",
            *([f"{_num(row.get('base_peak_gpu_mb'), 0)} / {_num(row.get('arm_peak_gpu_mb'), 0)} / "
               f"{_num(row.get('arm_last_stage_gpu_mb'), 0)}"] if on_gpu else []),
            f"{_g(row.get('base_epochs'))} / {_g(row.get('arm_epochs'))}", str(row["seeds"]),
        ]) + " |")
    return lines + [""]


def render_goal(results: list[GoalResult]) -> list[str]:
    """The goal check as a Markdown section: per preset, the tasks that meet it, and the verdict."""
    lines = ["### Goal check", "", goal_statement() + " A preset compared with a cheap baseline is also checked "
             "against plain fine-tuning (*italics*), for information.", ""]
    if not results:
        return lines + ["No Progtuning arm has a baseline to compare with yet.", ""]
    lines += ["| model | method | preset | vs | tasks meeting all three | goal met | what the other tasks missed |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        missed = "; ".join(f"{task}: {', '.join(why)}" for task, why in r.failing.items()) or "—"
        vs = r.baseline if r.own else f"*{r.baseline}*"
        lines.append(f"| {r.model} | {r.method} | {r.arm} | {vs} | {len(r.passing)} of {len(r.tasks)} "
                     f"({', '.join(r.passing) or 'none'}) | {'**yes**' if r.met else 'no'} | {missed} |")
    lines += ["", goal_conclusion(results), ""]
    return lines


def goal_statement() -> str:
    return (f"The goal: a preset with median Δ ≥ {MIN_DELTA_POINTS:+.1f} points against its own baseline, "
            f"≥ {MIN_REDUCTION:.0%} fewer updated parameters and ≤ {MAX_TIME_RATIO:g}× the training time, "
            "all three on at least 4 of 5 tasks (at least 80% of the tasks measured, and at least 4).")


def goal_conclusion(results: list[GoalResult]) -> str:
    met = [r for r in results if r.met and r.own]
    plain = [r for r in results if r.met and not r.own]
    text = ("**Presets that reach the goal:** " + "; ".join(f"{r.arm} with {r.method} on {r.model}" for r in met) + "."
            if met else "**No preset reaches the goal against its own baseline in these runs.**")
    if plain:
        text += (" Against plain fine-tuning (not their own, cheaper baseline) the goal is met by: "
                 + "; ".join(f"{r.arm} with {r.method} on {r.model}" for r in plain) + ".")
    return text


def goal_lines(results: list[GoalResult]) -> list[str]:
    """The goal check as plain lines, for the terminal."""
    lines = [goal_statement()]
    for r in results:
        vs = r.baseline if r.own else f"{r.baseline}, not its own baseline"
        lines.append(f"  {r.model} {r.method} {r.arm} (vs {vs}): {len(r.passing)} of {len(r.tasks)} tasks "
                     f"-> {'MET' if r.met else 'not met'}")
    lines.append(goal_conclusion(results).replace("**", "") if results else "No Progtuning arm has a baseline yet.")
    return lines


def _reach(row: dict) -> str:
    ratio = row.get("time_to_reach_ratio")
    if ratio is None:
        return "—"
    text = "not reached" if math.isinf(ratio) else f"{ratio:.2f}"
    return f"{text} ({row['reached']})"


def _signed(value, scale: float) -> str:
    return "—" if value is None else f"{value * scale:+.2f}"


def _num(value, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pct(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def _g(value) -> str:
    return "—" if value is None else f"{value:g}"


