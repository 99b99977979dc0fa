"""Which blocks train in stage t, and when stage t starts — pure data, no torch.

A model is embeddings E, blocks B_0 … B_{L-1} (bottom to top) and a head H. A
:class:`Schedule` is an ordered list of :class:`Stage` objects, each naming the blocks it trains
and whether the embeddings train, plus the point where each stage starts: an epoch number
(``unit="epoch"``, the paper) or a fraction of the run's optimizer steps (``unit="fraction"``,
so a one-epoch or ``max_steps`` run still progresses). The head always trains.

The paper's preset (:func:`progressive`) splits the L blocks into T parts of ⌊L/T⌋ consecutive
blocks, the leftover blocks going to the top part, and stage t trains parts t … T. Any other
order — growing, top-down, custom — is an :func:`explicit` list of block sets.

Given the run's length (``epochs``), the stages get equal shares of it: one epoch each when there
are as many stages as epochs (the paper), E/T epochs each when T divides E, and otherwise equal
shares of the optimizer steps (``unit="fraction"``): 6 epochs in 3 stages are 2 + 2 + 2 epochs, 2
epochs in 3 stages a third of the steps each. A run too short to give every stage a step is
refused (:meth:`Schedule.check_every_stage_runs`), never trained with a stage left out.

Example::

    >>> s = progressive(num_blocks=12, num_stages=3)
    >>> [st.blocks for st in s.stages]
    [(0, 1, ..., 11), (4, ..., 11), (8, 9, 10, 11)]
    >>> s.stage_starts(steps_per_epoch=100, total_steps=300)
    [0, 100, 200]
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Sequence

from progtuning.errors import ProgtuningError

EmbeddingPolicy = Literal["always", "first_stage", "never"]
Unit = Literal["epoch", "fraction"]
EMBEDDING_POLICIES: tuple[str, ...] = ("always", "first_stage", "never")
UNITS: tuple[str, ...] = ("epoch", "fraction")


@dataclass(frozen=True)
class Stage:
    """What trains in one stage: these blocks (indices, bottom = 0), the embeddings or not, and the head."""

    index: int
    blocks: tuple[int, ...]
    train_embeddings: bool
    start: float  # epoch number (unit "epoch") or fraction of all optimizer steps (unit "fraction")


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages over a model with ``num_blocks`` blocks."""

    num_blocks: int
    stages: tuple[Stage, ...]
    unit: Unit = "epoch"
    embeddings: EmbeddingPolicy = "always"
    name: str = "custom"

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_starts(self, steps_per_epoch: int, total_steps: int) -> list[int]:
        """The optimizer step (0-based) at which each stage takes effect.

        A start past the end of the run is clamped to ``total_steps``, so a too-short run simply
        never reaches the later stages (and the accounting counts zero steps for them).
        """
        if steps_per_epoch < 1 or total_steps < 0:
            raise ProgtuningError(
                f"a run needs steps_per_epoch >= 1 and total_steps >= 0, got {steps_per_epoch} and {total_steps}"
            )
        per_unit = steps_per_epoch if self.unit == "epoch" else total_steps
        return [min(total_steps, math.floor(stage.start * per_unit + 1e-9)) for stage in self.stages]

    def stage_at(self, step: int, steps_per_epoch: int, total_steps: int) -> int:
        """Index of the stage in effect for optimizer step ``step`` (0-based: the step about to run)."""
        starts = self.stage_starts(steps_per_epoch, total_steps)
        current = 0
        for index, start in enumerate(starts):
            if step >= start:
                current = index
        return current

    def stage_lengths(self, steps_per_epoch: int, total_steps: int) -> list[int]:
        """How many optimizer steps each stage runs for in a run of ``total_steps`` steps."""
        starts = self.stage_starts(steps_per_epoch, total_steps) + [total_steps]
        return [max(0, starts[i + 1] - starts[i]) for i in range(self.num_stages)]

    def check_every_stage_runs(self, steps_per_epoch: int, total_steps: int) -> None:
        """Refuse, in one line, a run in which some stage would get no optimizer step."""
        lengths = self.stage_lengths(steps_per_epoch, total_steps)
        if total_steps < 1 or all(lengths):
            return
        empty = lengths.index(0)
        if self.unit == "fraction":
            raise ProgtuningError(
                f"stage {empty} of {self.num_stages} would get no optimizer step: the run has only {total_steps} "
                f"step(s); use at most {total_steps} stages (--stages) or a longer run"
            )
        start = self.stages[empty].start
        raise ProgtuningError(
            f"stage {empty} starts at epoch {start:g}, but the run ends after {total_steps / steps_per_epoch:.3g} "
            f"epoch(s) ({total_steps} optimizer steps), so it would never train: use fewer stages (--stages), "
            "stage_unit fraction, or a longer run"
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_blocks": self.num_blocks,
            "unit": self.unit,
            "embeddings": self.embeddings,
            "stages": [
                {"blocks": list(s.blocks), "train_embeddings": s.train_embeddings, "start": s.start}
                for s in self.stages
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        stages = tuple(
            Stage(index=i, blocks=tuple(s["blocks"]), train_embeddings=bool(s["train_embeddings"]), start=s["start"])
            for i, s in enumerate(data["stages"])
        )
        schedule = cls(
            num_blocks=int(data["num_blocks"]),
            stages=stages,
            unit=data.get("unit", "epoch"),
            embeddings=data.get("embeddings", "always"),
            name=data.get("name", "custom"),
        )
        _validate(schedule)
        return schedule

    def fingerprint(self) -> str:
        """A short hash that changes whenever what trains when changes (used to check a resume)."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def describe(self) -> list[dict]:
        return [asdict(stage) for stage in self.stages]


def split_into_parts(num_blocks: int, num_parts: int) -> list[tuple[int, ...]]:
    """The paper's parts: ⌊L/T⌋ consecutive blocks each, the leftover blocks added to the top part."""
    if num_parts < 1:
        raise ProgtuningError(f"the number of stages must be at least 1, got {num_parts}")
    if num_parts > num_blocks:
        raise ProgtuningError(
            f"{num_parts} stages need at least {num_parts} blocks but the model has {num_blocks}: "
            f"use at most {num_blocks} stages (--stages) or an explicit schedule"
        )
    size = num_blocks // num_parts
    parts = [tuple(range(p * size, (p + 1) * size)) for p in range(num_parts)]
    parts[-1] = tuple(range((num_parts - 1) * size, num_blocks))
    return parts


def _embedding_flags(policy: str, num_stages: int) -> list[bool]:
    if policy not in EMBEDDING_POLICIES:
        raise ProgtuningError(f"unknown embedding policy {policy!r}: use one of {', '.join(EMBEDDING_POLICIES)}")
    if policy == "always":
        return [True] * num_stages
    if policy == "first_stage":
        return [True] + [False] * (num_stages - 1)
    return [False] * num_stages


def equal_shares(num_stages: int, unit: str = "epoch", epochs: float | None = None) -> tuple[str, list[float]]:
    """The unit and the starts that give ``num_stages`` stages equal shares of a run of ``epochs`` epochs.

    Without ``epochs`` an epoch schedule starts one stage per epoch (the paper). With it, a stage lasts
    ``epochs / num_stages`` epochs when that is a whole number, and otherwise the same number of
    optimizer steps (fractions of the run): never 1 + 1 + 4 epochs, never an empty last stage.
    """
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise ProgtuningError(f"a run needs a positive, finite number of epochs, got {epochs}")
    fractions = [i / num_stages for i in range(num_stages)]
    if unit != "epoch" or num_stages < 1:  # (no stage at all is refused by the schedule's validation)
        return unit, fractions
    if epochs is None:
        return "epoch", [float(i) for i in range(num_stages)]
    per_stage = epochs / num_stages
    if per_stage.is_integer():
        return "epoch", [float(i * per_stage) for i in range(num_stages)]
    return "fraction", fractions


def _starts(num_stages: int, unit: str, starts: Sequence[float] | None, epochs: float | None) -> tuple[str, list[float]]:
    if starts is not None:
        return unit, list(starts)  # the caller's own starts, in the caller's unit
    return equal_shares(num_stages, unit, epochs)


def progressive(
    num_blocks: int,
    num_stages: int,
    embeddings: EmbeddingPolicy = "always",
    unit: Unit = "epoch",
    starts: Sequence[float] | None = None,
    epochs: float | None = None,
) -> Schedule:
    """The paper's schedule: stage t trains parts t … T (T = ``num_stages``, usually the epochs).

    ``epochs``, the run's length, spreads the stages over it in equal shares (see :func:`equal_shares`);
    ``starts`` sets them by hand instead.
    """
    parts = split_into_parts(num_blocks, num_stages)
    flags = _embedding_flags(embeddings, num_stages)
    unit, starts = _starts(num_stages, unit, starts, epochs)
    stages = tuple(
        Stage(
            index=t,
            blocks=tuple(b for part in parts[t:] for b in part),
            train_embeddings=flags[t],
            start=float(starts[t]) if t < len(starts) else float("nan"),
        )
        for t in range(num_stages)
    )
    schedule = Schedule(num_blocks, stages, unit=unit, embeddings=embeddings, name="progressive")
    _validate(schedule, num_starts=len(starts))
    return schedule


def explicit(
    num_blocks: int,
    stages: Sequence[Iterable[int]],
    embeddings: EmbeddingPolicy = "always",
    unit: Unit = "epoch",
    starts: Sequence[float] | None = None,
    epochs: float | None = None,
) -> Schedule:
    """Any order: ``stages[t]`` is the set of block indices trained in stage t.

    ``explicit(12, [[9, 10, 11], range(6, 12), range(12)])`` grows top-down, ULMFiT style.
    ``epochs`` and ``starts`` place the stages as in :func:`progressive`.
    """
    block_sets = [tuple(sorted(set(int(b) for b in blocks))) for blocks in stages]
    flags = _embedding_flags(embeddings, len(block_sets))
    unit, starts = _starts(len(block_sets), unit, starts, epochs)
    built = tuple(
        Stage(
            index=t,
            blocks=blocks,
            train_embeddings=flags[t],
            start=float(starts[t]) if t < len(starts) else float("nan"),
        )
        for t, blocks in enumerate(block_sets)
    )
    schedule = Schedule(num_blocks, built, unit=unit, embeddings=embeddings, name="explicit")
    _validate(schedule, num_starts=len(starts))
    return schedule


def no_progtuning(num_blocks: int) -> Schedule:
    """One stage that trains everything: the baseline run, expressed as a schedule."""
    return Schedule(
        num_blocks,
        (Stage(index=0, blocks=tuple(range(num_blocks)), train_embeddings=True, start=0.0),),
        unit="epoch",
        embeddings="always",
        name="none",
    )


def _validate(schedule: Schedule, num_starts: int | None = None) -> None:
    if schedule.unit not in UNITS:
        raise ProgtuningError(f"unknown stage unit {schedule.unit!r}: use 'epoch' or 'fraction'")
    if schedule.num_blocks < 1:
        raise ProgtuningError(f"a schedule needs at least one block, got num_blocks={schedule.num_blocks}")
    if not schedule.stages:
        raise ProgtuningError("a schedule needs at least one stage")
    if num_starts is not None and num_starts != schedule.num_stages:
        raise ProgtuningError(
            f"got {num_starts} stage starts for {schedule.num_stages} stages: give one start per stage"
        )
    for stage in schedule.stages:
        if not stage.blocks:
            raise ProgtuningError(f"stage {stage.index} trains no block: give it at least one block index")
        bad = [b for b in stage.blocks if not 0 <= b < schedule.num_blocks]
        if bad:
            raise ProgtuningError(
                f"stage {stage.index} names block(s) {bad} but the model has blocks 0..{schedule.num_blocks - 1}"
            )
    starts = [stage.start for stage in schedule.stages]
    if not all(math.isfinite(s) for s in starts):
        raise ProgtuningError(f"stage starts must be finite numbers, got {starts}")
    if starts[0] != 0:
        raise ProgtuningError(f"the first stage must start at 0, got {starts[0]}")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ProgtuningError(f"stage starts must be strictly increasing, got {starts}")
    if schedule.unit == "fraction" and not all(0 <= s < 1 for s in starts):
        raise ProgtuningError(f"fraction stage starts must lie in [0, 1), got {starts}")
    if schedule.unit == "epoch" and any(s < 0 for s in starts):
        raise ProgtuningError(f"epoch stage starts must be >= 0, got {starts}")
