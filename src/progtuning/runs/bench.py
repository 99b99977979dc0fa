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
  no input gradient either, one unit less; the ratios keep the simpler model used in issue #6.)
* **Memory** (after the timed rounds, batch ``--memory-batch``): CPU: peak resident memory
  sampled every millisecond during one step, with glibc told to return freed blocks at once
  (``mallopt``), given as the model's weights plus the growth over the idle process (so the
  Python runtime, shared by all cases, is left out); GPU: ``torch.cuda.max_memory_allocated``.
  The optimizer holds state only for the stage's trainable parameters, as after
  ``release_optimizer_state``. ``activations_mb`` is what autograd saved for backward in that step
  (counted with ``saved_tensors_hooks``): zero below the lowest trainable block means no graph there.
* **Callback overhead.** The HF ``Trainer`` on the same model and batch, with and without
  :class:`~progtuning.core.callback.ProgtuningCallback` in its first stage (everything trains).

Never assert on these timings in tests: they are benchmarks, noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from progtuning.core.blocks import find_blocks
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.cache.prefix_cache import INDEX_COLUMN, FrozenPrefixCache
from progtuning.core.schedule import progressive

ARCHS = ("bert", "roberta", "mpnet", "electra", "distilbert")
POLICIES = ("always", "first_stage", "never")


