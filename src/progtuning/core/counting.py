"""What *did* train: parameters per stage, updated parameters of a run, and the reduction.

The paper's measure is the number of updated parameters. A stage that runs for a while updates
every parameter trainable in it, so a run updates Σ_t (length of stage t) × (trainable in stage t)
*parameter-epochs*; the same run without Progtuning updates (epochs) × (the method's trainable set).
The reduction is one minus their ratio. It is given twice: over everything the method trains, and
over block parameters only (the embeddings and head excluded), which is the part Progtuning acts on.

Stage lengths come in any unit (epochs for a plan, optimizer steps for a real run); they are
converted to epochs so that numbers from plans and runs compare. Tied weights count once: a tied
output embedding as head (see :mod:`progtuning.core.blocks`). A table one block keeps for its whole
stack (T5's relative attention bias) counts in every stage where a block it serves trains.

For BERT-base with T=3 stages, embeddings always trained: 25.9% (blocks only: 33.3%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from progtuning.core.blocks import HEAD
from progtuning.core.freezing import ProgressiveFreezer


@dataclass(frozen=True)
class StageCount:
    index: int
    blocks: tuple[int, ...]
    train_embeddings: bool
    trainable_params: int  # inside the method's trainable set
    trainable_block_params: int
    epochs: float  # how long the stage ran (or is planned to run), in epochs


@dataclass(frozen=True)
class Accounting:
    stages: tuple[StageCount, ...]
    epochs: float
    total_params: int  # every parameter of the model, trainable or not
    method_trainable_params: int  # what the method trains (the baseline run's trainable set)
    head_params: int
    updated_params: int  # parameter-epochs with Progtuning
    baseline_updated_params: int  # parameter-epochs of the same run without it
    reduction: float
    updated_block_params: int
    baseline_updated_block_params: int
    reduction_blocks_only: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_updates(freezer: ProgressiveFreezer, stage_lengths: Sequence[float], epochs: float | None = None) -> Accounting:
    """Account a run whose stages lasted ``stage_lengths`` (any unit) and which ran ``epochs`` epochs.

    With ``epochs`` omitted the lengths are taken to be epochs already.
    """
    if len(stage_lengths) != freezer.schedule.num_stages:
        raise ValueError(f"need one length per stage ({freezer.schedule.num_stages}), got {len(stage_lengths)}")
    total_length = float(sum(stage_lengths))
    epochs = total_length if epochs is None else float(epochs)
    to_epochs = epochs / total_length if total_length else 0.0
    sizes = {name: p.numel() for name, p in freezer.params.items()}
    groups = freezer.layout.groups
    method = freezer.method_trainable
    block_names = [n for n in method if isinstance(groups[n], int)]

    stages = []
    for stage, length in zip(freezer.schedule.stages, stage_lengths):
        names = freezer.stage_names(stage)
        stages.append(
            StageCount(
                index=stage.index,
                blocks=stage.blocks,
                train_embeddings=stage.train_embeddings,
                trainable_params=sum(sizes[n] for n in names),
                trainable_block_params=sum(sizes[n] for n in names if isinstance(groups[n], int)),
                epochs=length * to_epochs,
            )
        )
    method_params = sum(sizes[n] for n in method)
    method_block_params = sum(sizes[n] for n in block_names)
    updated = sum(s.epochs * s.trainable_params for s in stages)
    updated_blocks = sum(s.epochs * s.trainable_block_params for s in stages)
    baseline = epochs * method_params
    baseline_blocks = epochs * method_block_params
    return Accounting(
        stages=tuple(stages),
        epochs=epochs,
        total_params=sum(sizes.values()),
        method_trainable_params=method_params,
        head_params=sum(sizes[n] for n in method if groups[n] == HEAD),
        updated_params=round(updated),
        baseline_updated_params=round(baseline),
        reduction=_reduction(updated, baseline),
        updated_block_params=round(updated_blocks),
        baseline_updated_block_params=round(baseline_blocks),
        reduction_blocks_only=_reduction(updated_blocks, baseline_blocks),
    )


def plan_updates(freezer: ProgressiveFreezer, epochs: int | None = None) -> Accounting:
    """Account a planned run of ``epochs`` epochs (default: one epoch per stage)."""
    schedule = freezer.schedule
    if epochs is None:
        epochs = schedule.num_stages if schedule.unit == "epoch" else 1
    if schedule.unit == "epoch":
        lengths = schedule.stage_lengths(steps_per_epoch=1, total_steps=epochs)
    else:
        # Fractions of the run: each stage lasts from its start to the next one's (the last to 1).
        starts = [stage.start for stage in schedule.stages] + [1.0]
        lengths = [starts[i + 1] - starts[i] for i in range(schedule.num_stages)]
    return count_updates(freezer, lengths, epochs=epochs)


def _reduction(updated: float, baseline: float) -> float:
    return 1.0 - updated / baseline if baseline else 0.0
