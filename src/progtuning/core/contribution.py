"""Freeze by measured contribution: the policy, the signals' bookkeeping and the decision rule (no torch).

The paper's schedule is fixed in advance: part t stops training at epoch t, whatever the blocks
are doing. The *contribution* schedule decides during the run, from what each block is doing,
how many of the lowest blocks stop training — always a prefix, so backward still stops early and
the frozen-prefix cache still works, and frozen blocks never train again.

The signal. A block's contribution to one optimizer step is the first-order loss decrease its own
update causes, ``c_i = -<g_i, ΔW_i>`` (gradient times update, summed over the block's trainable
parameters: the loss-change allocation of Lan et al., 2019). It is what freezing the block gives
up, it is zero for a block whose gradients vanish *and* for one whose updates have turned to noise
(Adam moves every block by about the learning rate, whatever its gradient's size, so the update
alone cannot tell), and it costs no copy of the weights: ``<g, W>`` is taken just before the
optimizer step and again just after, with the same gradient. Each measured step feeds a
bias-corrected exponential moving average per block; the gradient norm's average and its relative
change between decisions (the AutoFreeze signal) are kept beside it for the log.

The decision, every ``interval`` of the run's optimizer steps (default 10%): a block's *score* is
its contribution per trainable parameter relative to the most contributing block still training
(so the best block scores 1). From the bottom up, the blocks scoring below ``threshold`` are ready.

* Without a target, the ready prefix freezes.
* With ``target_reduction`` r (the fraction of updated parameters to save against no freezing, the
  measure ``results.json`` reports as ``reduction``), the ready prefix freezes only as far as the
  target needs (its saving, held to the end, reaches r), and if the signals are too slow, the
  blocks the target needs freeze at the last decision from which r can still be reached (a
  *deadline*). The realised reduction then lands at r or just above it (a block is the smallest
  step); it falls short only when r is out of reach, which :func:`max_reduction` says up front.

Savings are counted the way :mod:`progtuning.core.counting` counts them: ``savings[k]`` is how many
of the method's trainable parameters do *not* train while the lowest k blocks are frozen (the
embeddings too, where the embedding policy freezes them), per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

from progtuning.errors import ProgtuningError

DEFAULT_THRESHOLD = 0.3
SCHEDULES: tuple[str, ...] = ("fixed", "contribution")


@dataclass(frozen=True)
class ContributionPolicy:
    """The user's knobs for the contribution schedule (also what results.json and checkpoints record)."""

    target_reduction: float | None = None  # fraction of updated parameters to save vs no freezing
    threshold: float | None = None  # score below which a block is ready (None: DEFAULT_THRESHOLD)
    interval: float = 0.1  # fraction of the run's optimizer steps between decisions
    signal_every: int = 1  # measure the signals every N optimizer steps
    ema_decay: float = 0.9  # per measurement
    max_frozen: int | None = None  # at most this many blocks freeze (None: all but the top block)

    def __post_init__(self) -> None:
        check_policy_values(self.target_reduction, self.threshold, self.interval, self.signal_every,
                            self.ema_decay, self.max_frozen)

    @property
    def effective_threshold(self) -> float:
        return DEFAULT_THRESHOLD if self.threshold is None else float(self.threshold)

    def frozen_limit(self, num_blocks: int) -> int:
        limit = num_blocks - 1 if self.max_frozen is None else min(self.max_frozen, num_blocks - 1)
        return max(0, limit)

    def decision_steps(self, total_steps: int) -> list[int]:
        """The optimizer steps (0-based, before the step runs) at which decisions are made."""
        steps = []
        d = 1
        while d * self.interval < 1 - 1e-12:
            step = math.floor(d * self.interval * total_steps + 1e-9)
            if 0 < step < total_steps and (not steps or step > steps[-1]):
                steps.append(step)
            d += 1
        return steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ContributionPolicy":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_policy_values(
    target_reduction: float | None,
    threshold: float | None,
    interval: float,
    signal_every: int,
    ema_decay: float = 0.9,
    max_frozen: int | None = None,
) -> None:
    """One-line errors for knob values that cannot work (shared by the policy and the config)."""
    if target_reduction is not None and not 0 < target_reduction < 1:
        raise ProgtuningError(
            f"target_reduction must lie in (0, 1) (a fraction of updated parameters to save), got {target_reduction}"
        )
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ProgtuningError(f"contribution_threshold must be a number >= 0, got {threshold}")
    if not (math.isfinite(interval) and 0 < interval < 1):
        raise ProgtuningError(
            f"decision_interval must lie in (0, 1) (a fraction of the run's optimizer steps), got {interval}"
        )
    if int(signal_every) != signal_every or signal_every < 1:
        raise ProgtuningError(f"signal_every must be a whole number >= 1, got {signal_every}")
    if not 0 <= ema_decay < 1:
        raise ProgtuningError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    if max_frozen is not None and max_frozen < 0:
        raise ProgtuningError(f"max_frozen must be >= 0, got {max_frozen}")