# ---------------------------------------------------------------------------------------------
# the FLOP model
# ---------------------------------------------------------------------------------------------
def flop_units(num_blocks: int, lowest: int, train_embeddings: bool, cached: bool = False, lora: bool = False) -> float:
    """Cost of one step in block-forward units (see the module docstring)."""
    L, k = num_blocks, lowest
    if lora:
        return 2 * (L - k) if cached else L + (L - k)
    if cached:
        return 3 * (L - k)
    return L + 2 * (L - k) + (k if train_embeddings else 0)


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    arch: str = "bert"
    hidden: int = 384
    layers: int = 12
    heads: int = 12
    intermediate: int = 1536
    vocab: int | None = None  # default: the architecture's (30522 for BERT)
    seq: int = 128
    batch: int = 16
    stages: int = 4
    rounds: int = 3
    steps: int = 2
    threads: int | None = 1
    device: str = "auto"
    dropout: float = 0.1
    policies: tuple[str, ...] = POLICIES
    cache: bool = True
    eval_off: bool = True
    lora: bool = True
    lora_r: int = 8
    memory: bool = True
    memory_batch: int | None = 32
    overhead: bool = True
    overhead_steps: int = 3
    seed: int = 0
    clock: str = "auto"  # cpu: process CPU time (robust to other processes on a shared CPU); wall

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ProgtuningError(f"unknown --arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.hidden % self.heads:
            raise ProgtuningError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        for name in ("layers", "seq", "batch", "stages", "rounds", "steps"):
            if getattr(self, name) < 1:
                raise ProgtuningError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.clock not in ("auto", "cpu", "wall"):
            raise ProgtuningError(f"unknown --clock {self.clock!r}: use auto, cpu or wall")
        if self.stages > self.layers:
            raise ProgtuningError(f"--stages {self.stages} needs at least as many --layers, got {self.layers}")
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise ProgtuningError(f"unknown embedding policy {bad[0]!r}: use {', '.join(POLICIES)}")


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

    from progtuning.cache.prefix_cache import add_example_index

    rows = {k: v.cpu().tolist() for k, v in batch.items()}
    return add_example_index(datasets.Dataset.from_dict(rows))


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """One distinct configuration to measure (several variant stages may share it)."""

    model: str  # "base" or "lora"
    lowest: int  # lowest block that trains
    train_embeddings: bool
    eval_frozen: bool
    cached: bool

    @property
    def label(self) -> str:
        parts = [self.model, f"k={self.lowest}", "E" if self.train_embeddings else "noE"]
        if not self.eval_frozen:
            parts.append("train-mode")
        if self.cached:
            parts.append("cached")
        return " ".join(parts)


@dataclass(frozen=True)
class BuildKey:
    model: str
    start: int | None  # None: from scratch (embeddings + blocks 0..to-1)
    to: int

    @property
    def label(self) -> str:
        return f"{self.model} build {'E' if self.start is None else self.start}->{self.to}"


@dataclass
class Variant:
    name: str
    model: str
    stages: list[Key]
    builds: list[BuildKey | None]
    flop: list[float]
    flop_build: list[float]
    baseline: str = "full"


def plan_variants(config: BenchConfig) -> list[Variant]:
    L, T = config.layers, config.stages
    schedules = {p: progressive(L, T, p) for p in config.policies}
    ref = progressive(L, T, "always")
    lowest = [min(stage.blocks) for stage in ref.stages]
    full = Key("base", 0, True, True, False)
    variants = [Variant("full", "base", [full] * T, [None] * T, [flop_units(L, 0, True)] * T, [0.0] * T)]

    def key(model, k, emb, eval_frozen=True, cached=False):
        if k == 0 and emb:
            eval_frozen = True  # nothing is frozen: the flag changes nothing
        return Key(model, k, emb, eval_frozen, cached)

    def builds_for(model: str, emb_flags: list[bool]) -> tuple[list[BuildKey | None], list[bool]]:
        out: list[BuildKey | None] = []
        cached: list[bool] = []
        level = None
        for t in range(T):
            usable = not emb_flags[t] and lowest[t] >= 1
            if not usable:
                out.append(None)
                cached.append(False)
                level = None
                continue
            out.append(BuildKey(model, level, lowest[t]))
            cached.append(True)
            level = lowest[t]
        return out, cached

    for policy in config.policies:
        flags = [s.train_embeddings for s in schedules[policy].stages]
        variants.append(
            Variant(
                f"prog-{policy}", "base", [key("base", lowest[t], flags[t]) for t in range(T)], [None] * T,
                [flop_units(L, lowest[t], flags[t]) for t in range(T)], [0.0] * T,
            )
        )
    if config.eval_off:
        for policy in [p for p in ("never",) if p in config.policies] or list(config.policies)[:1]:
            flags = [s.train_embeddings for s in schedules[policy].stages]
            variants.append(
                Variant(
                    f"prog-{policy}/dropout-on", "base",
                    [key("base", lowest[t], flags[t], eval_frozen=False) for t in range(T)], [None] * T,
                    [flop_units(L, lowest[t], flags[t]) for t in range(T)], [0.0] * T,
                )
            )
    if config.cache:
        for policy in [p for p in ("first_stage", "never") if p in config.policies]:
            flags = [s.train_embeddings for s in schedules[policy].stages]
            builds, cached = builds_for("base", flags)
            variants.append(
                Variant(
                    f"prog-{policy}+cache", "base",
                    [key("base", lowest[t], flags[t], cached=cached[t]) for t in range(T)], builds,
                    [flop_units(L, lowest[t], flags[t], cached=cached[t]) for t in range(T)],
                    [_build_units(b) for b in builds],
                )
            )
    if config.lora:
        variants.append(
            Variant("lora", "lora", [key("lora", 0, False)] * T, [None] * T, [flop_units(L, 0, False, lora=True)] * T,
                    [0.0] * T, baseline="lora")
        )
        variants.append(
            Variant("lora+prog", "lora", [key("lora", lowest[t], False) for t in range(T)], [None] * T,
                    [flop_units(L, lowest[t], False, lora=True) for t in range(T)], [0.0] * T, baseline="lora")
        )
        if config.cache:
            builds, cached = builds_for("lora", [False] * T)
            variants.append(
                Variant("lora+prog+cache", "lora", [key("lora", lowest[t], False, cached=cached[t]) for t in range(T)],
                        builds, [flop_units(L, lowest[t], False, cached=cached[t], lora=True) for t in range(T)],
                        [_build_units(b) for b in builds], baseline="lora")
            )
    return variants


def _build_units(build: BuildKey | None) -> float:
    if build is None:
        return 0.0
    return float(build.to - (build.start or 0))


def _ordered_cases(variants: list[Variant]) -> list[Key | BuildKey]:
    """Every distinct case once, each build right before the cached step that needs its level."""
    cases: list[Key | BuildKey] = []
    for variant in variants:
        for stage_key, build in zip(variant.stages, variant.builds):
            if build is not None and build not in cases:
                cases.append(build)
            if stage_key not in cases:
                cases.append(stage_key)
    return cases


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
        model_mb = _module_mb(model)
        with self.stage(key, cache):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=0.0)
            _init_adam_state(optimizer, params)
            inputs = indexed_batch if key.cached else batch
            _release_memory()
            saved = _SavedTensors({p.untyped_storage().data_ptr() for p in model.parameters()})
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
                idle = _rss()
                with _PeakSampler() as sampler, saved:
                    self._step(model, optimizer, inputs)
                result = {
                    "peak_mb": model_mb + (sampler.peak - idle) / 2**20,
                    "peak_rss_mb": sampler.peak / 2**20,
                    "measure": "weights + peak RSS growth over the idle process",
                }
            result["activations_mb"] = saved.nbytes / 2**20
            result["saved_tensors"] = saved.count
            result["optimizer_state_mb"] = _optimizer_mb(optimizer)
            del optimizer  # freed before the next case's _release_memory()
        return result


