"""``progtuning bench``: what each stage of Progtuning really costs, against full fine-tuning.

Run it (CPU, one thread, the MiniLM shape)::

    python -m progtuning.runs.bench --hidden 384 --layers 12 --heads 12 --intermediate 1536 \\
        --seq 128 --batch 16 --stages 4 --rounds 3 --threads 1 --json bench.json

What it does, in one process on a randomly initialised model of the given shape:

* **Cases.** Full fine-tuning; Progtuning with each embedding policy (``always``,
  ``first_stage``, ``never``), stage by stage; ``never`` with frozen blocks kept in train mode
  (dropout on) to show what eval mode buys; the frozen-prefix cache (``first_stage`` and
  ``never``), with its incremental build timed separately; LoRA (r=8 on query/value) alone,
  with Progtuning, and with Progtuning and the cache. Identical configurations (stage 0 of
  ``always`` *is* full fine-tuning, stage t ≥ 1 of ``first_stage`` *is* stage t of ``never``)
  are measured once.
* **Timing.** One optimizer step is forward + backward + AdamW + ``zero_grad``. Every round
  runs every case for ``--steps`` steps, so slow drift and other processes' load hit all cases
  alike; a case's time is the median over its steps in a round, then over rounds. Frozen
  parameters have ``.grad = None``, which AdamW skips, exactly as in a real run.
* **Whole schedule.** With T equal epochs, ``Σ_t (step_t + build_t) / (T · step_full)``, where
  ``build_t`` is the time to extend the cache over one batch of examples (the cache is built
  once per epoch over the same examples the epoch trains on, so per step this is the cost).
* **FLOP model** (the bound each ratio is compared with). A block's forward costs 1 unit; its
  backward costs 1 unit for the gradient of its input plus 1 unit for the gradients of its
  weights. With L blocks and k the lowest block that trains:
  embeddings trainable: L + 2(L−k) + k  (blocks below k still pass gradients down);
  embeddings frozen: L + 2(L−k)  (autograd builds no graph below block k);
  cached: 3(L−k), plus the build, one eval forward per newly frozen block;
  LoRA (base frozen, weight gradients ≈ 0): L + (L−k), cached 2(L−k).
  Embeddings, head, dropout and the optimizer are not modelled: dropout makes a training forward
  dearer than this model says, so eval-mode frozen blocks can beat it. (Strictly, block k needs
  no input gradient either, one unit less; the ratios keep the simpler model.)
* **Memory** (after the timed rounds, batch ``--memory-batch``): CPU: peak resident memory
  sampled every millisecond during one step (psutil), with glibc told to return freed blocks at once
  (``mallopt``), given as the model's weights plus the growth over the idle process (so the
  Python runtime, shared by all cases, is left out); GPU: ``torch.cuda.max_memory_allocated``.
  The optimizer holds state only for the stage's trainable parameters, as after
  ``release_optimizer_state``. ``activations_mb`` is what autograd saved for backward in that step
  (counted with ``saved_tensors_hooks``): zero below the lowest trainable block means no graph there.
* **Callback overhead.** The HF ``Trainer`` on the same model and batch, with and without
  :class:`~progtuning.core.callback.ProgtuningCallback` in its first stage (everything trains).

Never assert on these timings in tests: they are benchmarks, noisy on a shared machine.

The pieces: :mod:`~progtuning.runs.bench_config` (the settings, also the command line),
:mod:`~progtuning.runs.bench_flops` (the FLOP model and the cases), this module (the harness),
:mod:`~progtuning.runs.bench_memory` (measuring memory) and :mod:`~progtuning.runs.bench_format`
(the printed tables).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

from progtuning.cache.data import INDEX_COLUMN
from progtuning.cache.prefix_cache import FrozenPrefixCache
from progtuning.core.blocks import find_blocks
from progtuning.core.freezing import ProgressiveFreezer, return_freed_memory
from progtuning.core.schedule import progressive
from progtuning.errors import ProgtuningError
from progtuning.runs.bench_config import BenchConfig, add_arguments, config_from_args
from progtuning.runs.bench_flops import BuildKey, Key, flop_units, ordered_cases, plan_variants
from progtuning.runs.bench_format import format_results
from progtuning.runs.bench_memory import (
    PeakSampler,
    SavedTensors,
    init_adam_state,
    module_mb,
    optimizer_mb,
    return_freed_memory_at_once,
    rss,
)


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def build_model(config: BenchConfig) -> nn.Module:
    """A randomly initialised sequence classifier of the configured shape (2 labels, train mode)."""
    import transformers as tf

    common = dict(num_labels=2)
    if config.arch == "distilbert":
        model_config = tf.DistilBertConfig(
            dim=config.hidden, n_layers=config.layers, n_heads=config.heads, hidden_dim=config.intermediate,
            dropout=config.dropout, attention_dropout=config.dropout, max_position_embeddings=max(512, config.seq),
            **({"vocab_size": config.vocab} if config.vocab else {}), **common,
        )
    else:
        cls = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "mpnet": tf.MPNetConfig, "electra": tf.ElectraConfig}[
            config.arch
        ]
        extra = {"embedding_size": config.hidden} if config.arch == "electra" else {}
        model_config = cls(
            hidden_size=config.hidden, num_hidden_layers=config.layers, num_attention_heads=config.heads,
            intermediate_size=config.intermediate, hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout, max_position_embeddings=max(512, config.seq + 2),
            **({"vocab_size": config.vocab} if config.vocab else {}), **extra, **common,
        )
    torch.manual_seed(config.seed)
    model = tf.AutoModelForSequenceClassification.from_config(model_config)
    model.train()
    return model


def lora_model(config: BenchConfig, device) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = {"distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"]}.get(config.arch, ["query", "value"])
    base = build_model(config)
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=config.dropout,
                             target_modules=targets, task_type="SEQ_CLS")
    model = get_peft_model(base, peft_config).to(device)
    model.train()
    return model


def make_batch(config: BenchConfig, batch: int, vocab: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(config.seed + batch)
    return {
        "input_ids": torch.randint(5, vocab, (batch, config.seq), generator=generator).to(device),
        "attention_mask": torch.ones(batch, config.seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch,), generator=generator).to(device),
    }


def batch_dataset(batch: dict[str, torch.Tensor]):
    import datasets

    from progtuning.cache.data import add_example_index

    rows = {k: v.cpu().tolist() for k, v in batch.items()}
    return add_example_index(datasets.Dataset.from_dict(rows))


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
class _Bench:
    def __init__(self, config: BenchConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.caches: dict[str, FrozenPrefixCache] = {}
        self.layouts = {}
        self.wall: dict[Any, list[float]] = {}  # wall-clock times, kept for the record

    def add_model(self, name: str, model: nn.Module, batch, dataset) -> None:
        self.models[name] = model
        self.layouts[name] = find_blocks(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizers[name] = torch.optim.AdamW(params, lr=1e-5)
        if self.config.cache:
            self.caches[name] = FrozenPrefixCache(
                model, dataset, layout=self.layouts[name], build_batch_size=len(dataset), storage="memory", budget_mb=1e9
            )
        self._step(model, self.optimizers[name], batch)  # allocate the optimizer state once

    @contextlib.contextmanager
    def stage(self, key: Key, cache: FrozenPrefixCache | None = None):
        """Put the model in the configuration ``key`` for the duration of the block."""
        model = self.models[key.model]
        layout = self.layouts[key.model]
        L = layout.num_blocks
        policy = "always" if key.train_embeddings else "never"
        schedule = progressive(L, 1, policy) if key.lowest == 0 else _two_stage(L, key.lowest, policy)
        freezer = ProgressiveFreezer(model, schedule, layout, eval_frozen_blocks=key.eval_frozen)
        freezer.apply(schedule.num_stages - 1)
        try:
            if key.cached:
                cache.attach()
                if cache.level != key.lowest:
                    cache.extend_to(key.lowest)  # untimed: only if rounds run out of order
                cache.activate(key.lowest)
            yield model
        finally:
            if key.cached:
                cache.detach()
            freezer.restore()
            freezer.close()
            model.train()

    def _step(self, model, optimizer, batch) -> None:
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def clock(self) -> float:
        return time.process_time() if self.config.clock == "cpu" else time.perf_counter()

    def time_case(self, key: Key, batch, indexed_batch) -> list[float]:
        times = []
        cache = self.caches.get(key.model)
        with self.stage(key, cache) as model:
            optimizer = self.optimizers[key.model]
            for _ in range(self.config.steps):
                self._sync()
                start, wall = self.clock(), time.perf_counter()
                self._step(model, optimizer, indexed_batch if key.cached else batch)
                self._sync()
                times.append(self.clock() - start)
                self.wall.setdefault(key, []).append(time.perf_counter() - wall)
        return times

    def time_build(self, build: BuildKey) -> float:
        cache = self.caches[build.model]
        if build.start is None:
            cache.invalidate()
        elif cache.level != build.start:
            cache.extend_to(build.start)
        self._sync()
        start, wall = self.clock(), time.perf_counter()
        cache.extend_to(build.to)
        self._sync()
        self.wall.setdefault(build, []).append(time.perf_counter() - wall)
        return self.clock() - start

    # -- memory ------------------------------------------------------------------------------
    def memory_case(self, key: Key, batch, indexed_batch, cache: FrozenPrefixCache | None) -> dict:
        model = self.models[key.model]
        model_mb = module_mb(model)
        with self.stage(key, cache):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=0.0)
            init_adam_state(optimizer, params)
            inputs = indexed_batch if key.cached else batch
            return_freed_memory()
            saved = SavedTensors({p.untyped_storage().data_ptr() for p in model.parameters()})
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                idle = torch.cuda.memory_allocated()
                with saved:
                    self._step(model, optimizer, inputs)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
                result = {"peak_mb": peak / 2**20, "measure": "cuda max_memory_allocated"}
            else:
                idle = rss()
                with PeakSampler() as sampler, saved:
                    self._step(model, optimizer, inputs)
                result = {
                    "peak_mb": model_mb + (sampler.peak - idle) / 2**20,
                    "peak_rss_mb": sampler.peak / 2**20,
                    "measure": "weights + peak RSS growth over the idle process",
                }
            result["activations_mb"] = saved.nbytes / 2**20
            result["saved_tensors"] = saved.count
            result["optimizer_state_mb"] = optimizer_mb(optimizer)
            del optimizer  # freed before the next case's return_freed_memory()
        return result


def _two_stage(num_blocks: int, lowest: int, policy: str):
    from progtuning.core.schedule import explicit

    return explicit(num_blocks, [range(num_blocks), range(lowest, num_blocks)], policy)


# ---------------------------------------------------------------------------------------------
# callback overhead through the HF Trainer
# ---------------------------------------------------------------------------------------------
def _trainer_step_times(
    model, dataset, config: BenchConfig, with_callback: bool, output_dir: str, clock: Callable[[], float]
) -> list[float]:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from progtuning.core.callback import ProgtuningCallback

    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(clock())

    callbacks: list = [Timer()]
    if with_callback:
        # a few timed steps of stage 0: the later stages are never reached, on purpose
        schedule = progressive(config.layers, config.stages, "always")
        callbacks.insert(0, ProgtuningCallback(schedule, allow_empty_stages=True))
    args = TrainingArguments(
        output_dir=output_dir, max_steps=config.overhead_steps, num_train_epochs=config.stages,
        per_device_train_batch_size=config.batch, learning_rate=1e-5, save_strategy="no", report_to=[],
        logging_strategy="no", use_cpu=config.device == "cpu" or not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, seed=config.seed, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # its log lines would land in the bench's printed tables
    trainer.train()
    if with_callback:
        callbacks[0].freezer.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return [b - a for a, b in zip(ends, ends[1:])]  # the first step (optimizer state allocation) is left out


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_bench(config: BenchConfig | None = None, *, log: Callable[[str], None] | None = print, **overrides) -> dict:
    """Measure every case (see the module docstring) and return the results as one JSON-able dict."""
    config = config or BenchConfig()
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ProgtuningError(f"unknown bench option {name!r}")
        setattr(config, name, value)
    config.validate()
    log = log or (lambda message: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    if config.clock == "auto":
        # One CPU thread: its CPU time is the step time without the time slices other processes
        # take on a shared machine. Several threads or a GPU: wall time.
        config.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    started = time.perf_counter()

    variants = plan_variants(config)
    cases = ordered_cases(variants)
    bench = _Bench(config, device)
    base = build_model(config).to(device)
    vocab = base.config.vocab_size
    batch = make_batch(config, config.batch, vocab, device)
    dataset = batch_dataset(batch)
    indexed = dict(batch, **{INDEX_COLUMN: torch.arange(config.batch, device=device)})
    bench.add_model("base", base, batch, dataset)
    if config.lora:
        bench.add_model("lora", lora_model(config, device), batch, dataset)
    log(f"bench: {len(cases)} distinct cases x {config.rounds} rounds x {config.steps} steps on {device}")

    step_times: dict[Any, list[float]] = {case: [] for case in cases}
    overhead: dict[str, list[float]] = {"plain": [], "callback": []}
    with tempfile.TemporaryDirectory() as tmp:
        overhead_data = None
        if config.overhead:
            overhead_data = batch_dataset(make_batch(config, config.batch * (config.overhead_steps + 1), vocab, "cpu"))
            overhead_data = overhead_data.remove_columns(INDEX_COLUMN)
        for round_index in range(config.rounds):
            for case in cases:
                if isinstance(case, BuildKey):
                    step_times[case].append(bench.time_build(case))
                else:
                    step_times[case].append(statistics.median(bench.time_case(case, batch, indexed)))
            if config.overhead:
                order = ("plain", "callback") if round_index % 2 == 0 else ("callback", "plain")
                for name in order:
                    times = _trainer_step_times(base, overhead_data, config, name == "callback", tmp, bench.clock)
                    overhead[name].extend(times)
            log(f"bench: round {round_index + 1}/{config.rounds} done ({time.perf_counter() - started:.0f}s)")

    medians = {case: statistics.median(times) for case, times in step_times.items()}

    memory: dict[Any, dict] = {}
    if config.memory_batch:
        if device.type == "cpu":
            return_freed_memory_at_once()
        mem_batch = make_batch(config, config.memory_batch, vocab, device)
        mem_data = batch_dataset(mem_batch)
        mem_indexed = dict(mem_batch, **{INDEX_COLUMN: torch.arange(config.memory_batch, device=device)})
        mem_caches = {}
        for name, model in bench.models.items():
            if config.cache:
                mem_caches[name] = FrozenPrefixCache(model, mem_data, layout=bench.layouts[name],
                                                     build_batch_size=config.memory_batch, storage="memory", budget_mb=1e9)
        # the last optimizer state of the timed rounds is not part of any case
        bench.optimizers.clear()
        return_freed_memory()
        gc.freeze()  # what lives now lives on: later collections need not walk it again (fast)
        for case in cases:
            if isinstance(case, BuildKey):
                continue
            memory[case] = bench.memory_case(case, mem_batch, mem_indexed, mem_caches.get(case.model))
        gc.unfreeze()
        for cache in mem_caches.values():
            cache.close()
        log(f"bench: memory done ({time.perf_counter() - started:.0f}s)")
    for cache in bench.caches.values():
        cache.close()

    results = _summarise(config, device, variants, cases, medians, step_times, memory, overhead, bench.wall)
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    return results


def _summarise(config, device, variants, cases, medians, step_times, memory, overhead, wall) -> dict:
    full_key = variants[0].stages[0]
    full = medians[full_key]
    full_memory = memory.get(full_key, {}).get("peak_mb")
    T = config.stages
    out_variants = {}
    baselines = {"full": full}
    lora_variant = next((v for v in variants if v.name == "lora"), None)
    if lora_variant is not None:
        baselines["lora"] = medians[lora_variant.stages[0]]
    flop_full = variants[0].flop[0]
    for variant in variants:
        stages = []
        total = total_steps_only = 0.0
        flop_total = 0.0
        for t, (key, build) in enumerate(zip(variant.stages, variant.builds)):
            step = medians[key]
            build_s = medians[build] if build is not None else 0.0
            total += step + build_s
            total_steps_only += step
            flop_total += variant.flop[t] + variant.flop_build[t]
            entry = {
                "stage": t,
                "case": key.label,
                "lowest_trainable_block": key.lowest,
                "train_embeddings": key.train_embeddings,
                "cached": key.cached,
                "step_s": round(step, 4),
                "ratio": round(step / full, 4),
                "flop_ratio": round(variant.flop[t] / flop_full, 4),
                "build_s": round(build_s, 4) if build is not None else None,
                "build": build.label if build is not None else None,
            }
            mem = memory.get(key)
            if mem:
                entry.update(
                    peak_mb=round(mem["peak_mb"], 1),
                    memory_ratio=round(mem["peak_mb"] / full_memory, 4) if full_memory else None,
                    activations_mb=round(mem["activations_mb"], 1),
                    saved_tensors=mem["saved_tensors"],
                    optimizer_state_mb=round(mem["optimizer_state_mb"], 1),
                )
                if "peak_rss_mb" in mem:
                    entry["peak_rss_mb"] = round(mem["peak_rss_mb"], 1)
            stages.append(entry)
        summary = {
            "model": variant.model,
            "stages": stages,
            "schedule_ratio": round(total / (T * full), 4),
            "schedule_ratio_steps_only": round(total_steps_only / (T * full), 4),
            "schedule_flop_ratio": round(flop_total / (T * flop_full), 4),
        }
        if variant.baseline != "full":
            base = baselines[variant.baseline]
            lora_flop = flop_units(config.layers, 0, False, lora=True)
            summary[f"schedule_ratio_vs_{variant.baseline}"] = round(total / (T * base), 4)
            summary[f"schedule_flop_ratio_vs_{variant.baseline}"] = round(flop_total / (T * lora_flop), 4)
        out_variants[variant.name] = summary

    result: dict[str, Any] = {
        "config": config.to_dict(),
        "device": _device_name(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version(), **_other_versions()},
        "threads": torch.get_num_threads(),
        "clock": config.clock,
        "full_step_s": round(full, 4),
        "variants": out_variants,
        "cases": {
            case.label: {
                "median_s": round(medians[case], 4),
                "per_round_s": [round(t, 4) for t in step_times[case]],
                "wall_median_s": round(statistics.median(wall[case]), 4) if wall.get(case) else None,
            }
            for case in cases
        },
    }
    if overhead["plain"] and overhead["callback"]:
        plain, callback = statistics.median(overhead["plain"]), statistics.median(overhead["callback"])
        result["callback_overhead"] = {
            "plain_trainer_step_s": round(plain, 4),
            "callback_trainer_step_s": round(callback, 4),
            "ratio": round(callback / plain, 4),
            "steps_measured": [len(overhead["plain"]), len(overhead["callback"])],
        }
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _other_versions() -> dict:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def run_from_args(args: argparse.Namespace) -> int:
    """What ``progtuning bench`` does: run, print the tables, write the JSON."""
    results = run_bench(config_from_args(args), log=lambda m: print(m, file=sys.stderr))
    print(format_results(results))
    if args.json_path:
        folder = os.path.dirname(os.path.abspath(args.json_path))
        os.makedirs(folder, exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="progtuning bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ProgtuningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
