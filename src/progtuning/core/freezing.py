"""What trains *now*: apply one stage of a schedule inside the method's trainable set.

:class:`ProgressiveFreezer` captures, once, the parameters the fine-tuning method made trainable
(everything for full fine-tuning; LoRA / adapter / bias parameters plus the head for PEFT). A
stage then only ever switches ``requires_grad`` *inside* that set, so nothing the method froze
is ever made trainable.

On every switch, parameters that stop training get ``.grad = None`` (a zero gradient would
still let AdamW move them through momentum and weight decay) and their optimizer state is
dropped, which frees the AdamW moments. Frozen blocks can also run in eval mode (their dropout
off), and so can the embeddings in stages that freeze them: their forward gets cheaper and
deterministic, which is also what lets the frozen prefix be cached (:mod:`progtuning.cache.prefix_cache`).

The optimizer must be built over the whole trainable set *before* the first stage is applied:
the HF Trainer (and most loops) only hand parameters that require grad at that moment to the
optimizer. The same object drives the HF callback and a plain PyTorch loop::

    freezer = ProgressiveFreezer(model, progressive(num_blocks=6, num_stages=3))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=2e-5)
    for step, batch in enumerate(batches):
        freezer.apply_for_step(step, steps_per_epoch, total_steps, optimizer)
        ...
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import torch
from torch import nn

from progtuning.core.blocks import EMBEDDINGS, HEAD, BlockLayout, find_blocks
from progtuning.errors import ProgtuningError
from progtuning.core.schedule import Schedule, Stage


@dataclass(frozen=True)
class StageChange:
    """What one call to :meth:`ProgressiveFreezer.apply` did."""

    stage: int
    previous: int | None
    frozen: tuple[str, ...]  # stopped training at this switch
    unfrozen: tuple[str, ...]  # started training again (growing schedules)
    trainable_params: int  # elements that train in this stage


class ProgressiveFreezer:
    """Applies the stages of ``schedule`` to ``model``, inside its currently trainable parameters."""

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        layout: BlockLayout | None = None,
        *,
        eval_frozen_blocks: bool = True,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.layout = layout or find_blocks(model)
        self.eval_frozen_blocks = eval_frozen_blocks
        if self.layout.num_blocks != schedule.num_blocks:
            raise ProgtuningError(
                f"the schedule is for {schedule.num_blocks} blocks but the model has {self.layout.num_blocks}: "
                "build the schedule from this model (progressive(num_blocks=layout.num_blocks, ...))"
            )
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        # The method's trainable set, captured once: stages never reach outside it.
        self.method_trainable: tuple[str, ...] = tuple(n for n, p in self.params.items() if p.requires_grad)
        if not self.method_trainable:
            raise ProgtuningError(
                "no parameter of the model requires grad: apply the fine-tuning method before building the freezer"
            )
        self.stage_index: int | None = None
        # What runs in eval mode while frozen: each block, and the embeddings (a unit of their own).
        self._units: dict[int | str, list[nn.Module]] = {
            i: [model.get_submodule(path)] for i, path in enumerate(self.layout.block_paths)
        }
        self._units[EMBEDDINGS] = self._embedding_modules()
        self._frozen_units: set[int | str] = set()
        self._hooks = [
            module.register_forward_pre_hook(self._keep_in_eval_while_frozen(unit))
            for unit, modules in self._units.items()
            for module in modules
        ]

    # -- what each stage trains ------------------------------------------------------------
    def stage_names(self, stage: int | Stage) -> set[str]:
        """Names of the parameters that train in ``stage``: the method's set, restricted to it."""
        stage = self.schedule.stages[stage] if isinstance(stage, int) else stage
        blocks = set(stage.blocks)
        chosen = set()
        for name in self.method_trainable:
            group = self.layout.groups[name]
            if group == HEAD or (group == EMBEDDINGS and stage.train_embeddings):
                chosen.add(name)
            elif blocks.intersection(self.layout.blocks_using(name)):
                # its own block, or any block served by a table it holds for its stack (T5)
                chosen.add(name)
        return chosen

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter any stage trains: what the optimizer must be built over."""
        return [self.params[name] for name in self.method_trainable]

    # -- switching ---------------------------------------------------------------------------
    def apply(self, stage: int, optimizer: torch.optim.Optimizer | None = None) -> StageChange:
        """Make exactly the parameters of ``stage`` trainable; release what stops training."""
        if not 0 <= stage < self.schedule.num_stages:
            raise ProgtuningError(f"stage {stage} does not exist: the schedule has stages 0..{self.schedule.num_stages - 1}")
        wanted = self.stage_names(stage)
        frozen, unfrozen = [], []
        for name in self.method_trainable:
            param = self.params[name]
            train = name in wanted
            if param.requires_grad and not train:
                frozen.append(name)
            elif train and not param.requires_grad:
                unfrozen.append(name)
            param.requires_grad_(train)
            if not train:
                param.grad = None
        if optimizer is not None and frozen:
            release_optimizer_state(optimizer, (self.params[n] for n in frozen))
            return_freed_memory()
        self._set_modes(self.schedule.stages[stage])
        previous, self.stage_index = self.stage_index, stage
        return StageChange(
            stage=stage,
            previous=previous,
            frozen=tuple(frozen),
            unfrozen=tuple(unfrozen),
            trainable_params=sum(self.params[n].numel() for n in wanted),
        )

    def apply_for_step(
        self, step: int, steps_per_epoch: int, total_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> StageChange | None:
        """Apply the stage in effect for optimizer step ``step``; ``None`` if it is already applied."""
        stage = self.schedule.stage_at(step, steps_per_epoch, total_steps)
        if stage == self.stage_index and self._still_holds(stage):
            return None
        return self.apply(stage, optimizer)

    def _still_holds(self, stage: int) -> bool:
        # peft's set_adapter() (and user code) can flip requires_grad back on behind our back.
        wanted = self.stage_names(stage)
        return all(self.params[n].requires_grad == (n in wanted) for n in self.method_trainable)

    def restore(self) -> None:
        """Undo all stages: the method's trainable set trains again, every block follows the model's mode."""
        for name in self.method_trainable:
            self.params[name].requires_grad_(True)
        self._set_modes(None)
        self.stage_index = None

    def close(self) -> None:
        """Remove the hooks this freezer put on the blocks and embeddings."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- eval mode for frozen blocks and embeddings ----------------------------------------------
    def _embedding_modules(self) -> list[nn.Module]:
        """The outermost modules that hold only embedding parameters (tables, their norm and dropout)."""
        chosen: list[tuple[str, nn.Module]] = []
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(outer + ".") for outer, _ in chosen):
                continue
            names = [n for n, _ in module.named_parameters(prefix=name)]
            if names and all(self.layout.groups.get(n) == EMBEDDINGS for n in names):
                chosen.append((name, module))
        return [module for _, module in chosen]

    def eval_units(self, stage: int | Stage) -> set[int | str]:
        """The units (block indices, ``EMBEDDINGS``) held in eval mode during ``stage``: those the schedule
        freezes, if ``eval_frozen_blocks``. A unit the schedule trains follows the model's mode, even where
        the method gives it no parameter (the embeddings under LoRA with ``embeddings="always"``)."""
        if not self.eval_frozen_blocks:
            return set()
        stage = self.schedule.stages[stage] if isinstance(stage, int) else stage
        trained = set(stage.blocks) | ({EMBEDDINGS} if stage.train_embeddings else set())
        return set(self._units) - trained

    def _set_modes(self, stage: Stage | None) -> None:
        """Frozen units run in eval mode; ``stage=None`` means everything trains again."""
        if not self.eval_frozen_blocks:
            return
        frozen = set() if stage is None else self.eval_units(stage)
        for unit in self._frozen_units - frozen:
            # A unit that trains again (growing schedules) follows the model's mode again.
            for module in self._units[unit]:
                module.train(self.model.training)
        self._frozen_units = frozen

    def _keep_in_eval_while_frozen(self, unit: int | str):
        # Trainers call model.train() every step, which would turn dropout back on in frozen
        # modules; re-assert eval mode right before the module runs instead.
        def hook(module: nn.Module, args):
            if module.training and unit in self._frozen_units:
                module.eval()

        return hook


def release_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Drop the optimizer state (e.g. AdamW moments) of ``params``; returns how many had state."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers
    released = 0
    for param in params:
        if inner.state.pop(param, None) is not None:
            released += 1
    return released


def return_freed_memory() -> None:
    """Hand memory freed at a stage switch back to the system, so peak memory falls stage by stage.

    Dropped AdamW moments go back to the allocator, not to the OS: glibc keeps the pages (RSS
    stays flat on CPU) and CUDA's caching allocator keeps its blocks (reserved memory stays flat).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only (not musl, not macOS)
        return libc
    except (OSError, AttributeError):
        return None