def _two_stage(num_blocks: int, lowest: int, policy: str):
    from progtuning.core.schedule import explicit

    return explicit(num_blocks, [range(num_blocks), range(lowest, num_blocks)], policy)


def _init_adam_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Create AdamW's moments without moving any weight (lr 0, zero gradients, no weight decay)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _module_mb(model: nn.Module) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def _optimizer_mb(optimizer: torch.optim.Optimizer) -> float:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total / 2**20


class _SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Counts the tensors autograd saves for backward (unique storages): the activation memory."""

    def __init__(self, weights: set[int]) -> None:
        self.count = 0
        self.nbytes = 0
        self._seen: set[int] = set(weights)  # weights are counted as weights, not activations
        super().__init__(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._seen:
                self.count += 1
                self._seen.add(ptr)
                self.nbytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    """Samples this process's resident memory every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm", "rb", buffering=0) as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
                time.sleep(self.interval)

    def __enter__(self) -> "_PeakSampler":
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory_at_once() -> None:
    """glibc: allocate large blocks with mmap and trim the heap, so RSS follows live memory."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops its dynamic growth)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _release_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# callback overhead through the HF Trainer
# ---------------------------------------------------------------------------------------------
def _trainer_step_times(
    model, dataset, config: BenchConfig, with_callback: bool, output_dir: str, clock: Callable[[], float]
) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

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
    cases = _ordered_cases(variants)
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
    if config.memory and config.memory_batch:
        if device.type == "cpu":
            _return_freed_memory_at_once()
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
        _release_memory()
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
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
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
    result["targets"] = _targets(result, config)
    return result


def _targets(result: dict, config: BenchConfig) -> dict:
    variants = result["variants"]
    targets: dict[str, Any] = {}

    def check(name: str, value, limit: float, smaller: bool = True):
        if value is None:
            return
        targets[name] = {"value": value, "limit": limit, "met": value <= limit if smaller else value >= limit}

    if "prog-never" in variants:
        check("schedule, embeddings frozen, no cache <= 0.72", variants["prog-never"]["schedule_ratio"], 0.72)
    cached = [v for n, v in variants.items() if n.startswith("prog-") and n.endswith("+cache")]
    if cached:
        best = min(v["schedule_ratio"] for v in cached)
        check("schedule, cache incl. build <= 0.60", best, 0.60)
    overhead = result.get("callback_overhead")
    if overhead:
        check("stage 1 via Trainer + callback within 2% of a plain Trainer step", overhead["ratio"], 1.02)
    last = [v["stages"][-1].get("memory_ratio") for n, v in variants.items() if n.startswith("prog-")]
    last = [x for x in last if x is not None]
    if last:
        check(f"last-stage peak memory <= 0.5 x full (batch {config.memory_batch})", min(last), 0.5)
    return targets


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _other_versions() -> dict:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


# ---------------------------------------------------------------------------------------------
# printing and the command line
# ---------------------------------------------------------------------------------------------
def format_results(results: dict) -> str:
    """The per-stage and whole-schedule tables as plain text."""
    lines = []
    cfg = results["config"]
    lines.append(
        f"{cfg['arch']} hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, intermediate "
        f"{cfg['intermediate']}, seq {cfg['seq']}, batch {cfg['batch']}, T={cfg['stages']} on {results['device']} "
        f"({results['threads']} threads, {results['clock']} time); full step {results['full_step_s']:.3f}s; medians over "
        f"{cfg['rounds']} rounds x {cfg['steps']} steps"
    )
    header = f"{'variant':<26}{'stage':>6}{'step s':>9}{'ratio':>8}{'FLOP':>7}{'build s':>9}{'peak MB':>9}{'mem':>7}{'act MB':>8}"
    lines.append(header)
    lines.append("-" * len(header))
    for name, variant in results["variants"].items():
        for s in variant["stages"]:
            build = f"{s['build_s']:.3f}" if s.get("build_s") is not None else "-"
            peak = f"{s['peak_mb']:.0f}" if s.get("peak_mb") is not None else "-"
            mem = f"{s['memory_ratio']:.2f}" if s.get("memory_ratio") is not None else "-"
            act = f"{s['activations_mb']:.0f}" if s.get("activations_mb") is not None else "-"
            lines.append(
                f"{name if s['stage'] == 0 else '':<26}{s['stage'] + 1:>6}{s['step_s']:>9.3f}{s['ratio']:>8.3f}"
                f"{s['flop_ratio']:>7.3f}{build:>9}{peak:>9}{mem:>7}{act:>8}"
            )
    lines.append("")
    lines.append(f"{'whole schedule':<26}{'ratio':>8}{'steps only':>12}{'FLOP':>8}{'vs LoRA':>9}{'FLOP vs LoRA':>14}")
    for name, variant in results["variants"].items():
        vs = variant.get("schedule_ratio_vs_lora")
        vs_flop = variant.get("schedule_flop_ratio_vs_lora")
        lines.append(
            f"{name:<26}{variant['schedule_ratio']:>8.3f}{variant['schedule_ratio_steps_only']:>12.3f}"
            f"{variant['schedule_flop_ratio']:>8.3f}{(f'{vs:.3f}' if vs else '-'):>9}"
            f"{(f'{vs_flop:.3f}' if vs_flop else '-'):>14}"
        )
    overhead = results.get("callback_overhead")
    if overhead:
        lines.append("")
        lines.append(
            f"callback overhead (HF Trainer, stage 1): plain {overhead['plain_trainer_step_s']:.3f}s, with "
            f"ProgtuningCallback {overhead['callback_trainer_step_s']:.3f}s, ratio {overhead['ratio']:.3f}"
        )
    if results.get("targets"):
        lines.append("")
        for name, target in results["targets"].items():
            lines.append(f"[{'met' if target['met'] else 'NOT met'}] {name}: {target['value']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``progtuning bench`` options (the CLI subcommand and ``python -m progtuning.runs.bench``)."""
    d = BenchConfig()
    parser.add_argument("--arch", default=d.arch, choices=ARCHS, help="model family of the random model")
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--intermediate", type=int, default=d.intermediate)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the architecture's)")
    parser.add_argument("--seq", type=int, default=d.seq, help="sequence length (no padding)")
    parser.add_argument("--batch", type=int, default=d.batch, help="training batch for the timings")
    parser.add_argument("--stages", type=int, default=d.stages, help="T: parts/stages (= epochs)")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="rounds; every case runs once per round")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per case per round")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    parser.add_argument("--dropout", type=float, default=d.dropout, help="hidden and attention dropout of the model")
    parser.add_argument("--policies", default=",".join(d.policies), help="embedding policies, comma-separated")
    parser.add_argument("--no-cache", action="store_true", help="skip the frozen-prefix cache cases")
    parser.add_argument("--no-eval-off", action="store_true", help="skip the dropout-on (train-mode) frozen blocks case")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA cases")
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--memory-batch", type=int, default=d.memory_batch, help="batch of the memory pass (0: skip it)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the Trainer callback-overhead measurement")
    parser.add_argument("--overhead-steps", type=int, default=d.overhead_steps, help="Trainer steps per overhead run")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--clock", default=d.clock, choices=("auto", "cpu", "wall"),
                        help="cpu: process CPU time (auto with 1 CPU thread); wall: elapsed time (auto otherwise)")
    parser.add_argument("--json", dest="json_path", help="write the results here")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
        vocab=args.vocab, seq=args.seq, batch=args.batch, stages=args.stages, rounds=args.rounds, steps=args.steps,
        threads=args.threads or None, device=args.device, dropout=args.dropout,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()), cache=not args.no_cache,
        eval_off=not args.no_eval_off, lora=not args.no_lora, lora_r=args.lora_r,
        memory=bool(args.memory_batch), memory_batch=args.memory_batch or None, overhead=not args.no_overhead,
        overhead_steps=args.overhead_steps, seed=args.seed, clock=args.clock,
    )


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
