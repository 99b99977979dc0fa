"""Progtuning in PyTorch Lightning: a ``BaseFinetuning`` callback that drives the same :class:`ProgressiveFreezer`.

::

    from lightning.pytorch import Trainer
    from progtuning.integrations.lightning import ProgtuningFinetuning

    trainer = Trainer(max_epochs=3, callbacks=[ProgtuningFinetuning()])   # T = max_epochs stages
    trainer.fit(module)                                                   # module.model: the HF model

How it maps onto Lightning's finetuning hooks:

* ``freeze_before_training`` (before ``configure_optimizers``) freezes *nothing*: Progtuning only
  ever freezes, so the optimizer must hold every parameter the fine-tuning method trains from the
  start. It finds the blocks, builds the schedule (the paper's split over ``max_epochs`` stages,
  with the preset's embedding policy, unless one is given) and the freezer, which captures that trainable set.
* ``finetune_function`` (every epoch start) applies the stage of that epoch: parameters that stop
  training get ``requires_grad=False`` and ``.grad = None`` and lose their optimizer state; frozen
  blocks run in eval mode. With ``unit="fraction"`` the stage follows the optimizer step instead.
* The stage is re-derived from the epoch (or step), so resuming from a checkpoint (``ckpt_path``)
  applies the right stage; the checkpoint records the schedule's fingerprint, and a resume with
  another schedule or model is refused in one line.

The model is ``module.model`` when the LightningModule has one (the usual wrapper around a
transformers model), else the module itself; ``model_attr`` names another attribute. Each training
step logs ``progtuning_stage`` and ``trainable_params`` through ``module.log``, and each switch one
line on the ``progtuning`` logger, as with the HF Trainer.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from progtuning.core.blocks import find_blocks
from progtuning.core.freezing import ProgressiveFreezer, release_optimizer_state
from progtuning.core.presets import get_preset
from progtuning.core.schedule import EmbeddingPolicy, Schedule, Unit, progressive
from progtuning.core.stage_log import log_switch
from progtuning.errors import ProgtuningError


class ProgtuningFinetuning(BaseFinetuning):
    """Progressive freezing for a Lightning ``Trainer`` (see the module docstring)."""

    def __init__(
        self,
        schedule: Schedule | None = None,
        *,
        num_stages: int | None = None,
        preset: str | None = None,
        embeddings: EmbeddingPolicy | None = None,
        unit: Unit = "epoch",
        blocks: str | list[str] | None = None,
        model_attr: str | None = None,
        eval_frozen_blocks: bool | None = None,
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.num_stages = num_stages
        # the settings the paper leaves open; explicit arguments win
        chosen = get_preset(preset).under(embeddings=embeddings, eval_frozen_blocks=eval_frozen_blocks)
        self.embeddings = chosen["embeddings"]
        self.unit = unit
        self.blocks = blocks
        self.model_attr = model_attr
        self.eval_frozen_blocks = chosen["eval_frozen_blocks"]
        self.freezer: ProgressiveFreezer | None = None
        self._max_epochs: int | None = None
        self._saved: dict | None = None  # the schedule a checkpoint was made with, until it is compared

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module) -> None:
        model = self._model(pl_module)
        layout = find_blocks(model, blocks=self.blocks)
        if self.schedule is None:
            stages = self.num_stages or self._max_epochs
            if not stages:
                raise ProgtuningError("ProgtuningFinetuning needs num_stages, or a Trainer with max_epochs")
            self.schedule = progressive(layout.num_blocks, stages, self.embeddings, self.unit)
        if self.freezer is not None:  # a second fit(): hand back what the last one froze
            self.freezer.restore()
            self.freezer.close()
        # Nothing is frozen here: configure_optimizers comes next and must see the whole trainable set.
        self.freezer = ProgressiveFreezer(model, self.schedule, layout, eval_frozen_blocks=self.eval_frozen_blocks)
        self._check_saved()

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        if self.schedule.unit == "epoch":  # one stage per epoch: the epoch is the "step", one per epoch
            self._apply(epoch, 1, max(self._max_epochs or 0, epoch + 1), optimizer, pl_module.trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.schedule.unit != "epoch":  # fractions of all optimizer steps
            total = max(int(trainer.estimated_stepping_batches), 1)
            for optimizer in trainer.optimizers:
                self._apply(trainer.global_step, total, total, optimizer, trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.freezer is not None and self.freezer.stage_index is not None:
            trainable = sum(p.numel() for p in self.freezer.params.values() if p.requires_grad)
            pl_module.log_dict({"progtuning_stage": float(self.freezer.stage_index),
                                "trainable_params": float(trainable)}, on_step=True, on_epoch=False)

    # -- state in the checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.freezer is not None:
            state["progtuning"] = {
                "stage": self.freezer.stage_index,
                "schedule": self.schedule.to_dict(),
                "schedule_fingerprint": self.schedule.fingerprint(),
                "block_paths": list(self.freezer.layout.block_paths),
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._saved = state_dict.pop("progtuning", None)
        super().load_state_dict(state_dict)
        if self.freezer is not None:
            self._check_saved()

    # -- helpers -------------------------------------------------------------------------------
    def _model(self, pl_module) -> nn.Module:
        if self.model_attr:
            return getattr(pl_module, self.model_attr)
        inner = getattr(pl_module, "model", None)
        return inner if isinstance(inner, nn.Module) else pl_module

    def _check_saved(self) -> None:
        from progtuning.core.callback import check_resume_entry

        if self._saved is not None:
            check_resume_entry(self._saved, self.schedule, self.freezer.layout.block_paths, "the checkpoint")
            self._saved = None

    def _apply(self, step: int, steps_per_epoch: int, total_steps: int, optimizer, trainer) -> None:
        freezer = self.freezer
        change = freezer.apply_for_step(step, steps_per_epoch, total_steps, optimizer)
        if change is not None and change.stage != change.previous:
            log_switch(change, freezer, trainer.global_step, trainer.is_global_zero)
        # several optimizers: each drops the state of what no longer trains
        frozen = [freezer.params[n] for n in freezer.method_trainable if not freezer.params[n].requires_grad]
        release_optimizer_state(optimizer, frozen)
