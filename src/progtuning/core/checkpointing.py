"""Gradient checkpointing that follows the stage: the trainable blocks recompute, the frozen ones do not.

A checkpointed block keeps only its input in the forward pass and runs its forward again in the
backward pass: activation memory traded for compute. Under Progtuning the blocks that train change
with the stage, and only they are checkpointed:

* frozen blocks below the lowest trainable block keep no activations when nothing below them
  trains (autograd builds no graph there): there is nothing to save;
* frozen blocks that backward still runs through (when the embeddings, or an input table tied to
  the output head as in GPT-2 and SmolLM2, train) keep their activations: recomputing them would
  cost a forward each. They run in eval mode (the freezer's default), and transformers checkpoints
  a layer only in train mode, so this is also what transformers itself would do with them.

How: transformers' per-layer switch (``GradientCheckpointingLayer.gradient_checkpointing``), set
per block at every stage switch, with ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.
Reentrant checkpointing gives no parameter gradients to a block whose input does not require grad,
which is exactly the lowest trainable block above a frozen prefix. ``model.gradient_checkpointing_enable()``
is not used: it also hooks the input embeddings so that their output requires grad (a fix for
reentrant checkpointing under PEFT), which would make backward run through every frozen block.

Use it after :class:`~progtuning.core.callback.ProgtuningCallback` (callbacks run in list order, so
the stage is applied first)::

    progtuning = ProgtuningCallback(schedule)
    trainer = Trainer(..., callbacks=[progtuning, StageCheckpointing(progtuning)])
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback

from progtuning.core.blocks import BlockLayout
from progtuning.errors import ProgtuningError


def trainable_blocks(model: nn.Module, layout: BlockLayout) -> list[int]:
    """The blocks with a parameter that requires grad now, bottom to top."""
    return sorted({
        group for name, param in model.named_parameters()
        if param.requires_grad and isinstance(group := layout.groups.get(name), int)
    })


class StageCheckpointing(TrainerCallback):
    """Checkpoints the trainable blocks of the current stage (see the module docstring)."""

    def __init__(self, progtuning) -> None:
        self.progtuning = progtuning
        self.blocks: list[nn.Module] = []
        self.checkpointed: list[int] = []  # block indices checkpointed in the current stage

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layout = self.progtuning.freezer.layout
        self.blocks = [model.get_submodule(path) for path in layout.block_paths]
        if not all(hasattr(block, "gradient_checkpointing") for block in self.blocks):
            raise ProgtuningError(
                f"the blocks of {type(model).__name__} ({type(self.blocks[0]).__name__}) do not support gradient "
                "checkpointing in transformers: run without --gradient-checkpointing"
            )
        recompute = functools.partial(checkpoint, use_reentrant=False)
        for block in self.blocks:
            block._gradient_checkpointing_func = recompute
        self._apply(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for block in self.blocks:
            block.gradient_checkpointing = False
        self.checkpointed = []

    def _apply(self, model: nn.Module) -> None:
        chosen = trainable_blocks(model, self.progtuning.freezer.layout)
        for index, block in enumerate(self.blocks):
            block.gradient_checkpointing = index in chosen
        self.checkpointed = chosen
