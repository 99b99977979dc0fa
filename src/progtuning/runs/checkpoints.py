"""The Trainer ``progtuning train`` runs: atomic, pickle-free checkpoints and batch-mean loss scaling.

* :class:`ProgtuningTrainer` is the HF ``Trainer`` that ``progtuning train`` runs. It writes every
  checkpoint into ``OUTPUT/checkpoints/.partial-checkpoint-N/`` and renames it to
  ``checkpoint-N`` only once every file (all ranks' files) is on disk, so a kill at any moment
  leaves the last complete checkpoint as the newest ``checkpoint-N``; old checkpoints are rotated
  out only after that rename. It also refuses to commit a checkpoint whose weights are not
  finite, seals each one with a sha256 per file (``SHA256SUMS``, :mod:`progtuning.runs.integrity`)
  before the rename, and turns a full disk (or another I/O fault) while saving into one line that
  names the last good checkpoint, with no half-written folder left. Nothing in its checkpoints
  is a pickle: the optimizer, scheduler and RNG states are written as ``NAME.safetensors``
  (every tensor) + ``NAME.json`` (the structure around them, see :func:`save_state`), and
  ``training_args.json`` replaces the Trainer's ``training_args.bin``.
  The heads progtuning trains (classification, regression, QA) average their loss over the
  batch; transformers 5 treats a model whose ``forward`` takes ``**kwargs`` as one that sums
  it, which skips the division by the gradient-accumulation steps and multiplies the loss by
  the number of processes (so the weights differ from a one-process run on the same global batch).
  ``batch_mean_loss=True`` (the default) turns that off.

The rest of crash safety: the checkpoint folder on disk (:mod:`progtuning.runs.checkpoint_files`),
checks before a resume (:mod:`progtuning.runs.resume_checks`) and clean stops on a signal or a
NaN loss (:mod:`progtuning.runs.stops`).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from progtuning.core.stage_log import StageLogging
from progtuning.runs.checkpoint_files import (
    CHECKPOINT_PREFIX,
    PARTIAL_PREFIX,
    TRAINER_STATE,
    clean_partial_checkpoints,
    commit,
    fsync_tree,
    last_checkpoint,
    load_state,
    replace_pickled_training_args,
    rotate_checkpoints,
    save_state,
)
from progtuning.runs.resume_checks import check_checkpoint
from progtuning.runs.sharded_trainer import ShardedTraining
from progtuning.runs.integrity import write_checksums
from progtuning.runs.output_dir import io_error, is_io_fault
from progtuning.runs.stops import NonFiniteLoss

# The checkpoint helpers stay importable from here, as before the split.
__all__ = [
    "ProgtuningTrainer",
    "check_checkpoint",
    "clean_partial_checkpoints",
    "last_checkpoint",
    "load_state",
    "rotate_checkpoints",
    "save_state",
]

logger = logging.getLogger("progtuning")


class ProgtuningTrainer(StageLogging, ShardedTraining, Trainer):
    """``transformers.Trainer`` with atomic checkpoints and batch-mean loss scaling (see the module docstring);
    every logging integration receives the stage with each training log (:class:`StageLogging`).

    A model sharded by FSDP2 before the Trainer was built gets sharded checkpoints (:class:`ShardedTraining`).
    """

    def __init__(self, *args: Any, batch_mean_loss: bool = True, seal: Callable[[str], None] | None = None,
                 lr_scheduler_factory=None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Called with each finished checkpoint folder before it is renamed into place; the last thing written
        # into it. Default: a sha256 per file (progtuning.runs.integrity), verified on resume.
        self._seal = seal or write_checksums
        if batch_mean_loss:
            # The model's loss is a mean over its batch: divide by the accumulation steps, and let DDP
            # average over the ranks, exactly as for a model without **kwargs in its forward.
            self.model_accepts_loss_kwargs = False
        self._staging_root: str | None = None
        # (optimizer, num_training_steps) -> scheduler, instead of the one TrainingArguments names
        # (lr_schedule: per_stage, see progtuning.core.lr_schedule)
        self._lr_scheduler_factory = lr_scheduler_factory

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None and self._lr_scheduler_factory is not None:
            self.lr_scheduler = self._lr_scheduler_factory(optimizer or self.optimizer, num_training_steps)
            self._created_lr_scheduler = True  # so that a second train() builds a fresh one, as the Trainer does
        return super().create_scheduler(num_training_steps, optimizer)

    # -- optimizer, scheduler and RNG state as safetensors + JSON ------------------------------------
    def _plain_state(self) -> bool:
        """Plain (DDP or single) runs: their states are ordinary state dicts. Others keep the Trainer's files."""
        from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available()
                    or is_sagemaker_mp_enabled())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.sharded or not self._plain_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            try:
                save_state(self.optimizer.state_dict(), output_dir, "optimizer")
                save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")
            except TypeError as error:  # an exotic optimizer state: the Trainer's torch.save files instead
                logger.warning("optimizer state saved with torch.save (%s)", error)
                for name in ("optimizer", "scheduler"):
                    for suffix in (".json", ".safetensors"):
                        Path(output_dir, name + suffix).unlink(missing_ok=True)
                super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self.sharded or not self._plain_state() or not os.path.isfile(os.path.join(checkpoint, "optimizer.json")):
            return super()._load_optimizer_and_scheduler(checkpoint)  # torch.save files, weights_only=True
        on_device = self.args.world_size > 1 and self.args.device.type != "cpu"  # as the Trainer does
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer", self.args.device if on_device else "cpu"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._plain_state() or _other_accelerator():
            return super()._save_rng_state(output_dir)
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all() if self._distributed() else torch.cuda.random.get_rng_state()
        os.makedirs(output_dir, exist_ok=True)  # a rank can get here before rank 0 created the folder
        save_state(states, output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not self._plain_state() or not os.path.isfile(os.path.join(checkpoint, self._rng_name() + ".json")):
            return super()._load_rng_state(checkpoint)
        states = load_state(checkpoint, self._rng_name())
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            from transformers.trainer_pt_utils import set_rng_state_for_device

            set_rng_state_for_device("CUDA", torch.cuda, states, self._distributed())

    def _distributed(self) -> bool:
        from transformers.training_args import ParallelMode

        return self.args.parallel_mode == ParallelMode.DISTRIBUTED

    # -- atomic checkpoints ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            replace_pickled_training_args(output_dir if output_dir is not None else self.args.output_dir, self.args)

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, PARTIAL_PREFIX + name)
        _check_finite_weights(self.model, self.state.global_step, run_dir)
        writer = self.args.should_save
        if writer and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while writing this very checkpoint
        _barrier()
        # The Trainer writes staging/checkpoint-N/ (every rank its RNG file), then rotates inside staging.
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
            _barrier()  # every rank's files are written
            if writer:
                written = os.path.join(staging, name)
                if self.state.best_model_checkpoint == written:
                    self.state.best_model_checkpoint = final
                    self.state.save_to_json(os.path.join(written, TRAINER_STATE))
                self._seal(written)
                fsync_tree(written)
        except OSError as error:
            if not is_io_fault(error):
                raise
            if writer:
                shutil.rmtree(staging, ignore_errors=True)  # never a half-written checkpoint
            last = last_checkpoint(run_dir)
            keep = f"the last good checkpoint, {last}, is intact" if last else "no checkpoint was written yet"
            fix = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make the folder writable"
            raise io_error(error, f"cannot write {name} (training stopped at step {self.state.global_step})",
                           f"{keep}; {fix}, then resume with --resume") from None
        finally:
            self._staging_root = None
        if writer:
            commit(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        elif self.state.best_model_checkpoint == os.path.join(staging, name):
            self.state.best_model_checkpoint = final
        _barrier()  # nobody reads or resumes before the rename


def _other_accelerator() -> bool:
    """NPU/HPU/MLU/MUSA/XLA keep RNG states the Trainer knows how to save: leave those runs to it."""
    from transformers import utils

    names = ("is_torch_npu_available", "is_torch_hpu_available", "is_torch_mlu_available", "is_torch_musa_available",
             "is_torch_xla_available")
    return any(getattr(utils, name, lambda: False)() for name in names)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_finite_weights(model: torch.nn.Module, step: int, run_dir: str) -> None:
    bad = next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:
        last = last_checkpoint(run_dir)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise NonFiniteLoss(
            f"weight {bad} is not finite after step {step}: the checkpoint was not saved and training stopped; "
            f"{keep} (lower learning_rate or check the data, then resume)"
        )
