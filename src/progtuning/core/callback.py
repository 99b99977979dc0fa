"""A thin Hugging Face ``TrainerCallback`` over :class:`~progtuning.core.freezing.ProgressiveFreezer`.

Drop it into any ``Trainer``::

    trainer = Trainer(model, args, train_dataset=..., callbacks=[ProgtuningCallback()])

* The freezer is built at ``on_train_begin``, after the Trainer created its optimizer over
  every parameter that requires grad — nothing is frozen before that. A run in which some
  stage would get no optimizer step is refused there, in one line.
* The stage is re-derived from ``state.global_step`` before every optimizer update
  (``on_step_begin`` runs once per update, so gradient accumulation is respected), which also
  makes ``resume_from_checkpoint`` re-apply the right stage.
* Each training log gets ``progtuning_stage``, ``trainable_params`` and ``updated_params`` (so far),
  and each switch one console line (:mod:`progtuning.core.stage_log`, which also says how logging
  integrations such as TensorBoard receive them); :meth:`ProgtuningCallback.stage_records`
  says which stage ran over which steps (with its trainable parameters and mean logged loss).
  What each stage cost in time and memory is measured by
  :class:`~progtuning.core.telemetry.StageTelemetry`, a separate callback.
* The schedule, block layout and current stage travel in every checkpoint's
  ``trainer_state.json`` (``stateful_callbacks["progtuning"]``); a resume checks the checkpoint
  was made by the same schedule on the same model.
* ``schedule="contribution"`` (or a :class:`~progtuning.core.contribution.ContributionPolicy`)
  decides during the run which lowest blocks freeze, from signals measured around the optimizer
  step (``on_pre_optimizer_step`` / ``on_optimizer_step``); the signal state and the decision log
  travel in the same checkpoint entry, so a resumed run decides exactly as an uninterrupted one.

That entry is deliberately not an ``ExportableState`` (keyed by class name): with
``restore_callback_states_from_checkpoint`` the Trainer would rebuild the callback from the
checkpoint's arguments and silently replace the user's schedule with the old one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainerCallback

from progtuning.core.blocks import TiedHead, find_blocks
from progtuning.core.contribution import ContributionPolicy
from progtuning.core.contribution_freezer import ContributionFreezer
from progtuning.core.distributed import check_trainer_parallelism
from progtuning.core.fsdp import ShardedFreezer, is_sharded
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer, StageChange
from progtuning.core.presets import get_preset
from progtuning.core.schedule import EmbeddingPolicy, Schedule, Unit, progressive
from progtuning.core.stage_log import is_training_log, log_switch, stage_log_values

# Our entry in TrainerState.stateful_callbacks: it is saved in every checkpoint's trainer_state.json and
# comes back with it on resume, wherever the checkpoint lies (not a callback class name, so the Trainer
# never rebuilds the callback from it).
STATE_KEY = "progtuning"


@dataclass
class StageRecord:
    """Which steps one stage of a real run covered (filled in as training goes)."""

    stage: int
    start_step: int
    end_step: int | None = None
    trainable_params: int = 0
    losses: list[float] = field(default_factory=list)  # the training losses logged in this stage

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "trainable_params": self.trainable_params,
            "mean_train_loss": sum(self.losses) / len(self.losses) if self.losses else None,
        }


class ProgtuningCallback(TrainerCallback):
    """Progressive freezing for the HF Trainer.

    Give a ready :class:`Schedule`, or let the callback build the paper's preset from the model
    at train start: ``num_stages`` parts (default: the run's number of epochs) with equal shares of
    the run, the embedding policy and the stage unit. ``schedule="contribution"`` (with
    ``target_reduction``) or a :class:`ContributionPolicy` freezes by measured contribution instead.
    ``preset`` names the settings the paper leaves open (:mod:`progtuning.core.presets`: the default,
    or ``"paper"``); ``embeddings`` and ``eval_frozen_blocks`` given here win over it.
    ``tied_head`` places an input embedding tied to the output head
    (GPT-2, tied Llama/Qwen2, T5 LM heads): "head" trains it in every stage, "embeddings" makes it
    follow the embedding policy.
    """

    def __init__(
        self,
        schedule: Schedule | ContributionPolicy | str | None = None,
        *,
        target_reduction: float | None = None,
        num_stages: int | None = None,
        preset: str | None = None,
        embeddings: EmbeddingPolicy | None = None,
        unit: Unit = "epoch",
        blocks: str | list[str] | None = None,
        eval_frozen_blocks: bool | None = None,
        tied_head: TiedHead = "head",
        allow_empty_stages: bool = False,
    ) -> None:
        self.policy = _contribution_policy(schedule, target_reduction)
        self.schedule = None if self.policy is not None else schedule
        self.num_stages = num_stages
        chosen = get_preset(preset).under(embeddings=embeddings, eval_frozen_blocks=eval_frozen_blocks)
        self.embeddings = chosen["embeddings"]
        self.unit = unit
        self.blocks = blocks
        self.eval_frozen_blocks = chosen["eval_frozen_blocks"]
        self.tied_head = tied_head
        # only for runs that time a few steps on purpose (progtuning bench): a stage never reached
        self.allow_empty_stages = allow_empty_stages
        self.freezer: ProgressiveFreezer | None = None
        self.distributed_mode: str | None = None  # "single", "ddp" or "fsdp", set at train start
        self.steps_per_epoch = 1
        self.total_steps = 0
        self.records: list[StageRecord] = []
        self.changes: list[StageChange] = []

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.total_steps = state.max_steps
        self.steps_per_epoch = _updates_per_epoch(train_dataloader, args, state)
        layout = find_blocks(model, blocks=self.blocks, tied_head=self.tied_head)
        if self.schedule is None and self.policy is None:
            # The run's epochs as the Trainer counts them (max_steps wins over num_train_epochs).
            epochs = self.total_steps / self.steps_per_epoch
            stages = self.num_stages or max(1, math.ceil(epochs))
            self.schedule = progressive(layout.num_blocks, stages, self.embeddings, self.unit, epochs=epochs or None)
        # The contribution schedule decides during the run; most of its prefix ladder may never run.
        if self.policy is None and not self.allow_empty_stages:
            self.schedule.check_every_stage_runs(self.steps_per_epoch, self.total_steps)
        if self.freezer is not None:
            # A second train(): hand back what the last run froze, or the new freezer would take it
            # for frozen by the method and never train it again.
            self.freezer.restore()
            self.freezer.close()
        if self.policy is not None:
            if is_sharded(model):
                # its signals read whole parameters on every rank; FSDP2 holds shards
                raise ProgtuningError(
                    "the contribution schedule does not run on a model sharded by FSDP: use DDP, or schedule: fixed"
                )
            self.freezer = ContributionFreezer(model, self.policy, layout, embeddings=self.embeddings,
                                               eval_frozen_blocks=self.eval_frozen_blocks)
            self.schedule = self.freezer.schedule
            self.freezer.start(self.total_steps)
        # Several processes: DDP needs find_unused_parameters, FSDP one unit per block, DeepSpeed is refused.
        self.distributed_mode = check_trainer_parallelism(args, model, self.schedule)
        if self.policy is None:
            # A model sharded by FSDP2 switches its sharded parameters (see fsdp.py).
            freezer_class = ShardedFreezer if is_sharded(model) else ProgressiveFreezer
            self.freezer = freezer_class(model, self.schedule, layout, eval_frozen_blocks=self.eval_frozen_blocks)
        if state.global_step > 0:
            self._check_resume(args, state)
        state.stateful_callbacks[STATE_KEY] = self._resume_check_data()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        change = self.freezer.apply_for_step(state.global_step, self.steps_per_epoch, self.total_steps, optimizer)
        if change is None:
            return
        if change.stage != change.previous:
            state.stateful_callbacks[STATE_KEY] = self._resume_check_data()
            self._close_record(state.global_step)
            self.records.append(StageRecord(change.stage, state.global_step, trainable_params=change.trainable_params))
            log_switch(change, self.freezer, state.global_step, state.is_world_process_zero)
        self.changes.append(change)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if isinstance(self.freezer, ContributionFreezer):
            self.freezer.before_optimizer_step(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if isinstance(self.freezer, ContributionFreezer):
            self.freezer.after_optimizer_step(state.global_step)
            # kept current, so whichever step a checkpoint is written at holds the signals up to it
            state.stateful_callbacks[STATE_KEY] = self._resume_check_data()

    def on_log(self, args, state, control, logs=None, **kwargs):
        extra = self.log_values(state.global_step)
        if extra is None or logs is None:
            return
        if "loss" in logs and self.records:
            self.records[-1].losses.append(float(logs["loss"]))
        if is_training_log(logs):  # for the callbacks after this one (evaluate() returns its logs: untouched)
            logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        self._close_record(state.global_step)

    # -- state -----------------------------------------------------------------------------------
    def log_values(self, step: int) -> dict | None:
        """The stage values a log after optimizer ``step`` carries; None before training starts."""
        if self.freezer is None or self.freezer.stage_index is None or not self.records:
            return None
        return stage_log_values(self.freezer, self.records[-1].trainable_params, self.steps_per_epoch,
                                self.total_steps, step)

    def stage_records(self) -> list[dict]:
        return [record.to_dict() for record in self.records]

    def _resume_check_data(self) -> dict:
        data = {
            "stage": self.freezer.stage_index,
            "schedule": self.schedule.to_dict(),
            "schedule_fingerprint": self.schedule.fingerprint(),
            "block_paths": list(self.freezer.layout.block_paths),
        }
        if isinstance(self.freezer, ContributionFreezer):
            data["contribution"] = self.freezer.state_dict()
        return data

    def _check_resume(self, args, state) -> None:
        # `state` was loaded from the checkpoint's trainer_state.json, wherever the checkpoint lies.
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        check_resume_entry(saved, self.schedule, self.freezer.layout.block_paths,
                           f"the checkpoint at step {state.global_step}")
        if isinstance(saved, dict) and isinstance(self.freezer, ContributionFreezer) and "contribution" in saved:
            self.freezer.load_state_dict(saved["contribution"])


    def _close_record(self, step: int) -> None:
        if self.records and self.records[-1].end_step is None:
            self.records[-1].end_step = step


def check_resume_entry(saved, schedule: Schedule | None, block_paths, checkpoint: str) -> None:
    """Refuse, with one line, to resume from a checkpoint made with another model or another schedule.

    ``saved`` is the callback's entry in the checkpoint's ``trainer_state.json`` (``None``: a checkpoint
    of a run without Progtuning, nothing to compare); ``checkpoint`` names it in the message. Used by the
    callback as the Trainer resumes and by ``progtuning train --resume`` before anything loads.
    ``schedule`` / ``block_paths`` of ``None`` skip that comparison.
    """
    if not isinstance(saved, dict):
        return
    if block_paths is not None and saved.get("block_paths") != list(block_paths):
        raise ProgtuningError(
            f"{checkpoint} was made with another model ({len(saved.get('block_paths') or [])} blocks, this "
            f"one has {len(block_paths)}): resume with the same model and method, or start a new run"
        )
    if schedule is not None and saved.get("schedule_fingerprint") != schedule.fingerprint():
        old = saved.get("schedule") or {}
        raise ProgtuningError(
            f"{checkpoint} was made with another schedule ({old.get('name')}, {len(old.get('stages', []))} "
            f"stages; this run: {schedule.name}, {schedule.num_stages}): resume with the same schedule, or start a "
            "new run in a new output folder"
        )


def _contribution_policy(schedule, target_reduction: float | None) -> ContributionPolicy | None:
    if isinstance(schedule, ContributionPolicy):
        if target_reduction is not None:
            raise ProgtuningError("give target_reduction inside the ContributionPolicy, not beside it")
        return schedule
    if schedule == "contribution":
        return ContributionPolicy(target_reduction=target_reduction)
    if isinstance(schedule, str):
        raise ProgtuningError(f"unknown schedule {schedule!r}: give a Schedule, 'contribution' or a ContributionPolicy")
    if target_reduction is not None:
        raise ProgtuningError("target_reduction needs schedule='contribution'")
    return None


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
