"""The learning-rate schedule across stages: one for the whole run, or re-warmed at every stage.

``run`` (the default) is the Trainer's own schedule: linear warm-up over ``warmup_ratio`` of the
run's optimizer steps, then linear decay to zero at the end of the run; a stage switch changes
nothing in it, so the last stages train at a small learning rate.

``per_stage`` restarts that curve at every stage switch, over the stage's own steps: linear
warm-up over ``warmup_ratio`` of the stage's steps (none with a ratio of 0), then linear decay to
zero at the stage's end. There is still one optimizer for the run (AdamW's moments of parameters
that keep training carry over a switch; those of parameters that stop training are dropped by the
freezer). The factor is a pure function of the optimizer step, so a resumed run continues on the
same curve, and nothing about it needs saving beyond the scheduler's step count.

For the HF Trainer, :func:`per_stage_lr_scheduler` builds it around a
:class:`~progtuning.core.callback.ProgtuningCallback` (which learns the stage boundaries when
training begins)::

    callback = ProgtuningCallback(schedule)
    trainer = ProgtuningTrainer(..., callbacks=[callback],
        lr_scheduler_factory=lambda optimizer, steps: per_stage_lr_scheduler(optimizer, callback, warmup_ratio=0.1))

In a plain loop, ``LambdaLR(optimizer, lambda step: per_stage_factor(step, stage_bounds(...), 0.1))``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from progtuning.core.callback import ProgtuningCallback
    from progtuning.core.schedule import Schedule

LR_SCHEDULES: tuple[str, ...] = ("run", "per_stage")


def stage_bounds(schedule: Schedule, steps_per_epoch: int, total_steps: int) -> list[tuple[int, int]]:
    """``(first step, end step)`` of each stage in a run of ``total_steps`` optimizer steps
    (a stage the run never reaches is empty: first == end)."""
    starts = schedule.stage_starts(steps_per_epoch, total_steps)
    ends = [max(start, following) for start, following in zip(starts, starts[1:] + [total_steps])]
    return list(zip(starts, ends))


def per_stage_factor(step: int, bounds: Sequence[tuple[int, int]], warmup_ratio: float) -> float:
    """The learning-rate factor for optimizer step ``step`` (0-based): the linear warm-up/decay
    curve of the HF Trainer's ``linear`` schedule, restarted at the first step of every stage."""
    start, end = bounds[0]
    for first, last in bounds:
        if first <= step and last > first:  # the last non-empty stage that has begun
            start, end = first, last
    length = end - start
    local = step - start
    warmup = math.ceil(length * warmup_ratio)  # as the Trainer turns a ratio into steps
    if local < warmup:
        return local / max(1, warmup)
    return max(0.0, (length - local) / max(1, length - warmup))


def per_stage_lr_scheduler(
    optimizer: torch.optim.Optimizer, callback: ProgtuningCallback, warmup_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that re-warms the learning rate at every stage of ``callback``'s schedule.

    The stage boundaries are read from the callback at each step: it knows the steps per epoch and
    the run's length from ``on_train_begin`` on, before the first optimizer step. (Built earlier,
    the scheduler's initial factor, at step 0, is the start of a warm-up: 0 with warm-up, else 1.)
    """
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if callback.schedule is None or callback.total_steps < 1:
            return 0.0 if warmup_ratio > 0 else 1.0  # step 0, before training begins
        bounds = stage_bounds(callback.schedule, callback.steps_per_epoch, callback.total_steps)
        return per_stage_factor(step, bounds, warmup_ratio)

    return LambdaLR(optimizer, factor)
