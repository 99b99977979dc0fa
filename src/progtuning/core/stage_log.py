"""The stage as loggers see it: the values every training log carries, and one console line per switch.

Every training log of a Progtuning run carries three values (:func:`stage_log_values`):

* ``progtuning_stage`` — the stage in effect (0-based, as in ``results.json``);
* ``trainable_params`` — the parameters that stage trains;
* ``updated_params`` — the parameter-epochs updated so far (the paper's measure, counted as
  :func:`~progtuning.core.counting.count_updates` counts a finished run).

They reach a logging integration (TensorBoard, W&B, MLflow, ...) through the Trainer's own
``log()``: integrations are callbacks too, and the Trainer calls them in list order, its
``report_to`` ones *before* the user's. So a callback can only add a value for the callbacks after
it; :class:`StageLogging` instead adds the values inside ``Trainer.log`` itself, before any callback
sees the log. :class:`~progtuning.runs.checkpoints.ProgtuningTrainer` mixes it in; with a plain
``Trainer`` mix it into a subclass (``class MyTrainer(StageLogging, Trainer)``), or list the
integration callbacks after :class:`~progtuning.core.callback.ProgtuningCallback` yourself.

At each switch the callback logs one line on the ``progtuning`` logger (INFO), from the main process
only (:func:`switch_line`); ``progtuning train`` shows it on the console::

    progtuning: stage 2/3 from step 40: blocks 0-1 froze; training blocks 2-5, embeddings, head (1,234,567 parameters)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

from progtuning.core.counting import count_updates

if TYPE_CHECKING:
    from progtuning.core.freezing import ProgressiveFreezer, StageChange

logger = logging.getLogger("progtuning")

STAGE_KEY = "progtuning_stage"
TRAINABLE_KEY = "trainable_params"
UPDATED_KEY = "updated_params"


def stage_log_values(
    freezer: ProgressiveFreezer, trainable_params: int, steps_per_epoch: int, total_steps: int, step: int
) -> dict:
    """The stage values of a log written after ``step`` of the run's ``total_steps`` optimizer steps."""
    if hasattr(freezer, "level_lengths"):  # the contribution schedule: the steps each level has run, from its log
        lengths = freezer.level_lengths(step)
    else:
        starts = freezer.schedule.stage_starts(steps_per_epoch, total_steps) + [total_steps]
        # the steps each stage has run so far: its planned span, cut at `step`
        lengths = [max(0, min(starts[i + 1], step) - min(starts[i], step)) for i in range(len(starts) - 1)]
    updated = count_updates(freezer, lengths, epochs=step / steps_per_epoch).updated_params if step else 0
    return {STAGE_KEY: freezer.stage_index, TRAINABLE_KEY: trainable_params, UPDATED_KEY: updated}


def is_training_log(logs: dict) -> bool:
    """A log of training steps (it has the training loss), not an evaluation's metrics or the run's summary.

    Only these get the stage values: ``Trainer.evaluate`` returns the very dict it logged.
    """
    return "loss" in logs


def with_stage_values(logs: dict, callbacks: Iterable[Any], step: int) -> dict:
    """``logs`` plus the stage values of the first ProgtuningCallback in ``callbacks`` that is running."""
    if not is_training_log(logs):
        return logs
    for callback in callbacks:
        values = getattr(callback, "log_values", None)
        extra = values(step) if callable(values) else None
        if extra:
            return {**logs, **extra}
    return logs


class StageLogging:
    """Mix into a ``transformers.Trainer`` subclass (before ``Trainer``) so that every logging
    integration receives the stage values with each training log (see the module docstring)."""

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs = with_stage_values(logs, self.callback_handler.callbacks, self.state.global_step)
        super().log(logs, *args, **kwargs)


def switch_line(change: StageChange, freezer: ProgressiveFreezer, step: int) -> str:
    """The console line for a stage switch: stage, what froze (or started training), what trains now."""
    schedule = freezer.schedule
    stage = schedule.stages[change.stage]
    head = f"progtuning: stage {change.stage + 1}/{schedule.num_stages} from step {step}"
    parts = []
    if change.previous is not None:
        before = schedule.stages[change.previous]
        froze = sorted(set(before.blocks) - set(stage.blocks))
        started = sorted(set(stage.blocks) - set(before.blocks))
        froze_names = ([f"{_plural('block', froze)} {block_ranges(froze)}"] if froze else []) + (
            ["embeddings"] if before.train_embeddings and not stage.train_embeddings else [])
        started_names = ([f"{_plural('block', started)} {block_ranges(started)}"] if started else []) + (
            ["embeddings"] if stage.train_embeddings and not before.train_embeddings else [])
        if froze_names:
            parts.append(f"{' and '.join(froze_names)} froze")
        if started_names:
            parts.append(f"{' and '.join(started_names)} started training")
    elif step > 0:
        parts.append("resumed")
    training = ([f"{_plural('block', stage.blocks)} {block_ranges(stage.blocks)}"] if stage.blocks else [])
    training += (["embeddings"] if stage.train_embeddings else []) + ["head"]
    parts.append(f"training {', '.join(training)} ({change.trainable_params:,} parameters)")
    return f"{head}: {'; '.join(parts)}"


def log_switch(change: StageChange, freezer: ProgressiveFreezer, step: int, main_process: bool = True) -> None:
    """Log :func:`switch_line` on the ``progtuning`` logger (INFO), from the main process only."""
    if main_process:
        logger.info(switch_line(change, freezer, step))


def block_ranges(blocks: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2, 5"``."""
    ranges: list[list[int]] = []
    for block in sorted(blocks):
        if ranges and block == ranges[-1][1] + 1:
            ranges[-1][1] = block
        else:
            ranges.append([block, block])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _plural(word: str, items: Iterable) -> str:
    return word if len(list(items)) == 1 else word + "s"