# ------------------------------------------------------------------------------------------------
# signals
# ------------------------------------------------------------------------------------------------
@dataclass
class SignalTracker:
    """Bias-corrected moving averages of each block's contribution and gradient norm (plain floats).

    Its whole state is a few floats per block, so it travels in a checkpoint's JSON and a resumed
    run continues with exactly the same numbers.
    """

    num_blocks: int
    decay: float = 0.9
    contribution: list[float] = field(default_factory=list)  # raw (uncorrected) averages
    grad_norm: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # measurements per block (for the bias correction)
    grad_norm_at_decision: list[float | None] = field(default_factory=list)  # for the rate of change

    def __post_init__(self) -> None:
        n = self.num_blocks
        self.contribution = list(self.contribution) or [0.0] * n
        self.grad_norm = list(self.grad_norm) or [0.0] * n
        self.counts = list(self.counts) or [0] * n
        self.grad_norm_at_decision = list(self.grad_norm_at_decision) or [None] * n

    def update(self, contributions: Sequence[float | None], grad_norms: Sequence[float | None]) -> None:
        """One measured step; ``None`` (or NaN) for a block that did not train in it."""
        for i, (c, g) in enumerate(zip(contributions, grad_norms)):
            if c is None or g is None or math.isnan(c) or math.isnan(g):
                continue
            self.contribution[i] = self.decay * self.contribution[i] + (1 - self.decay) * c
            self.grad_norm[i] = self.decay * self.grad_norm[i] + (1 - self.decay) * g
            self.counts[i] += 1

    def _corrected(self, values: list[float], i: int) -> float | None:
        if self.counts[i] == 0:
            return None
        return values[i] / (1 - self.decay ** self.counts[i])

    def mean_contribution(self, i: int) -> float | None:
        return self._corrected(self.contribution, i)

    def mean_grad_norm(self, i: int) -> float | None:
        return self._corrected(self.grad_norm, i)

    def grad_norm_change(self, i: int) -> float | None:
        """Relative change of the gradient-norm average since the last decision (AutoFreeze's signal)."""
        now, before = self.mean_grad_norm(i), self.grad_norm_at_decision[i]
        if now is None or before is None or before == 0:
            return None
        return abs(now - before) / before

    def mark_decision(self) -> None:
        self.grad_norm_at_decision = [self.mean_grad_norm(i) for i in range(self.num_blocks)]

    def to_dict(self) -> dict:
        return {
            "decay": self.decay,
            "contribution": list(self.contribution),
            "grad_norm": list(self.grad_norm),
            "counts": list(self.counts),
            "grad_norm_at_decision": list(self.grad_norm_at_decision),
        }

    @classmethod
    def from_dict(cls, num_blocks: int, data: dict) -> "SignalTracker":
        return cls(num_blocks, float(data["decay"]), list(data["contribution"]), list(data["grad_norm"]),
                   [int(c) for c in data["counts"]], list(data["grad_norm_at_decision"]))


def scores(tracker: SignalTracker, frozen: int, block_params: Sequence[int]) -> list[float | None]:
    """Each trainable block's contribution per parameter, relative to the best trainable block's.

    ``None`` for frozen or not yet measured blocks; 0 for a block the method trains nothing in
    (freezing it costs nothing). If no trainable block reduces the loss any more (the best average
    is <= 0), every measured block scores 0: nothing is worth keeping on.
    """
    n = tracker.num_blocks
    rates: list[float | None] = [None] * n
    for i in range(frozen, n):
        mean = tracker.mean_contribution(i)
        if block_params[i] == 0:
            rates[i] = 0.0
        elif mean is not None:
            rates[i] = mean / block_params[i]
    measured = [r for i, r in enumerate(rates) if r is not None and block_params[i] > 0]
    if not measured:
        return [None if r is None else 0.0 for r in rates]
    best = max(measured)
    if best <= 0:
        return [None if r is None else 0.0 for r in rates]
    return [None if r is None else r / best for r in rates]


