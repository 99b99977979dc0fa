"""The HF Trainer's side of a model that progtuning sharded with FSDP2 (one unit per block).

:class:`ShardedTraining` is mixed into :class:`~progtuning.runs.checkpoints.ProgtuningTrainer`;
it does nothing unless the model handed to the Trainer is already sharded
(:func:`progtuning.core.fsdp.shard_by_block`, which ``progtuning train --fsdp`` calls). Then:

* The model owns its sharding and its gradient reduction, the route transformers 5 takes for a
  model sharded when it was loaded (``is_distributed_loading_by_transformers``): accelerate
  neither wraps it in DDP nor shards it again, and gradient accumulation turns FSDP2's gradient
  sync off for all micro-batches but the last. Why not accelerate's FSDP plugin: accelerate
  1.15 enables FSDP only for GPU-like devices; on CPU processes ``fsdp=True`` silently runs DDP
  (measured), and a model it did not shard itself is refused by its DDP wrapper.
* Checkpoints are sharded and pickle-free (:mod:`progtuning.core.sharded_checkpoint`): model and
  optimizer in ``checkpoint-N/sharded/``, scheduler and per-rank RNG state as JSON +
  safetensors, all inside ProgtuningTrainer's atomic ``.partial-checkpoint-N`` staging.
* ``save_model`` outside a checkpoint gathers the full state dict unit by unit to rank 0's CPU
  and writes an ordinary ``save_pretrained`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from progtuning.core.fsdp import full_state_dict, gradient_sync_off, is_sharded
from progtuning.core.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_sharded_model,
    load_sharded_optimizer,
    save_sharded,
)
from progtuning.errors import ProgtuningError

SHARDED = "sharded"  # checkpoint-N/sharded/: the model's and the optimizer's shards


class ShardedTraining:
    """Trainer overrides for a model sharded before the Trainer was built (see the module docstring)."""

    sharded = False  # set once the Trainer is built; False until then, so nothing here runs early

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sharded = is_sharded(self.model)
        if self.sharded:
            # Set on the Trainer, not the model: the Trainer would otherwise refuse checkpoints for such a model,
            # which ours are (sharded, below).
            self.is_distributed_loading_by_transformers = True

    def _defer_fsdp_gradient_reduction(self):
        if not self.sharded:
            return super()._defer_fsdp_gradient_reduction()
        return gradient_sync_off(self.model)

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:  # a checkpoint: the weights go with the optimizer, sharded (_save_optimizer_and_scheduler)
            if self.args.save_only_model:
                save_sharded(Path(output_dir) / SHARDED, self.model)
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                _config_owner(self.model).config.save_pretrained(output_dir)
            return
        state = full_state_dict(self.model)  # every rank takes part; rank 0 receives the whole model on CPU
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        from progtuning.runs.checkpoints import save_state

        save_sharded(Path(output_dir) / SHARDED, self.model, self.optimizer)
        if self.args.should_save:
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        folder = Path(resume_from_checkpoint) / SHARDED
        if not is_sharded_checkpoint(folder):
            raise ProgtuningError(
                f"checkpoint {resume_from_checkpoint} was written without FSDP (no {SHARDED}/): resume it without "
                "--fsdp, or start a new run"
            )
        load_sharded_model(folder, self.model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from progtuning.runs.checkpoints import load_state

        load_sharded_optimizer(Path(checkpoint) / SHARDED, self.model, self.optimizer)
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))


def _config_owner(model):
    """The transformers model whose config describes ``model`` (peft wraps it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base


# -------------------------------------------------------------------------------------------------
# progtuning train --fsdp: what is checked before anything loads
# -------------------------------------------------------------------------------------------------
def check_fsdp_config(config) -> None:
    """One line for a ``--fsdp`` run that cannot work: one process, or the frozen-prefix cache."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes < 2:
        raise ProgtuningError(
            "--fsdp shards the model across processes, but this is one process: launch with torchrun "
            "--nproc_per_node N (N >= 2; --nnodes for several machines) or accelerate launch --multi_gpu "
            "--num_processes N"
        )
    if config.cache_frozen is True:  # asked for; a preset's "where it can" (None) just stays off
        raise ProgtuningError(
            "--cache-frozen does not work with --fsdp (the cache runs the frozen blocks outside FSDP's all-gathers): "
            "drop one of the two"
        )


def check_same_sharding(checkpoint: str | Path, fsdp: bool) -> None:
    """One line if a checkpoint is resumed with ``--fsdp`` when it was written without it, or the reverse."""
    written_sharded = (Path(checkpoint) / SHARDED).is_dir()
    if written_sharded != fsdp:
        how = "with --fsdp" if written_sharded else "without --fsdp"
        raise ProgtuningError(f"checkpoint {checkpoint} was written {how}: resume it {how}, or start a new run")
