"""Gradient checkpointing that follows the stage: the blocks backward runs through recompute, no others.

A checkpointed block keeps only its input in the forward pass and runs its forward again in the
backward pass: activation memory traded for compute. Under Progtuning, which blocks that concerns
changes with the stage. Backward runs through every block at or above the lowest block with a
parameter that trains, and through every block if a parameter *below* the blocks trains (the
embeddings, or an input table tied to the output head, as in GPT-2, SmolLM2 and other decoders).
Those blocks are checkpointed; the blocks under them keep no activations anyway (autograd builds
no graph there), so there is nothing to recompute.

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

from progtuning.core.blocks import EMBEDDINGS, BlockLayout
from progtuning.errors import ProgtuningError


def backward_reach(model: nn.Module, layout: BlockLayout) -> int | None:
    """The lowest block backward runs through with the current ``requires_grad`` flags (None: no block).

    0 when anything below the blocks trains: an embeddings parameter, or the input embedding table
    when it is tied to (and trains as) the output head.
    """
    trained_blocks = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = layout.groups.get(name)
        if group == EMBEDDINGS:
            return 0
        if isinstance(group, int):
            trained_blocks.append(group)
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if table is not None and getattr(table, "weight", None) is not None and table.weight.requires_grad:
        return 0
    return min(trained_blocks) if trained_blocks else None


class StageCheckpointing(TrainerCallback):
    """Checkpoints the blocks backward runs through in the current stage (see the module docstring)."""

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
        lowest = backward_reach(model, self.progtuning.freezer.layout)
        chosen = [] if lowest is None else list(range(lowest, len(self.blocks)))
        for index, block in enumerate(self.blocks):
            block.gradient_checkpointing = index >= lowest if lowest is not None else False
        self.checkpointed = chosen
