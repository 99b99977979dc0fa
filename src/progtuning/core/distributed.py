"""Several processes: progressive freezing under DistributedDataParallel, and what is refused.

Why this needs care. ``DistributedDataParallel`` decides *when it is built* which parameters it
averages: only those that require grad at that moment get a gradient hook. Measured here (2 CPU
processes, gloo, a 4-block BERT, 3 stages; numbers in ``docs/distributed.md``):

* a wrapper built once without ``find_unused_parameters``, then parameters switched *off*: the
  step of the switch runs without error but is not averaged, so the ranks drift apart,
  and the next forward raises "Expected to have finished reduction in the prior iteration";
  ``static_graph=True`` behaves the same;
* parameters that were *off when the wrapper was built*, switched on later (growing schedules):
  never averaged, silently, with or without ``find_unused_parameters``;
* a wrapper built while every parameter a stage will train still required grad, with
  ``find_unused_parameters=True``: correct for shrinking, growing and cycling schedules — but
  every step traverses the autograd graph and all-reduces the frozen parameters' (zero) slots too;
* rebuilding the wrapper whenever the trainable set changes: correct for every schedule, and only
  the trainable parameters are all-reduced (the later stages send a fraction of what a once-built
  wrapper sends).

So there are two correct ways, and this module serves both:

* a plain PyTorch loop uses :class:`DistributedFreezer`, which rebuilds the DDP wrapper at every
  switch that changes the trainable set;
* the HF Trainer builds its DDP wrapper before the callback applies stage 0 and keeps it in a
  local variable for the whole run, so it is not rebuilt: it runs with
  ``find_unused_parameters=True`` (the Trainer's default, set explicitly by ``progtuning train``).
  :func:`check_trainer_parallelism` refuses ``find_unused_parameters=False`` when the schedule
  freezes anything.

Sharding is :mod:`progtuning.core.fsdp`: FSDP2 with one unit per block, made by progtuning before
the Trainer starts. FSDP configured another way (FSDP1's flat parameters, accelerate's launcher or
``TrainingArguments(fsdp=...)``, which accelerate ignores on CPUs) and DeepSpeed are refused in one
line; ``docs/distributed.md`` has what was measured under DeepSpeed.

Plain loop, launched with ``torchrun --nproc_per_node 2 train.py``::

    dist.init_process_group("gloo")          # "nccl" on GPUs
    runner = DistributedFreezer(model, schedule, device_ids=None)
    optimizer = torch.optim.AdamW(runner.trainable_parameters(), lr=2e-5)
    for step, batch in enumerate(batches):
        ddp_model = runner.apply_for_step(step, steps_per_epoch, total_steps, optimizer)
        ddp_model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)

Always call the model ``apply_for_step`` returns: the one from an earlier step may be stale.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from progtuning.core.blocks import BlockLayout
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer, StageChange
from progtuning.core.schedule import Schedule


def world_size() -> int:
    """Processes in the default group (1 when ``torch.distributed`` is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launcher_rank() -> int:
    """This process's rank as torchrun / accelerate launch set it (0 when run alone).

    Valid before the process group exists, so it can decide who writes before the Trainer starts.
    """
    return int(os.environ.get("RANK", "0"))


class DistributedFreezer:
    """A :class:`ProgressiveFreezer` whose DDP wrapper is rebuilt whenever the trainable set changes.

    Without an initialised process group (or with one process) it wraps nothing and
    :meth:`apply_for_step` returns the model itself, so the same loop runs everywhere.
    ``ddp_kwargs`` go to every ``DistributedDataParallel`` it builds (``device_ids``,
    ``bucket_cap_mb``, ...). Freezing needs no ``find_unused_parameters``: frozen parameters are not
    registered at all. Pass it only if the model has parameters its forward never uses (a QA model's
    pooler, for instance).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        layout: BlockLayout | None = None,
        *,
        eval_frozen_blocks: bool = True,
        freezer: ProgressiveFreezer | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        self.model = model
        # ``freezer``: one already built over ``model`` (a ContributionFreezer, say); ``schedule`` is then ignored.
        self.freezer = freezer or ProgressiveFreezer(model, schedule, layout, eval_frozen_blocks=eval_frozen_blocks)
        self.ddp_kwargs = ddp_kwargs
        self.wrapped: nn.Module | None = None
        self.builds = 0  # how many DDP wrappers were built (one per change of the trainable set)
        self.last_change: StageChange | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter any stage trains: build the optimizer over these, before the first step."""
        return self.freezer.trainable_parameters()

    @property
    def stage_index(self) -> int | None:
        return self.freezer.stage_index

    def apply(self, stage: int, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Apply ``stage`` and return the model to call (a fresh DDP wrapper if the trainable set changed)."""
        change = self.freezer.apply(stage, optimizer)
        return self._after(change)

    def apply_for_step(
        self, step: int, steps_per_epoch: int, total_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> nn.Module:
        """Apply the stage of optimizer step ``step`` and return the model to call for that step."""
        change = self.freezer.apply_for_step(step, steps_per_epoch, total_steps, optimizer)
        return self._after(change)

    def _after(self, change: StageChange | None) -> nn.Module:
        if change is not None:
            self.last_change = change
        changed = change is not None and (change.frozen or change.unfrozen or change.previous is None)
        if self.wrapped is None or changed:
            self.wrapped = self._wrap()
        return self.wrapped

    def _wrap(self) -> nn.Module:
        self.release()
        if not is_distributed():
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        self.builds += 1
        # Building DDP broadcasts rank 0's parameters and buffers; they are equal on every rank
        # anyway (same updates), so this costs one broadcast per switch and changes nothing.
        return DistributedDataParallel(self.model, **self.ddp_kwargs)

    def release(self) -> None:
        """Detach the current DDP wrapper: its reducer's gradient hooks are removed at once.

        Dropping the last reference would do it too, but only when the garbage collector gets to
        it; until then a stale reducer would still try to all-reduce on the next backward.
        """
        old, self.wrapped = self.wrapped, None
        if old is not None and old is not self.model and hasattr(old, "reducer"):
            old._remove_autograd_hooks()

    def close(self) -> None:
        self.release()
        self.freezer.close()


# -------------------------------------------------------------------------------------------------
# the HF Trainer
# -------------------------------------------------------------------------------------------------
def refuse_unsupported_parallelism(args=None, model: nn.Module | None = None) -> None:
    """One line if FSDP is configured other than by progtuning, or DeepSpeed at all.

    ``model`` sharded by FSDP2 with one unit per block (:func:`progtuning.core.fsdp.shard_by_block`)
    is accepted whatever else says FSDP. FSDP from accelerate's launcher or ``TrainingArguments``
    is not: accelerate enables it only on GPUs (on CPUs ``fsdp=True`` silently runs DDP) and shards
    by its own policy. DeepSpeed's ZeRO optimizer owns flat copies of the parameters, built at start,
    so freezing a block there neither stops its updates nor frees its state (measured with ZeRO-2 and
    ZeRO-3: a block frozen at a switch moved by 2e-3 in the next stage; see the docs).
    """
    from progtuning.core.fsdp import is_sharded

    sharded = model is not None and is_sharded(model)
    if _fsdp1(model):
        raise ProgtuningError(
            "Progtuning does not support FSDP1 (FullyShardedDataParallel flattens parameters, so blocks cannot be "
            "frozen one by one): use FSDP2 one unit per block (progtuning train --fsdp, or "
            "progtuning.core.fsdp.shard_by_block before the Trainer)"
        )
    if _fsdp_enabled(args) and not sharded:
        raise ProgtuningError(
            "Progtuning does not support FSDP set up by accelerate (accelerate launch --use_fsdp or "
            "TrainingArguments(fsdp=...)): it shards by its own policy, and on CPUs not at all; launch without it "
            "(torchrun, or accelerate launch --multi_gpu) and pass --fsdp, so progtuning shards one FSDP2 unit per "
            "block (in your own code: progtuning.core.fsdp.shard_by_block before the Trainer)"
        )
    if _deepspeed_enabled(args):
        raise ProgtuningError(
            "Progtuning does not support DeepSpeed (its ZeRO optimizer owns flat copies of every parameter trainable "
            "when the engine is built and keeps updating them after they freeze): use --fsdp (FSDP2, sharded like "
            "ZeRO-3) or plain data parallelism, or turn progtuning off"
        )


def check_trainer_parallelism(args, model: nn.Module | None, schedule: Schedule) -> str:
    """What the Trainer does with ``args`` in this process: ``"single"``, ``"ddp"`` or ``"fsdp"``; refuse the rest.

    Called by :class:`~progtuning.core.callback.ProgtuningCallback` at ``on_train_begin``, after the
    Trainer built its DDP wrapper and before the first stage is applied — so the wrapper registered
    every parameter any stage trains, and ``find_unused_parameters=True`` (the Trainer's default)
    lets it skip whichever are frozen in a step and take them back when they train again (measured
    correct for shrinking, growing and cycling schedules). Without it the first frozen step fails.
    A model sharded by FSDP2 needs nothing of the kind: a frozen unit simply sends no gradient.
    """
    from progtuning.core.fsdp import is_sharded

    refuse_unsupported_parallelism(args, model)
    if model is not None and is_sharded(model):
        return "fsdp"
    if getattr(args, "world_size", 1) <= 1 and not is_distributed():
        return "single"
    if _freezes_anything(schedule) and not _find_unused(args, model):
        raise ProgtuningError(
            "several processes with ddp_find_unused_parameters=False: the schedule freezes blocks, so DDP must skip "
            "them each step (set ddp_find_unused_parameters=True, the Trainer's default; with activation "
            "checkpointing also pass activation_checkpointing_kwargs={'use_reentrant': False})"
        )
    return "ddp"


def _fsdp1(model: nn.Module | None) -> bool:
    if model is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def _freezes_anything(schedule: Schedule) -> bool:
    everything = set(range(schedule.num_blocks))
    return any(set(s.blocks) != everything or not s.train_embeddings for s in schedule.stages)


def _find_unused(args, model: nn.Module | None) -> bool:
    """The Trainer's own rule (``Trainer._build_accelerator_args``)."""
    if getattr(args, "ddp_find_unused_parameters", None) is not None:
        return bool(args.ddp_find_unused_parameters)
    checkpointing = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    checkpointing = checkpointing or bool(getattr(model, "is_activation_checkpointing", False))
    return not checkpointing


def _fsdp_enabled(args) -> bool:
    if args is not None and (getattr(args, "fsdp", None) or getattr(args, "fsdp_plugin", None)):
        return True
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return True
    return _accelerate_type() in ("FSDP", "XLA_FSDP")


def _deepspeed_enabled(args) -> bool:
    if args is not None and (getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None)):
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return True
    return _accelerate_type() == "DEEPSPEED"


def _accelerate_type() -> str | None:
    try:
        from accelerate.state import PartialState

        if not PartialState._shared_state:
            return None
        kind = PartialState().distributed_type
        return getattr(kind, "name", str(kind))
    except Exception:  # accelerate not initialised in this process: nothing to refuse
        return None