# ------------------------------------------------------------------------------------------------
# the decision
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What one decision did and why (a line of the decision log)."""

    step: int
    frozen_before: int
    frozen_after: int
    reason: str  # "signals", "signals (capped by the target)", "deadline", "hold", "target reached"
    ready: int  # how far the signals alone would freeze
    scores: tuple[float | None, ...]
    projected_reduction: float  # if nothing else froze until the end of the run

    def to_dict(self) -> dict:
        return asdict(self)


def saved_until(step: int, history: Sequence[tuple[int, int]], savings: Sequence[int]) -> float:
    """Parameter-steps saved before ``step``; ``history`` is [(first step, frozen blocks), ...] in order."""
    total = 0.0
    for (start, level), (end, _) in zip(history, list(history[1:]) + [(step, None)]):
        total += max(0, min(end, step) - start) * savings[level]
    return total


def decide(
    policy: ContributionPolicy,
    *,
    step: int,
    total_steps: int,
    next_decision: int,
    frozen: int,
    block_scores: Sequence[float | None],
    savings: Sequence[int],
    method_params: int,
    saved: float,
) -> Decision:
    """How many of the lowest blocks are frozen from ``step`` on (never fewer than ``frozen``).

    ``next_decision`` is the step of the next decision (``total_steps`` if this is the last one),
    ``saved`` the parameter-steps saved so far (:func:`saved_until`).
    """
    limit = max(frozen, min(policy.frozen_limit(len(savings)), len(savings) - 1))
    threshold = policy.effective_threshold
    ready = frozen
    while ready < limit and block_scores[ready] is not None and block_scores[ready] < threshold:
        ready += 1
    remaining = total_steps - step

    def projected(level: int) -> float:
        baseline = float(total_steps) * method_params
        return (saved + savings[level] * remaining) / baseline if baseline else 0.0

    if policy.target_reduction is None:
        after = ready
        reason = "signals" if after > frozen else "hold"
        return Decision(step, frozen, after, reason, ready, tuple(block_scores), projected(after))

    target = policy.target_reduction
    budget = target * float(total_steps) * method_params
    levels = range(frozen, limit + 1)
    # the fewest frozen blocks whose saving, held to the end, reaches the target
    cap = next((k for k in levels if saved + savings[k] * remaining >= budget), limit)
    # the fewest frozen blocks now from which the target is still reachable at the next decision
    later = total_steps - next_decision
    need = next(
        (k for k in levels if saved + savings[k] * (next_decision - step) + savings[limit] * later >= budget),
        limit,
    )
    wanted = min(ready, cap)
    after = max(need, wanted)
    if after > wanted:
        reason = "deadline"
    elif after > frozen:
        reason = "signals (capped by the target)" if ready > cap else "signals"
    else:
        reason = "target reached" if ready > frozen and cap == frozen else "hold"
    return Decision(step, frozen, after, reason, ready, tuple(block_scores), projected(after))


def max_reduction(
    policy: ContributionPolicy, savings: Sequence[int], method_params: int, total_steps: int | None = None
) -> float:
    """The largest reduction the policy can reach: the most blocks frozen at the first decision.

    ``total_steps=None``: before the run's length is known, with the first decision at exactly
    ``interval`` of the run (a real run's falls on a whole step at or before it, so it can only do better).
    """
    if not method_params:
        return 0.0
    limit = policy.frozen_limit(len(savings))
    if total_steps is None:
        first = policy.interval
    else:
        steps = policy.decision_steps(total_steps)
        if not steps:
            return savings[0] / method_params
        first = steps[0] / total_steps
    return (savings[0] * first + savings[limit] * (1 - first)) / method_params


def check_target_reachable(
    policy: ContributionPolicy, savings: Sequence[int], method_params: int, total_steps: int | None = None
) -> None:
    """One line if ``target_reduction`` is out of reach for this model, method and run length."""
    if policy.target_reduction is None:
        return
    best = max_reduction(policy, savings, method_params, total_steps)
    if policy.target_reduction > best + 1e-12:
        raise ProgtuningError(
            f"target_reduction {policy.target_reduction:g} is out of reach: freezing all but the top block from the "
            f"first decision ({policy.interval:.0%} of the steps) saves at most {best:.1%} of the updated parameters "
            "here; lower target_reduction, decide earlier (decision_interval), or freeze the embeddings too "
            "(embeddings: first_stage)"
        )
