"""What each stage of Progtuning costs a decoder language model, in time and peak memory, against its baseline.

Run it (CPU, one thread)::

    python -m progtuning.runs.lm_bench --model smollm2-135m --task sms-spam-instruct --batch 8 \\
        --stages 3 --rounds 3 --threads 1 --json docs/results/decoders/bench.json

In one process, on the real model and real batches (the task's first training examples, tokenized
as ``progtuning train`` tokenizes them: chat template, loss on responses only, ``--max-length``):

* **Cases.** Full fine-tuning and LoRA (r=8 on the attention query/value projections), each in
  every stage of the paper's schedule (T = ``--stages`` parts, embeddings trained in every stage);
  stage 1 trains everything the method trains, so it *is* the method's baseline. With
  ``--checkpointing``, full fine-tuning again with gradient checkpointing of the stage's trainable
  blocks (:mod:`progtuning.core.checkpointing`).
* **Timing**, as ``progtuning bench`` does it: every round runs every case for ``--steps`` optimizer
  steps (forward, backward, AdamW, ``zero_grad``), so drift and other processes' load hit all cases
  alike; a case's time is the median of its steps in a round, then over rounds, in process CPU
  time (robust to a shared machine) on CPU, wall time on a GPU.
* **Memory**: one step per case with AdamW state for exactly the stage's trainable parameters (what
  the freezer leaves after releasing the rest). Peak = the weights + that optimizer state + the
  growth of resident memory over the idle process during the step (gradients, activations,
  temporaries), sampled every millisecond with glibc told to hand freed blocks back at once (as
  ``progtuning bench`` samples it). Also ``activations_mb`` (what autograd saved for backward) and
  ``optimizer_state_mb``. CPU only.

Never assert on these numbers in tests: they are measurements, noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from progtuning.core.checkpointing import StageCheckpointing
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.core.schedule import progressive

# Measuring helpers shared with the encoder bench (sampling RSS, counting saved tensors, ...).
from progtuning.core.freezing import return_freed_memory as _release_memory
from progtuning.runs.bench_memory import (
    PeakSampler as _PeakSampler,
    SavedTensors as _SavedTensors,
    init_adam_state as _init_adam_state,
    module_mb as _module_mb,
    optimizer_mb as _optimizer_mb,
    return_freed_memory_at_once as _return_freed_memory_at_once,
    rss as _rss,
)


@dataclass
class LMBenchConfig:
    model: str = "smollm2-135m"
    task: str = "sms-spam-instruct"
    max_length: int = 128
    batch: int = 8
    stages: int = 3
    rounds: int = 3
    steps: int = 2
    threads: int | None = 1
    lora_r: int = 8
    checkpointing: bool = False
    memory: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Case:
    method: str  # "full" or "lora"
    stage: int  # 0-based stage of the schedule
    checkpointing: bool = False

    @property
    def label(self) -> str:
        return f"{self.method}{'+ckpt' if self.checkpointing else ''} stage {self.stage + 1}"


def _load(config: LMBenchConfig, method: str) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer

    from progtuning.methods.api import MethodConfig, apply_method
    from progtuning.runs.models import resolve_model
    from progtuning.tasks.lm import CausalLMTask

    path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(config.seed)
    model = CausalLMTask(name="bench", format="text").load_model(path)
    model = apply_method(model, MethodConfig(name=method, lora_r=config.lora_r), task_type="causal_lm")
    model.train()
    return model, tokenizer


def _batch(config: LMBenchConfig, tokenizer) -> dict[str, torch.Tensor]:
    from progtuning.tasks.registry import load_task

    settings = SimpleNamespace(
        task=config.task, train_file=None, max_train_examples=config.batch, max_eval_examples=config.batch,
        seed=config.seed, packing=None, max_new_tokens=1, generate_examples=0, max_length=config.max_length,
    )
    task, data = load_task(settings)
    features = task.preprocess(data, tokenizer, settings)
    rows = [features.train[i] for i in range(config.batch)]
    return task.collator(tokenizer)(rows)


class _LMBench:
    def __init__(self, config: LMBenchConfig) -> None:
        self.config = config
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.batch: dict[str, torch.Tensor] = {}

    def add(self, method: str) -> None:
        model, tokenizer = _load(self.config, method)
        if not self.batch:
            self.batch = _batch(self.config, tokenizer)
        self.models[method] = model
        self.optimizers[method] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        self._step(model, self.optimizers[method])  # allocate the optimizer state once

    def _step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model(**self.batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _staged(self, case: Case):
        model = self.models[case.method]
        freezer = ProgressiveFreezer(model, progressive(_num_blocks(model), self.config.stages, "always"))
        freezer.apply(case.stage)
        checkpointing = StageCheckpointing(SimpleNamespace(freezer=freezer)) if case.checkpointing else None
        if checkpointing:
            checkpointing.on_train_begin(None, None, None, model=model)
        model.train()
        return model, freezer, checkpointing

    def _unstage(self, model, freezer, checkpointing) -> None:
        if checkpointing:
            checkpointing.on_train_end(None, None, None, model=model)
        freezer.restore()
        freezer.close()

    def time_case(self, case: Case) -> list[float]:
        model, freezer, checkpointing = self._staged(case)
        clock = time.process_time if not torch.cuda.is_available() else time.perf_counter
        times = []
        try:
            for _ in range(self.config.steps):
                start = clock()
                self._step(model, self.optimizers[case.method])
                times.append(clock() - start)
        finally:
            self._unstage(model, freezer, checkpointing)
        return times

    def memory_case(self, case: Case) -> dict:
        model, freezer, checkpointing = self._staged(case)
        try:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=0.0)
            _init_adam_state(optimizer, params)
            _release_memory()
            saved = _SavedTensors({p.untyped_storage().data_ptr() for p in model.parameters()})
            idle = _rss()
            with _PeakSampler() as sampler, saved:
                self._step(model, optimizer)
            state_mb = _optimizer_mb(optimizer)  # allocated before `idle`: added, not sampled
            result = {
                "peak_mb": _module_mb(model) + state_mb + (sampler.peak - idle) / 2**20,
                "activations_mb": saved.nbytes / 2**20,
                "optimizer_state_mb": state_mb,
                "trainable_params": sum(p.numel() for p in params),
            }
            del optimizer
        finally:
            self._unstage(model, freezer, checkpointing)
        return result


def _num_blocks(model: nn.Module) -> int:
    from progtuning.core.blocks import find_blocks

    return find_blocks(model).num_blocks


def run_lm_bench(config: LMBenchConfig | None = None, *, log: Callable[[str], None] | None = print, **overrides) -> dict:
    """Measure every case (see the module docstring); returns the JSON-ready results."""
    config = config or LMBenchConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    if config.threads:
        torch.set_num_threads(config.threads)
    log = log or (lambda _message: None)
    started = time.perf_counter()
    _return_freed_memory_at_once()
    bench = _LMBench(config)
    cases = []
    for method in ("full", "lora"):
        bench.add(method)
        cases += [Case(method, stage) for stage in range(config.stages)]
    if config.checkpointing:
        cases += [Case("full", stage, checkpointing=True) for stage in range(config.stages)]
    log(f"lm-bench: {len(cases)} cases, batch {tuple(bench.batch['input_ids'].shape)}, "
        f"{int((bench.batch['labels'] != -100).sum())} response tokens ({time.perf_counter() - started:.0f}s)")

    per_round: dict[Case, list[float]] = {case: [] for case in cases}
    for round_index in range(config.rounds):
        for case in cases:
            per_round[case].append(statistics.median(bench.time_case(case)))
        log(f"lm-bench: round {round_index + 1}/{config.rounds} done ({time.perf_counter() - started:.0f}s)")
    memory = {}
    if config.memory:
        for case in cases:
            memory[case] = bench.memory_case(case)
        log(f"lm-bench: memory done ({time.perf_counter() - started:.0f}s)")

    rows = []
    for case in cases:
        baseline = Case(case.method, 0)
        step = statistics.median(per_round[case])
        row = {
            **asdict(case),
            "label": case.label,
            "step_s": round(step, 4),
            "time_ratio": round(step / statistics.median(per_round[baseline]), 4),
        }
        if case in memory:
            row.update({k: round(v, 3) if isinstance(v, float) else v for k, v in memory[case].items()})
            row["memory_ratio"] = round(memory[case]["peak_mb"] / memory[baseline]["peak_mb"], 4)
            row["memory_ratio_vs_full"] = round(memory[case]["peak_mb"] / memory[Case("full", 0)]["peak_mb"], 4)
        rows.append(row)
    return {
        "config": asdict(config),
        "batch_shape": list(bench.batch["input_ids"].shape),
        "response_tokens": int((bench.batch["labels"] != -100).sum()),
        "num_blocks": _num_blocks(bench.models["full"]),
        "cases": rows,
        "clock": "process CPU time" if not torch.cuda.is_available() else "wall",
        "memory_measure": "weights + peak RSS growth over the idle process (1 ms sampling)",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def markdown_table(results: dict) -> str:
    lines = [
        "| case | trainable params | step (CPU s) | time vs baseline | peak memory (MB) | vs baseline | vs full | activations (MB) | optimizer state (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["cases"]:
        lines.append(
            f"| {row['label']} | {row.get('trainable_params', 0):,} | {row['step_s']:.2f} | {row['time_ratio']:.2f} | "
            f"{row.get('peak_mb', float('nan')):,.0f} | {row.get('memory_ratio', float('nan')):.2f} | "
            f"{row.get('memory_ratio_vs_full', float('nan')):.2f} | {row.get('activations_mb', float('nan')):,.0f} | "
            f"{row.get('optimizer_state_mb', float('nan')):,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = LMBenchConfig()
    parser = argparse.ArgumentParser(prog="python -m progtuning.runs.lm_bench", description=__doc__.splitlines()[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else int, default=value)
    parser.add_argument("--json", help="write the results here")
    args = vars(parser.parse_args(argv))
    out = args.pop("json")
    results = run_lm_bench(LMBenchConfig(**args), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown_table(results))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
