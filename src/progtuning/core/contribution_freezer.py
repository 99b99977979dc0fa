"""The contribution schedule on a real model: measure the signals, apply the decisions, keep the state.

:class:`ContributionFreezer` is a :class:`~progtuning.core.freezing.ProgressiveFreezer` whose
stages form a *ladder*: stage k trains blocks k … L−1 (the lowest k frozen), and which stage is in
effect is decided during the run by :func:`progtuning.core.contribution.decide` from the signals
it measures, not by a step counter. Everything that works with a freezer works with it: the HF
callback, the frozen-prefix cache (stage k = the prefix of k blocks), the DDP helpers and the
accounting (:meth:`ContributionFreezer.level_lengths` gives the steps each rung ran).

Measuring costs no copy of the weights: for each block still training, ``<g, W>`` (one float32
dot per parameter) just before the optimizer step and again just after it, with the same gradient,
every ``signal_every`` steps; the difference is the block's first-order share of the loss decrease. With
several processes the gradients are already averaged at that point, and rank 0's numbers are
broadcast, so every rank keeps the same averages and makes the same decisions.

Plain PyTorch loop::

    freezer = ContributionFreezer(model, ContributionPolicy(target_reduction=0.25))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=2e-5)   # before any freezing
    for step, batch in enumerate(batches):
        freezer.apply_for_step(step, steps_per_epoch, total_steps, optimizer)  # decides at decision steps
        model(**batch).loss.backward()
        freezer.before_optimizer_step(step)
        optimizer.step()
        freezer.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)

:meth:`state_dict` / :meth:`load_state_dict` hold plain numbers only (JSON), so a resumed run
continues with the same averages and makes the same decisions bit for bit; the HF callback keeps
them in the checkpoint's ``trainer_state.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from progtuning.core.blocks import BlockLayout, find_blocks
from progtuning.core.contribution import (
    ContributionPolicy,
    SignalTracker,
    check_target_reachable,
    decide,
    max_reduction,
    saved_until,
    scores,
)
from progtuning.core.freezing import ProgressiveFreezer, StageChange
from progtuning.core.schedule import EmbeddingPolicy, Schedule, explicit
from progtuning.errors import ProgtuningError

logger = logging.getLogger("progtuning")

LADDER_NAME = "contribution"


def prefix_ladder(num_blocks: int, embeddings: EmbeddingPolicy = "always") -> Schedule:
    """Stage k trains blocks k … L−1: every frozen prefix the contribution schedule can choose.

    Its stage starts are placeholders (the freezer decides when); with ``embeddings="first_stage"``
    the embeddings train until the first block freezes.
    """
    stages = [range(k, num_blocks) for k in range(num_blocks)]
    starts = [k / num_blocks for k in range(num_blocks)]
    ladder = explicit(num_blocks, stages, embeddings=embeddings, unit="fraction", starts=starts)
    return dataclasses.replace(ladder, name=LADDER_NAME)


class ContributionFreezer(ProgressiveFreezer):
    """Freezes the lowest blocks when their measured contribution says so (see :mod:`progtuning.core.contribution`)."""

    def __init__(
        self,
        model: nn.Module,
        policy: ContributionPolicy | None = None,
        layout: BlockLayout | None = None,
        *,
        embeddings: EmbeddingPolicy = "always",
        eval_frozen_blocks: bool = True,
    ) -> None:
        layout = layout or find_blocks(model)
        super().__init__(model, prefix_ladder(layout.num_blocks, embeddings), layout,
                         eval_frozen_blocks=eval_frozen_blocks)
        self.policy = policy or ContributionPolicy()
        n = self.layout.num_blocks
        groups = self.layout.groups
        self._block_names = [[name for name in self.method_trainable if groups[name] == i] for i in range(n)]
        self.block_params = [sum(self.params[name].numel() for name in names) for names in self._block_names]
        self.method_params = sum(self.params[name].numel() for name in self.method_trainable)
        self.savings = [
            self.method_params - sum(self.params[name].numel() for name in self.stage_names(k)) for k in range(n)
        ]
        self.tracker = SignalTracker(n, self.policy.ema_decay)
        self.frozen = 0
        self.history: list[tuple[int, int]] = [(0, 0)]  # (first step, frozen blocks)
        self.decisions: list[dict] = []
        self.total_steps: int | None = None
        self.decision_steps: list[int] = []
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # -- the run -----------------------------------------------------------------------------------
    def start(self, total_steps: int) -> None:
        """Fix the run's length (decision steps, the target's budget); checks the target can be reached."""
        if self.total_steps is not None and self.total_steps != total_steps:
            raise ProgtuningError(
                f"the contribution schedule was started for {self.total_steps} steps, now asked for {total_steps}: "
                "resume with the same epochs, batch size and data"
            )
        check_target_reachable(self.policy, self.savings, self.method_params, total_steps)
        self.total_steps = total_steps
        self.decision_steps = self.policy.decision_steps(total_steps)

    def apply_for_step(
        self, step: int, steps_per_epoch: int, total_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> StageChange | None:
        """Decide if ``step`` is a decision step, then make the chosen prefix frozen; ``None`` if nothing changed."""
        if self.total_steps is None:
            self.start(total_steps)
        last = self.decisions[-1]["step"] if self.decisions else -1
        if any(last < d <= step for d in self.decision_steps):
            self._decide(step)
        if self.stage_index == self.frozen and self._still_holds(self.frozen):
            return None
        return self.apply(self.frozen, optimizer)

    def before_optimizer_step(self, step: int) -> None:
        """Call after backward (and clipping), right before ``optimizer.step()``."""
        self._pending = None
        if step % self.policy.signal_every:
            return
        self._pending = (step, self._grad_dot_weights(), self._grad_norms())

    def after_optimizer_step(self, step: int) -> None:
        """Call right after ``optimizer.step()``, before the gradients are cleared."""
        if self._pending is None or self._pending[0] != step:
            return
        _, before, norms = self._pending
        self._pending = None
        contributions = before - self._grad_dot_weights()  # -<g, W_after - W_before>
        measured = _from_rank_zero(torch.cat([contributions, norms])).tolist()
        n = self.layout.num_blocks
        self.tracker.update(measured[:n], measured[n:])

    # -- signals -----------------------------------------------------------------------------------
    def _grad_dot_weights(self) -> torch.Tensor:
        # One BLAS dot per parameter, in float32 at least. The difference of the two dots (before and
        # after the step) was measured against -<g, W_after - W_before> computed from a copy in
        # float64, on MiniLM-L6 at learning rates 5e-5 and 1e-5: within 1.1e-4 of it, relatively;
        # float64 sums were 100x closer and 6x slower, for nothing a decision could see.
        return self._per_block(lambda p: torch.dot(_flat(p.grad), _flat(p.detach())))

    def _grad_norms(self) -> torch.Tensor:
        return self._per_block(lambda p: torch.linalg.vector_norm(_flat(p.grad)) ** 2).sqrt()

    def _per_block(self, value) -> torch.Tensor:
        """One float64 per block (NaN where the block has no gradient: frozen, or unused this step)."""
        device = next((self.params[n].device for names in self._block_names for n in names), torch.device("cpu"))
        out = torch.full((self.layout.num_blocks,), math.nan, dtype=torch.float64, device=device)
        for i in range(self.frozen, self.layout.num_blocks):
            terms = [value(self.params[n]) for n in self._block_names[i] if self.params[n].grad is not None]
            if terms:
                out[i] = torch.stack(terms).double().sum()
        return out

    # -- decisions ---------------------------------------------------------------------------------
    def _decide(self, step: int) -> None:
        block_scores = scores(self.tracker, self.frozen, self.block_params)
        next_decision = next((d for d in self.decision_steps if d > step), self.total_steps)
        decision = decide(
            self.policy,
            step=step,
            total_steps=self.total_steps,
            next_decision=next_decision,
            frozen=self.frozen,
            block_scores=block_scores,
            savings=self.savings,
            method_params=self.method_params,
            saved=saved_until(step, self.history, self.savings),
        )
        n = self.layout.num_blocks
        entry = {
            **decision.to_dict(),
            "froze_blocks": list(range(decision.frozen_before, decision.frozen_after)),
            "contribution": [self.tracker.mean_contribution(i) for i in range(n)],
            "grad_norm": [self.tracker.mean_grad_norm(i) for i in range(n)],
            "grad_norm_change": [self.tracker.grad_norm_change(i) for i in range(n)],
        }
        entry["scores"] = list(entry["scores"])
        self.decisions.append(entry)
        self.tracker.mark_decision()
        if decision.frozen_after != self.frozen:
            self.frozen = decision.frozen_after
            self.history.append((step, self.frozen))
        if entry["froze_blocks"]:
            shown = ", ".join("-" if s is None else f"{s:.2f}" for s in block_scores)
            logger.info("progtuning: step %d froze block(s) %s (%s; scores %s)", step,
                        _ranges(entry["froze_blocks"]), decision.reason, shown)

    # -- what happened -----------------------------------------------------------------------------
    def realised_stages(self, end_step: int) -> list[dict]:
        """The stages this run went through: frozen prefix, blocks trained, first and end step."""
        stages = []
        for (start, level), (end, _) in zip(self.history, self.history[1:] + [(end_step, None)]):
            end = min(end, end_step)
            if end <= start:
                continue
            stage = self.schedule.stages[level]
            stages.append({"stage": level, "frozen_blocks": level, "blocks": list(stage.blocks),
                           "train_embeddings": stage.train_embeddings, "start_step": start, "end_step": end})
        return stages

    def level_lengths(self, end_step: int) -> list[int]:
        """Optimizer steps run at each rung of the ladder (one entry per stage, for the accounting)."""
        lengths = [0] * self.schedule.num_stages
        for stage in self.realised_stages(end_step):
            lengths[stage["stage"]] += stage["end_step"] - stage["start_step"]
        return lengths

    def summary(self, end_step: int) -> dict:
        """What results.json records about the schedule: the policy, the decision log, the realised stages."""
        total = self.total_steps if self.total_steps is not None else end_step
        return {
            "policy": self.policy.to_dict(),
            "threshold": self.policy.effective_threshold,
            "decision_steps": list(self.decision_steps),
            "max_reduction": max_reduction(self.policy, self.savings, self.method_params, total) if total else None,
            "block_params": list(self.block_params),
            "decisions": list(self.decisions),
            "realised_stages": self.realised_stages(end_step),
        }

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the decisions depend on, as plain JSON numbers."""
        return {
            "policy": self.policy.to_dict(),
            "total_steps": self.total_steps,
            "frozen": self.frozen,
            "history": [list(h) for h in self.history],
            "decisions": list(self.decisions),
            "tracker": self.tracker.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = ContributionPolicy.from_dict(state["policy"])
        if saved != self.policy:
            raise ProgtuningError(
                f"the checkpoint was made with another contribution policy ({saved.to_dict()}): resume with the same "
                "target_reduction, contribution_threshold, decision_interval and signal_every, or start a new run"
            )
        if state.get("total_steps") is not None:
            self.total_steps = None
            self.start(int(state["total_steps"]))
        self.frozen = int(state["frozen"])
        self.history = [(int(s), int(k)) for s, k in state["history"]]
        self.decisions = list(state["decisions"])
        self.tracker = SignalTracker.from_dict(self.layout.num_blocks, state["tracker"])


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def _from_rank_zero(values: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of ``values`` on every rank (a no-op in one process), back on the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = str(dist.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        shared = values.to(device)
        dist.broadcast(shared, src=0)
        return shared.cpu()
    return values.cpu()


def _ranges(blocks: list[int]) -> str:
    return f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
