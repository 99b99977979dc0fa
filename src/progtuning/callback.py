"""A thin Hugging Face ``TrainerCallback`` over :class:`~progtuning.freezing.ProgressiveFreezer`.

Drop it into any ``Trainer``::

    trainer = Trainer(model, args, train_dataset=..., callbacks=[ProgtuningCallback()])

* The freezer is built at ``on_train_begin``, after the Trainer created its optimizer over
  every parameter that requires grad — nothing is frozen before that.
* The stage is re-derived from ``state.global_step`` before every optimizer update
  (``on_step_begin`` runs once per update, so gradient accumulation is respected), which also
  makes ``resume_from_checkpoint`` re-apply the right stage.
* Each log line gets ``progtuning_stage`` and ``trainable_params``.
* ``on_save`` writes ``progtuning_state.json`` into the checkpoint folder (schedule, layout,
  stage); a resume checks the checkpoint was made by the same schedule on the same model.

We deliberately don't use the Trainer's ``ExportableState``: on resume it rebuilds the callback
from the checkpoint's arguments, which would silently replace the user's schedule with the old one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from transformers import TrainerCallback

from .blocks import find_blocks
from .errors import ProgtuningError
from .freezing import ProgressiveFreezer, StageChange
from .schedule import EmbeddingPolicy, Schedule, Unit, progressive

STATE_FILE = "progtuning_state.json"


@dataclass
class StageRecord:
    """What happened in one stage of a real run (filled in as training goes)."""

    stage: int
    start_step: int
    end_step: int | None = None
    trainable_params: int = 0
    start_time: float = field(default_factory=time.perf_counter)
    wall_time_s: float | None = None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "trainable_params": self.trainable_params,
            "wall_time_s": self.wall_time_s,
            "mean_train_loss": sum(self.losses) / len(self.losses) if self.losses else None,
        }


class ProgtuningCallback(TrainerCallback):
    """Progressive freezing for the HF Trainer.

    Give a ready :class:`Schedule`, or let the callback build the paper's preset from the model
    at train start: ``num_stages`` parts (default: the run's number of epochs), the embedding
    policy and the stage unit.
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        *,
        num_stages: int | None = None,
        embeddings: EmbeddingPolicy = "always",
        unit: Unit = "epoch",
        blocks: str | list[str] | None = None,
        eval_frozen_blocks: bool = True,
    ) -> None:
        self.schedule = schedule
        self.num_stages = num_stages
        self.embeddings = embeddings
        self.unit = unit
        self.blocks = blocks
        self.eval_frozen_blocks = eval_frozen_blocks
        self.freezer: ProgressiveFreezer | None = None
        self.steps_per_epoch = 1
        self.total_steps = 0
        self.records: list[StageRecord] = []
        self.changes: list[StageChange] = []

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.total_steps = state.max_steps
        self.steps_per_epoch = _updates_per_epoch(train_dataloader, args, state)
        layout = find_blocks(model, blocks=self.blocks)
        if self.schedule is None:
            stages = self.num_stages or max(1, int(round(args.num_train_epochs)))
            self.schedule = progressive(layout.num_blocks, stages, self.embeddings, self.unit)
        if self.freezer is not None:
            self.freezer.close()
        self.freezer = ProgressiveFreezer(model, self.schedule, layout, eval_frozen_blocks=self.eval_frozen_blocks)
        if state.global_step > 0:
            self._check_resume(args, state)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        change = self.freezer.apply_for_step(state.global_step, self.steps_per_epoch, self.total_steps, optimizer)
        if change is None:
            return
        if change.stage != change.previous:
            self._close_record(state.global_step)
            self.records.append(StageRecord(change.stage, state.global_step, trainable_params=change.trainable_params))
        self.changes.append(change)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.freezer is None or self.freezer.stage_index is None or logs is None:
            return
        extra = {"progtuning_stage": self.freezer.stage_index, "trainable_params": self.records[-1].trainable_params}
        if "loss" in logs and self.records:
            self.records[-1].losses.append(float(logs["loss"]))
        logs.update(extra)
        # The Trainer appended its own copy of `logs` to the history before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder) or not state.is_world_process_zero:
            return
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(self.state_dict(state.global_step), f, indent=2)

    def on_train_end(self, args, state, control, **kwargs):
        self._close_record(state.global_step)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self, global_step: int) -> dict:
        return {
            "global_step": global_step,
            "stage": self.freezer.stage_index,
            "schedule": self.schedule.to_dict(),
            "schedule_fingerprint": self.schedule.fingerprint(),
            "block_paths": list(self.freezer.layout.block_paths),
            "method_trainable": len(self.freezer.method_trainable),
        }

    def stage_records(self) -> list[dict]:
        return [record.to_dict() for record in self.records]

    def _check_resume(self, args, state) -> None:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.exists(path):
            return  # a checkpoint from a run without progtuning, or one the user moved: nothing to check
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ProgtuningError(f"cannot read {path} ({error}): the checkpoint is corrupt, resume from an earlier one")
        if saved.get("schedule_fingerprint") != self.schedule.fingerprint():
            raise ProgtuningError(
                f"the checkpoint at step {state.global_step} was made with another schedule "
                f"({saved.get('schedule')}): resume with the same schedule, or start a new run in a new output folder"
            )
        if saved.get("block_paths") != list(self.freezer.layout.block_paths):
            raise ProgtuningError(
                "the checkpoint was made on a model with other blocks: resume with the same model and method"
            )

    def _close_record(self, step: int) -> None:
        if self.records and self.records[-1].end_step is None:
            record = self.records[-1]
            record.end_step = step
            record.wall_time_s = time.perf_counter() - record.start_time


def _updates_per_epoch(train_dataloader, args, state) -> int:
    """Optimizer updates per epoch, computed the way the Trainer computes it."""
    if train_dataloader is not None:
        try:
            batches = len(train_dataloader)
        except TypeError:
            batches = None
        if batches:
            accumulation = args.gradient_accumulation_steps
            return max(batches // accumulation + int(batches % accumulation > 0), 1)
    # An iterable dataset without a length: the Trainer runs max_steps as one "epoch".
    return max(state.max_steps, 1)
