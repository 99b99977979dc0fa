"""What each stage cost: wall time, peak resident memory and peak GPU memory, beside the stages.

:class:`StageTelemetry` is a Trainer callback that watches a
:class:`~progtuning.core.callback.ProgtuningCallback` (list it *after* that callback): when the
stage changes it closes the current measurement and opens the next; after every optimizer step it
samples the process's resident memory (psutil) and, on a GPU, ``torch.cuda.max_memory_allocated``
(reset at each stage start, so each stage reports its own peak). :meth:`StageTelemetry.stage_records`
merges these numbers into the callback's stage records, as ``results.json`` stores them::

    progtuning = ProgtuningCallback(schedule)
    trainer = Trainer(..., callbacks=[progtuning, StageTelemetry(progtuning)])
    trainer.train()
    stages = telemetry.stage_records()   # stage, steps, trainable params, loss, wall time, memory
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil
import torch
from transformers import TrainerCallback


@dataclass
class StageCost:
    """One stage as measured: from its first step to the next stage (or the end of training)."""

    stage: int
    start_step: int
    start_time: float = field(default_factory=time.perf_counter)
    wall_time_s: float | None = None
    peak_rss_mb: float = 0.0  # resident memory of this process, sampled after every step
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated over the stage

    def to_dict(self) -> dict:
        return {
            "wall_time_s": self.wall_time_s,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb, 1),
        }


class StageTelemetry(TrainerCallback):
    """Per-stage wall time and peak memory of a run driven by ``progtuning`` (a ProgtuningCallback)."""

    def __init__(self, progtuning) -> None:
        self.progtuning = progtuning
        self.costs: list[StageCost] = []
        self._process = psutil.Process()

    def on_step_begin(self, args, state, control, **kwargs):
        freezer = self.progtuning.freezer
        stage = None if freezer is None else freezer.stage_index
        if stage is None or (self.costs and self.costs[-1].stage == stage and self.costs[-1].wall_time_s is None):
            return
        self._close()
        self.costs.append(StageCost(stage, state.global_step))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        if not self.costs:
            return
        cost = self.costs[-1]
        cost.peak_rss_mb = max(cost.peak_rss_mb, self._process.memory_info().rss / 2**20)
        if torch.cuda.is_available():
            cost.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def stage_records(self) -> list[dict]:
        """The ProgtuningCallback's stage records, each with its measured cost added."""
        costs = {(c.stage, c.start_step): c for c in self.costs}
        merged = []
        for record in self.progtuning.stage_records():
            cost = costs.get((record["stage"], record["start_step"]))
            merged.append({**record, **(cost.to_dict() if cost else StageCost(record["stage"], 0).to_dict())})
        return merged

    def _close(self) -> None:
        if self.costs and self.costs[-1].wall_time_s is None:
            self.costs[-1].wall_time_s = time.perf_counter() - self.costs[-1].start_time
