"""The cache in a Trainer run: :class:`PrefixCacheCallback` builds and switches it at every stage."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from progtuning.cache.data import input_reason
from progtuning.cache.prefix_cache import FrozenPrefixCache
from progtuning.core.blocks import EMBEDDINGS
from progtuning.errors import ProgtuningError

logger = logging.getLogger("progtuning")


def _dropout_in(modules: Sequence[nn.Module]) -> bool:
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Dropout) and sub.p > 0:
                return True
            # attention dropout is a float attribute in HF attention modules, not an nn.Dropout
            p = getattr(sub, "dropout_prob", None) or getattr(sub, "attention_dropout", None)
            if isinstance(p, float) and p > 0:
                return True
    return False


class PrefixCacheCallback(TrainerCallback):
    """Builds, extends and switches the frozen-prefix cache at each stage of a Progtuning run.

    Put it *after* ``progtuning`` in the Trainer's callbacks: the stage must already be applied
    when it runs. ``records`` has one entry per stage: whether the cache was on, its level, the
    build time, its storage and size, or the reason it was off. (The freezer keeps frozen
    embeddings and blocks in eval mode, so a cached run computes what the uncached one does.)
    """

    def __init__(
        self,
        progtuning,
        cache: FrozenPrefixCache | None = None,
        *,
        min_blocks: int = 1,
        collator=None,
        close_at_end: bool = True,
    ) -> None:
        self.progtuning = progtuning
        self.cache = cache
        self.min_blocks = max(0, int(min_blocks))
        self.close_at_end = close_at_end
        self.records: list[dict] = []
        self._static_reason: str | None = input_reason(cache.dataset, collator) if cache is not None else None
        self._stage: int | None = None
        self._warned: set[str] = set()
        self._autocast: torch.dtype | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        freezer = getattr(self.progtuning, "freezer", None)
        if freezer is None:
            raise ProgtuningError(
                "PrefixCacheCallback runs before ProgtuningCallback: list it after the ProgtuningCallback"
            )
        if self.cache is None:
            return
        if getattr(args, "world_size", 1) > 1:
            self._static_reason = "several training processes (DDP): each would need its own cache"
        elif getattr(args, "remove_unused_columns", False) and train_dataloader is not None:
            # the Trainer drops columns the model's forward does not name, example_index among them
            self._static_reason = (
                f"TrainingArguments.remove_unused_columns=True drops the {self.cache.index_column!r} column: "
                "pass remove_unused_columns=False"
            )
        if self._static_reason is None and train_dataloader is not None:
            self._static_reason = input_reason(None, getattr(train_dataloader, "collate_fn", None))
        if getattr(args, "bf16", False):
            self._autocast = torch.bfloat16
        elif getattr(args, "fp16", False):
            self._autocast = torch.float16
        self.cache.attach()

    def on_step_begin(self, args, state, control, **kwargs):
        stage = self.progtuning.freezer.stage_index
        if stage is None or stage == self._stage:
            return
        self._stage = stage
        self.records.append(self._switch(stage))

    def on_train_end(self, args, state, control, **kwargs):
        if self.cache is not None:
            self.cache.deactivate()
            if self.close_at_end:
                self.cache.close()

    # -- one stage -----------------------------------------------------------------------------
    def _switch(self, stage: int) -> dict:
        cache, freezer = self.cache, self.progtuning.freezer
        record: dict[str, Any] = {"stage": stage, "cache": False, "level": None}
        if cache is None:
            return record
        groups = freezer.layout.groups
        names = freezer.stage_names(stage)
        # a head tied to the input embeddings (trained as head) changes the embedding table too
        train_embeddings = any(groups[n] == EMBEDDINGS or n in freezer.layout.tied_head for n in names)
        trained_blocks = sorted({groups[n] for n in names if isinstance(groups[n], int)})
        level = trained_blocks[0] if trained_blocks else freezer.layout.num_blocks
        # anything in (or below) the stored prefix that trains again makes the stored states stale
        if cache.level is not None and (train_embeddings or level < cache.level):
            cache.invalidate()
        reason, expected = self._reason(stage, train_embeddings, level, freezer)
        if reason is not None:
            cache.deactivate()
            record["reason"] = reason
            if reason not in self._warned:
                self._warned.add(reason)
                # a stage that trains the embeddings or every block is the schedule working as meant
                log = logger.info if expected else logger.warning
                log("progtuning: frozen-prefix cache off in stage %d: %s", stage, reason)
            return record
        seconds = cache.extend_to(level, autocast=self._autocast)
        cache.activate(level)
        record.update(
            cache=True,
            level=level,
            build_s=round(seconds, 4),
            storage=cache.storage_kind,
            cache_mb=round(cache.nbytes / 2**20, 1),
        )
        logger.info("progtuning: stage %d feeds cached states into block %d (built in %.2fs)", stage, level, seconds)
        return record

    def _reason(self, stage: int, train_embeddings: bool, level: int, freezer) -> tuple[str | None, bool]:
        """Why the cache is off in ``stage`` (None: it is on), and whether that is the normal course."""
        if self._static_reason is not None:
            return self._static_reason, False
        if train_embeddings:
            return (
                f"the embeddings train in stage {stage}, so the prefix changes every step "
                "(embeddings first_stage or never let later stages use the cache)",
                True,
            )
        if level < self.min_blocks:
            return f"no block is frozen in stage {stage}", True
        # Cached states are computed in eval mode; a prefix unit the freezer leaves in train mode would
        # draw dropout masks without the cache, so caching it would train another model.
        in_eval = freezer.eval_units(stage)
        prefix = [(EMBEDDINGS, self.cache.prefix.embeddings), *enumerate(self.cache.prefix.blocks[:level])]
        live = {unit for unit, module in prefix if unit not in in_eval and _dropout_in([module])}
        if live and not freezer.eval_frozen_blocks:
            return "frozen blocks keep their dropout on (eval_frozen_blocks is off), so their output is random", False
        if EMBEDDINGS in live:
            return (
                f"the schedule trains the embeddings in stage {stage} but the method has no parameter there, so they "
                "keep their dropout on (--embeddings never freezes them in eval mode and lets the cache run)"
            ), False
        if live:
            return f"a block the schedule trains in stage {stage} has no trainable parameter and keeps dropout on", False
        return None, False
