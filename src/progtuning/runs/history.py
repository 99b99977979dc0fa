"""The whole run's stage table and training loss, carried through checkpoints so a resume reports all of it.

:class:`~progtuning.core.callback.ProgtuningCallback` records the stages it saw in this process;
after a resume that is only the part after the checkpoint. :class:`RunHistory` puts the stage
records into every checkpoint's ``trainer_state.json`` (``stateful_callbacks["progtuning_history"]``)
and, on resume, joins them with the new ones (:meth:`RunHistory.stages`): a stage cut by the
checkpoint becomes one record again (steps, wall time and logged losses added up, peaks the max).

The Trainer's ``training_loss`` is the mean over the steps of this ``train()`` call only.
:func:`whole_run_loss` adds the steps before the resume from ``log_history``, which comes back
with the checkpoint. That is exact because :class:`RunHistory` has the Trainer log right before
every save, so no step before a checkpoint is missing from the log.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

HISTORY_KEY = "progtuning_history"


class RunHistory(TrainerCallback):
    """Keep the stage records in every checkpoint; put it after the callbacks that ask for saves."""

    def __init__(self, progtuning, telemetry) -> None:
        self.progtuning = progtuning  # the ProgtuningCallback whose records this extends
        self.telemetry = telemetry  # the StageTelemetry that measured each stage's time and memory
        self.previous: list[dict] = []
        self.resumed_from: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(HISTORY_KEY) if state.global_step > 0 else None
        self.previous = [dict(r) for r in saved.get("stages", [])] if isinstance(saved, dict) else []
        self.resumed_from = state.global_step or None

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(state, control)

    def _before_save(self, state, control) -> None:
        if not control.should_save:
            return
        control.should_log = True  # the steps since the last log are logged before the checkpoint (see above)
        state.stateful_callbacks[HISTORY_KEY] = {"stages": self.stages(state.global_step)}

    def stages(self, step: int | None = None) -> list[dict]:
        """Stage records of the whole run (before and after any resume), each with its logged ``losses``."""
        now = time.perf_counter()
        costs = {(cost.stage, cost.start_step): cost for cost in self.telemetry.costs}
        current = []
        for record in self.progtuning.records:
            cost = costs.get((record.stage, record.start_step))
            entry = {**record.to_dict(), "losses": list(record.losses),
                     "wall_time_s": None, "peak_rss_mb": 0.0, "peak_gpu_mb": None, **(cost.to_dict() if cost else {})}
            if record.end_step is None:  # the open stage, as of now
                entry["end_step"] = step
                if cost is not None and cost.wall_time_s is None:
                    entry["wall_time_s"] = now - cost.start_time
            current.append(entry)
        merged = [dict(r) for r in self.previous]
        for entry in current:
            last = merged[-1] if merged else None
            if last is not None and last["stage"] == entry["stage"] and last.get("end_step") == entry["start_step"]:
                merged[-1] = _join(last, entry)
            else:
                merged.append(entry)
        return merged


def _join(first: dict, second: dict) -> dict:
    losses = list(first.get("losses") or []) + list(second.get("losses") or [])
    joined = dict(first)
    joined.update(
        end_step=second["end_step"],
        wall_time_s=(first.get("wall_time_s") or 0.0) + (second.get("wall_time_s") or 0.0),
        losses=losses,
        mean_train_loss=sum(losses) / len(losses) if losses else None,
        peak_rss_mb=max(first.get("peak_rss_mb") or 0.0, second.get("peak_rss_mb") or 0.0),
        peak_gpu_mb=_max_or_none(first.get("peak_gpu_mb"), second.get("peak_gpu_mb")),
    )
    return joined


def _max_or_none(a, b):
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def whole_run_loss(log_history: list[dict], resumed_from: int | None, session_loss: float, global_step: int) -> float:
    """The mean training loss over every step of the run, resumed or not (see the module docstring)."""
    if not resumed_from:
        return session_loss
    total, covered = 0.0, 0
    for entry in log_history:
        step = entry.get("step")
        if "loss" in entry and isinstance(step, int) and covered < step <= resumed_from:
            total += float(entry["loss"]) * (step - covered)  # a logged loss is the mean since the last log
            covered = step
    steps_after = global_step - resumed_from
    # A checkpoint from a run that did not log right before saving leaves a gap: the mean over what is known.
    return (total + session_loss * steps_after) / max(covered + steps_after, 1)
