"""The study's goal, checked from the data: is there a preset worth recommending?

A preset (a Progtuning arm of a sweep: ``prog``, ``prog-<variant>``) with one method on one model
meets the goal when, on at least 4 of 5 tasks (generally: at least 80% of the tasks measured, and
at least 4), against the baseline it is compared with:

* its median paired Δ of the main test metric is at least −0.5 points,
* it updates at least 20% fewer parameters (parameter-epochs), and
* it trains in at most 0.7× the baseline's time (median of the paired ratios).

:func:`goal_check` reads the rows of :func:`progtuning.runs.comparisons.compare_runs`; baseline
arms (``base-<variant>``) are no presets and are left out, and so are head-to-head rows of two
Progtuning arms. A preset compared with a cheap baseline is also checked against the plain one
(its ``primary: False`` rows): one verdict per (preset, baseline), so a reader sees both "does the
schedule pay off beyond freezing the embeddings?" and "does it pay off against plain fine-tuning?".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_DELTA_POINTS = -0.5
MIN_REDUCTION = 0.20
MAX_TIME_RATIO = 0.7
MIN_TASKS = 4
MIN_SHARE = 4 / 5


@dataclass
class GoalResult:
    """One preset × method × model: which tasks meet all three criteria, and whether that is enough."""

    model: str
    method: str
    arm: str
    baseline: str
    own: bool = True  # the baseline is the preset's own (False: the plain one, beside a cheap own baseline)
    tasks: list[str] = field(default_factory=list)  # every task measured
    passing: list[str] = field(default_factory=list)  # tasks meeting all three criteria
    failing: dict[str, list[str]] = field(default_factory=dict)  # task -> the criteria it missed

    @property
    def met(self) -> bool:
        needed = max(MIN_TASKS, math.ceil(MIN_SHARE * len(self.tasks) - 1e-9))
        return len(self.passing) >= needed

    def to_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "arm": self.arm, "baseline": self.baseline,
                "own_baseline": self.own, "tasks": len(self.tasks), "passing": len(self.passing), "met": self.met,
                "passing_tasks": ",".join(self.passing),
                "failing": "; ".join(f"{t}: {', '.join(why)}" for t, why in self.failing.items())}


def missed_criteria(row: dict) -> list[str]:
    """The goal's criteria one comparison row misses (empty: it meets all three)."""
    missed = []
    delta = row.get("delta")
    if delta is None or delta * row.get("points_per_unit", 100.0) < MIN_DELTA_POINTS:
        missed.append("Δ" if delta is None else f"Δ {delta * row.get('points_per_unit', 100.0):+.2f} pt")
    reduction = row.get("reduction")
    if reduction is None or reduction < MIN_REDUCTION:
        missed.append("reduction —" if reduction is None else f"reduction {reduction:.0%}")
    ratio = row.get("time_ratio")
    if ratio is None or ratio > MAX_TIME_RATIO:
        missed.append("time —" if ratio is None else f"time {ratio:.2f}×")
    return missed


def goal_check(rows: list[dict]) -> list[GoalResult]:
    """One :class:`GoalResult` per (model, method, preset, baseline), in the rows' order."""
    from progtuning.runs.results import is_baseline_label

    results: dict[tuple[str, str, str, str], GoalResult] = {}
    for row in rows:
        if row.get("arm_is_baseline") or not is_baseline_label(row["baseline"]):
            continue
        key = (row["model"], row["method"], row["arm"], row["baseline"])
        result = results.setdefault(
            key, GoalResult(row["model"], row["method"], row["arm"], row["baseline"], own=row.get("primary", True))
        )
        result.tasks.append(row["task"])
        missed = missed_criteria(row)
        if missed:
            result.failing[row["task"]] = missed
        else:
            result.passing.append(row["task"])
    return list(results.values())
