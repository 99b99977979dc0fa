"""FSDP2 with one unit per transformer block: shard, freeze whole units, count what is sent.

Why Progtuning fits FSDP2. ``torch.distributed.fsdp.fully_shard`` shards module by module: each
call makes one *unit* whose parameters are all-gathered together before its forward and whose
gradients are reduce-scattered together after its backward. :func:`shard_by_block` makes every
transformer block a unit of its own (and the root a last unit for the embeddings and the head),
so a stage that freezes a part freezes whole units. Measured with torch 2.13 (2 gloo processes,
numbers in ``docs/distributed.md``):

* A unit whose parameters all have ``requires_grad=False`` on their sharded DTensors gets no
  gradient and is not reduce-scattered at all; in a partly frozen unit (the root, when the
  embeddings freeze) only the trainable parameters go into the reduce-scatter. So each stage of
  the paper's schedule sends less than the one before, with nothing rebuilt.
* Parameters switched back on later (growing schedules) are reduce-scattered again from their
  next backward; the final weights equal one process's to float rounding.
* What FSDP2 does *not* do by itself: it copies ``requires_grad`` from the sharded parameter to
  the unsharded one only when it all-gathers. A unit left unsharded by a forward without
  backward (the root after an evaluation) would keep the old flag and send a gradient for a
  frozen parameter. :class:`ShardedFreezer` therefore reshards every unit before it switches.

Plain loop, launched with ``torchrun --nproc_per_node 2 train.py``::

    dist.init_process_group("gloo")                    # "nccl" on GPUs (after torch.cuda.set_device)
    shard_by_block(model)                              # one FSDP unit per block, plus the root
    freezer = ShardedFreezer(model, schedule)
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=2e-5)
    for step, batch in enumerate(batches):
        freezer.apply_for_step(step, steps_per_epoch, total_steps, optimizer)
        model(**batch).loss.backward()                 # frozen units: no reduce-scatter
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # over DTensors: the global norm
        optimizer.step(); optimizer.zero_grad(set_to_none=True)

Gradient accumulation: wrap every micro-batch but the last in ``with gradient_sync_off(model):``.
The HF Trainer gets the same through :class:`~progtuning.runs.checkpoints.ProgtuningTrainer`
(``progtuning train --fsdp``). Checkpoints: :mod:`progtuning.core.sharded_checkpoint`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from progtuning.core.blocks import BlockLayout, find_blocks
from progtuning.core.freezing import ProgressiveFreezer, StageChange
from progtuning.core.schedule import Schedule
from progtuning.errors import ProgtuningError

ROOT = "<root>"  # the unit name of the model itself (embeddings, head and anything outside the blocks)


# -------------------------------------------------------------------------------------------------
# sharding
# -------------------------------------------------------------------------------------------------
def shard_by_block(
    model: nn.Module,
    layout: BlockLayout | None = None,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    offload_policy: Any = None,
    reshard_after_forward: bool = True,
) -> BlockLayout:
    """Apply FSDP2 in place: each block of ``layout`` becomes one unit, then the root takes the rest.

    Call it after the fine-tuning method is applied (LoRA, adapters: their parameters must exist
    when the units are made) and before the optimizer is built. ``mesh``, ``mp_policy`` and
    ``offload_policy`` go to every ``fully_shard`` call; ``reshard_after_forward`` to the blocks
    (the root keeps its parameters between forward and backward, as FSDP2 chooses for roots).
    Returns the layout (found before sharding; parameter names do not change).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ProgtuningError(
            "FSDP shards a model across processes, but torch.distributed is not initialised: launch with torchrun "
            "(or accelerate launch) and call dist.init_process_group first"
        )
    layout = layout or find_blocks(model)
    if isinstance(model, FSDPModule):
        check_block_units(model, layout)
        return layout
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for path in layout.block_paths:
        fully_shard(model.get_submodule(path), reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return layout


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages ``model`` (it is a unit, or holds one)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def units(model: nn.Module) -> dict[str, nn.Module]:
    """Every FSDP2 unit of ``model`` by module path (the model itself is :data:`ROOT`)."""
    from torch.distributed.fsdp import FSDPModule

    return {name or ROOT: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}


def check_block_units(model: nn.Module, layout: BlockLayout) -> None:
    """One line unless every block is an FSDP2 unit of its own (or the model uses FSDP1's flat parameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ProgtuningError(
            "the model is wrapped by FSDP1 (FullyShardedDataParallel), whose flat parameters cannot be frozen block "
            "by block: use FSDP2 (progtuning.core.fsdp.shard_by_block, or fsdp_config version 2)"
        )
    found = units(model)
    missing = [path for path in layout.block_paths if path not in found]
    if missing:
        raise ProgtuningError(
            f"FSDP must make every block a unit of its own, but {len(missing)} of {layout.num_blocks} blocks are not "
            f"(first: {missing[0]}): shard with progtuning.core.fsdp.shard_by_block, or wrap the blocks' class "
            "(fsdp_config transformer_layer_cls_to_wrap)"
        )


def reshard_all(model: nn.Module) -> None:
    """Register every unit's sharded parameters again (a forward without backward leaves the root unsharded)."""
    for module in units(model).values():
        module.reshard()


@contextlib.contextmanager
def gradient_sync_off(model: nn.Module) -> Iterator[None]:
    """FSDP2's ``no_sync``: gradients accumulate unsharded, the next backward outside reduce-scatters them."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU in rank 0 (empty elsewhere); every rank must call it.

    Units are gathered one at a time, so no device ever holds the whole model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


# -------------------------------------------------------------------------------------------------
# freezing
# -------------------------------------------------------------------------------------------------
class ShardedFreezer(ProgressiveFreezer):
    """A :class:`ProgressiveFreezer` for a model sharded by FSDP2 with one unit per block.

    It switches ``requires_grad`` on the sharded DTensor parameters (the ones the optimizer holds),
    after resharding every unit so that FSDP2 copies the flags at the next all-gather. Everything
    else is the plain freezer's: frozen parameters get ``.grad = None``, their optimizer state
    (this rank's shard of the AdamW moments) is dropped, frozen blocks run in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        layout: BlockLayout | None = None,
        *,
        eval_frozen_blocks: bool = True,
    ) -> None:
        if not is_sharded(model):
            raise ProgtuningError(
                "ShardedFreezer needs a model sharded by FSDP2: call progtuning.core.fsdp.shard_by_block(model) first "
                "(or use ProgressiveFreezer)"
            )
        layout = layout or find_blocks(model)
        check_block_units(model, layout)
        reshard_all(model)  # the parameters captured below must be the sharded ones the optimizer holds
        super().__init__(model, schedule, layout, eval_frozen_blocks=eval_frozen_blocks)

    def apply(self, stage: int, optimizer: torch.optim.Optimizer | None = None) -> StageChange:
        reshard_all(self.model)
        return super().apply(stage, optimizer)

    def restore(self) -> None:
        reshard_all(self.model)
        super().restore()


# -------------------------------------------------------------------------------------------------
# counting what is sent
# -------------------------------------------------------------------------------------------------
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Traffic:
    """Bytes each rank handed to FSDP2's collectives, by unit (the size of the buffer each call sent)."""

    reduce_scatter: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    all_gather: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reduce_scatter_calls: int = 0
    all_gather_calls: int = 0

    @property
    def reduce_scatter_bytes(self) -> int:
        return sum(self.reduce_scatter.values())

    @property
    def all_gather_bytes(self) -> int:
        return sum(self.all_gather.values())

    def snapshot(self) -> dict[str, int]:
        return {
            "reduce_scatter_bytes": self.reduce_scatter_bytes,
            "all_gather_bytes": self.all_gather_bytes,
            "reduce_scatter_calls": self.reduce_scatter_calls,
            "all_gather_calls": self.all_gather_calls,
        }


class _CountingReduceScatter:
    """FSDP2's reduce-scatter comm (``set_custom_reduce_scatter``), counting what each call sends."""

    def __init__(self, traffic: Traffic, unit: str) -> None:
        self.traffic, self.unit = traffic, unit

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        self.traffic.reduce_scatter[self.unit] += input_tensor.numel() * input_tensor.element_size()
        self.traffic.reduce_scatter_calls += 1
        return _reduce_scatter(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


class _CountingAllGather:
    """FSDP2's all-gather comm (``set_custom_all_gather``), counting the bytes each rank contributes."""

    def __init__(self, traffic: Traffic, unit: str) -> None:
        self.traffic, self.unit = traffic, unit

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        self.traffic.all_gather[self.unit] += input_tensor.numel() * input_tensor.element_size()
        self.traffic.all_gather_calls += 1
        return _all_gather(output_tensor, input_tensor, group=group, async_op=async_op)


def count_traffic(model: nn.Module) -> Traffic:
    """Route every unit's reduce-scatter and all-gather through counting comms; returns the running tally.

    The counting comms *are* the collectives that run (``dist.reduce_scatter_single`` /
    ``dist.all_gather_single``, what FSDP2 calls by default), so the numbers are what was sent,
    not an estimate. With one process FSDP2 skips the collectives and nothing is counted.
    """
    traffic = Traffic()
    for name, module in units(model).items():
        module.set_custom_reduce_scatter(_CountingReduceScatter(traffic, name))
        module.set_custom_all_gather(_CountingAllGather(traffic, name))
    return traffic


def sharded_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (its shards only)."""

    def size(tensor: torch.Tensor) -> int:
        local = local_tensor(tensor)
        return local.numel() * local.element_size()

    params = list(model.parameters())
    state = 0
    if optimizer is not None:
        inner = optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        state = sum(size(v) for entry in inner.state.values() for v in entry.values() if isinstance(v, torch.Tensor))
    return {
        "params": sum(size(p) for p in params),
        "grads": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer": state,
    }


class TrafficLog(TrainerCallback):
    """A Trainer callback: per stage, the bytes each optimizer step reduce-scattered and all-gathered.

    Counted between ``on_step_begin`` and ``on_step_end`` (so evaluation's all-gathers stay out),
    with :func:`count_traffic` installed on the model's units at train start. ``progtuning`` is the
    :class:`~progtuning.core.callback.ProgtuningCallback` whose stage each step is filed under.
    Also this rank's sharded parameters + optimizer state at the end of each stage's steps.
    """

    def __init__(self, progtuning) -> None:
        self.progtuning = progtuning
        self.traffic: Traffic | None = None
        self.stages: dict[int, dict[str, int]] = {}
        self._begin: dict[str, int] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.traffic is None and model is not None and is_sharded(model):
            self.traffic = count_traffic(model)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.traffic is not None:
            self._begin = self.traffic.snapshot()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        freezer = getattr(self.progtuning, "freezer", None)
        if self.traffic is None or freezer is None or freezer.stage_index is None:
            return
        now = self.traffic.snapshot()
        record = self.stages.setdefault(freezer.stage_index, {"steps": 0, "reduce_scatter_bytes": 0,
                                                              "all_gather_bytes": 0})
        record["steps"] += 1
        record["reduce_scatter_bytes"] += now["reduce_scatter_bytes"] - self._begin.get("reduce_scatter_bytes", 0)
        record["all_gather_bytes"] += now["all_gather_bytes"] - self._begin.get("all_gather_bytes", 0)
        if model is not None:
            held = sharded_state_bytes(model, optimizer)
            record["state_bytes"] = held["params"] + held["optimizer"]

    def records(self) -> list[dict]:
        """One entry per stage: steps, and bytes per step (this rank's view; FSDP ranks send alike)."""
        return [
            {
                "stage": stage,
                "steps": r["steps"],
                "reduce_scatter_bytes_per_step": r["reduce_scatter_bytes"] // max(r["steps"], 1),
                "all_gather_bytes_per_step": r["all_gather_bytes"] // max(r["steps"], 1),
                "sharded_state_bytes": r.get("state_bytes"),
            }
            for stage, r in sorted(self.stages.items())
        ]
