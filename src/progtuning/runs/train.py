"""One experiment end to end: task + model + method + Progtuning → HF Trainer → results.json.

This is the only module that knows the datasets and the Trainer together. ``run(config)``:

1. checks everything the user gave (task, columns, labels, model, output folder) before writing
   anything, so a mistake leaves nothing half-written;
2. tokenizes the splits, applies the fine-tuning method, and trains with
   :class:`~progtuning.core.callback.ProgtuningCallback` (the baseline uses the same callback with a
   single all-trainable stage, so both runs are logged and measured the same way);
3. evaluates the validation split(s), and the test split once at the very end (model selection
   never looks at test), saves model and tokenizer, and writes ``OUTPUT_DIR/results.json``.

Everything that depends on the kind of task (its head, its tokenization, its collator, its
scores) comes from the :class:`~progtuning.tasks.base.Task` the source returns: SQuAD runs the
same loop as SST-2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from progtuning.core.callback import ProgtuningCallback
from progtuning.cache.prefix_cache import (
    ExampleIndexCollator,
    FrozenPrefixCache,
    PrefixCacheCallback,
    add_example_index,
    input_reason,
    unsupported_reason,
)
from progtuning.runs.config import TrainConfig
from progtuning.core.counting import count_updates
from progtuning.core.distributed import launcher_rank
from progtuning.errors import ProgtuningError
from progtuning.core.schedule import Schedule, explicit, no_progtuning, progressive
from progtuning.tasks.base import Task

logger = logging.getLogger("progtuning")

RESULTS_FILE = "results.json"
CHECKPOINTS = "checkpoints"


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written."""

    config: TrainConfig
    task: Task
    data: Any  # DatasetDict of raw examples
    tokenizer: Any
    model: torch.nn.Module
    model_path: str
    features: Any  # the task's tokenized splits (tasks.base.Features)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def run(config: TrainConfig) -> dict:
    """Train one experiment and return (and write) its results."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    _check_output_dir(output_dir, config)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.progtuning:
        from progtuning.core.distributed import refuse_unsupported_parallelism

        refuse_unsupported_parallelism()  # FSDP / DeepSpeed from the launcher: one line before any loading
    prepared = prepare(config)
    if config.overwrite and output_dir.exists() and not config.resume and launcher_rank() == 0:
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = _train(prepared, output_dir)
    results["wall_time_s"] = round(time.perf_counter() - started, 2)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if launcher_rank() == 0:  # several processes (torchrun): one writer
        write_json_atomic(output_dir / RESULTS_FILE, results)
    return results


def prepare(config: TrainConfig) -> Prepared:
    """Load and check the task, the tokenizer and the model, and apply the fine-tuning method."""
    from transformers import set_seed

    from progtuning.runs.models import resolve_model
    from progtuning.tasks.registry import load_task

    task, data = load_task(config)
    model_path = resolve_model(config.model)
    tokenizer = _load_tokenizer(model_path, config)
    set_seed(config.seed)  # the new head's initialisation
    model = _load_model(model_path, config, task, tokenizer)
    model = _apply_method(model, config, task)
    task.check_model(model, config)
    # Tokenizing checks the examples against the model (lengths, templates): before anything is written.
    features = task.preprocess(data, tokenizer, config)
    return Prepared(config, task, data, tokenizer, model, model_path, features)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def _check_output_dir(output_dir: Path, config: TrainConfig) -> None:
    if config.resume:
        if not _last_checkpoint(output_dir):
            raise ProgtuningError(f"--resume found no checkpoint in {output_dir / CHECKPOINTS}: run without --resume")
        return
    if output_dir.exists() and not output_dir.is_dir():
        raise ProgtuningError(f"output_dir {output_dir} is a file: choose a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not config.overwrite:
        raise ProgtuningError(
            f"output_dir {output_dir} exists and is not empty: pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output-dir"
        )


def _last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = output_dir / CHECKPOINTS
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def _load_tokenizer(model_path: str, config: TrainConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ProgtuningError(_model_error(config.model, error))
    if tokenizer.pad_token is None:
        # Decoder-only models (GPT-2, Llama) ship without one; classification needs padding.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(model_path: str, config: TrainConfig, task: Task, tokenizer):
    try:
        model = task.load_model(model_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ProgtuningError(_model_error(config.model, error))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _model_error(name: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"cannot load model {name!r} ({first[:200]}): use an alias (minilm-l6, minilm-l3, mpnet-base, "
        "smollm2-135m), a local folder, or a hub id with network access"
    )


def _apply_method(model, config: TrainConfig, task: Task):
    from progtuning.methods.api import apply_method

    return apply_method(model, method_config(config), task_type=task.task_type)


def method_config(config: TrainConfig):
    from progtuning.methods.api import MethodConfig

    return MethodConfig(
        name=config.method,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_target_modules=config.lora_target_modules,
        peft_config_path=config.peft_config,
        adapter_type=config.adapter_type,
        adapter_reduction_factor=config.adapter_reduction_factor,
        adapter_train_layernorm=config.adapter_train_layernorm,
    )


def build_schedule(config: TrainConfig, num_blocks: int) -> Schedule:
    """The schedule a config asks for: the paper's preset, explicit stages, or none (baseline)."""
    if not config.progtuning:
        return no_progtuning(num_blocks)
    if config.stage_blocks:
        return explicit(num_blocks, config.stage_blocks, config.embeddings, config.stage_unit)
    # The paper: T = the number of epochs. (A max_steps run is better served by stage_unit: fraction.)
    stages = config.stages or max(1, math.ceil(config.epochs))
    return progressive(num_blocks, stages, config.embeddings, config.stage_unit)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _train(prepared: Prepared, output_dir: Path) -> dict:
    from progtuning.core.blocks import find_blocks
    from progtuning.runs.checkpoints import ProgtuningTrainer

    config, task, model, tokenizer = prepared.config, prepared.task, prepared.model, prepared.tokenizer
    layout = find_blocks(model, blocks=config.blocks)
    schedule = build_schedule(config, layout.num_blocks)
    callback = ProgtuningCallback(schedule, blocks=config.blocks, eval_frozen_blocks=config.eval_frozen_blocks)

    features = prepared.features
    train_set, collator = features.train, task.collator(tokenizer)
    cache = _prefix_cache(config, model, layout, train_set, collator, output_dir)
    if cache is not None:
        train_set, collator = cache.dataset, ExampleIndexCollator(collator)
    cache_callback = PrefixCacheCallback(callback, cache)  # after the Progtuning callback: the stage is set
    callbacks = [callback, cache_callback]
    if config.gradient_checkpointing:
        from progtuning.core.checkpointing import StageCheckpointing

        callbacks.append(StageCheckpointing(callback))  # after the Progtuning callback: the stage is set

    evaluate_each_epoch = task.evaluates_each_epoch and "validation" in features.eval
    trainer = ProgtuningTrainer(
        model=model,
        args=_training_arguments(config, output_dir, evaluate_each_epoch, keep_all_columns=cache is not None),
        train_dataset=train_set,
        eval_dataset=features.eval["validation"] if evaluate_each_epoch else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=task.trainer_metrics(),
        callbacks=callbacks,
    )
    train_started = time.perf_counter()
    train_output = _fit(trainer, callback, config, output_dir, schedule, layout)
    train_time = time.perf_counter() - train_started

    metrics = {split: task.evaluate(trainer, features, split) for split in features.eval}
    if config.save_model and trainer.is_world_process_zero():
        _save(trainer, model, tokenizer, config, output_dir)

    steps_per_epoch = callback.steps_per_epoch
    # From the schedule, not from the stage records: a resumed run recorded only its second half,
    # and the stages switch exactly where planned (test_train checks it).
    lengths = schedule.stage_lengths(steps_per_epoch, trainer.state.global_step)
    accounting = count_updates(callback.freezer, lengths, epochs=trainer.state.global_step / steps_per_epoch)
    main = task.main_metric
    return {
        "config": config.to_dict(),
        "versions": library_versions(),
        "seed": config.seed,
        "task": task.summary(prepared.data),
        "model": {
            "name": config.model,
            "path": prepared.model_path,
            "num_blocks": layout.num_blocks,
            "total_params": accounting.total_params,
            "method_trainable_params": accounting.method_trainable_params,
        },
        "schedule": schedule.to_dict(),
        "planned_stage_starts": schedule.stage_starts(steps_per_epoch, callback.total_steps),
        "stages": [
            {**record, "blocks": list(schedule.stages[record["stage"]].blocks)} for record in callback.stage_records()
        ],
        "steps": trainer.state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "train_loss": train_output.training_loss,
        "metrics": metrics,
        "main_metric": main,
        "validation_score": metrics.get("validation", {}).get(main),
        "test_score": metrics.get("test", {}).get(main),
        "updated_params": accounting.updated_params,
        "baseline_updated_params": accounting.baseline_updated_params,
        "reduction": accounting.reduction,
        "reduction_blocks_only": accounting.reduction_blocks_only,
        "accounting": accounting.to_dict(),
        "prefix_cache": {
            "stages": cache_callback.records,
            "hits": cache.hits if cache else 0,
            "misses": cache.misses if cache else 0,
        },
        "train_time_s": round(train_time, 2),
        "log_history": trainer.state.log_history,
    }


def _training_arguments(config: TrainConfig, output_dir: Path, evaluate_each_epoch: bool, keep_all_columns: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir / CHECKPOINTS),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="epoch" if evaluate_each_epoch else "no",
        save_strategy="epoch" if config.save_checkpoints else "no",
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        remove_unused_columns=not keep_all_columns,  # the prefix cache looks examples up by their index column
        # Several processes: the wrapper is built before stage 0 is applied, so DDP registers every parameter
        # and skips the frozen ones each step (measured correct for shrinking and growing schedules; see
        # docs/distributed.md). Explicit, because the Trainer turns it off under activation checkpointing.
        ddp_find_unused_parameters=True,
    )


def _fit(trainer, callback: ProgtuningCallback, config: TrainConfig, output_dir: Path, schedule, layout):
    """``trainer.train()``, resumed if asked, stopped cleanly on SIGTERM/Ctrl-C or a non-finite loss."""
    from progtuning.runs.checkpoints import (
        StopOnNonFiniteLoss,
        StopOnSignal,
        TrainingStopped,
        check_checkpoint,
        clean_partial_checkpoints,
        last_checkpoint,
    )

    stop, nan_guard = StopOnSignal(), StopOnNonFiniteLoss(callback)
    trainer.add_callback(stop)
    trainer.add_callback(nan_guard)
    resume = None
    if config.resume:
        if launcher_rank() == 0:
            clean_partial_checkpoints(output_dir / CHECKPOINTS)  # what a killed run left half-written
        resume = _last_checkpoint(output_dir)
        check_checkpoint(resume, trainer.model, schedule, list(layout.block_paths))  # one line, before anything loads
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    finally:  # also when training raised: give the signal handlers back, drop the loss hook
        stop.restore()
        nan_guard.close()
    if stop.stopped_at is not None:
        raise TrainingStopped(stop.signal_name, stop.received, stop.stopped_at, callback.freezer.stage_index,
                              last_checkpoint(output_dir / CHECKPOINTS))
    return output


def _prefix_cache(config: TrainConfig, model, layout, train_set, collator, output_dir: Path):
    """The frozen-prefix cache if asked for and valid here; otherwise None, with the reason logged."""
    if not config.cache_frozen:
        return None
    reason = (
        ("the baseline freezes nothing" if not config.progtuning else None)
        or unsupported_reason(model, layout)
        or input_reason(train_set, collator)
    )
    if reason:
        logger.warning("--cache-frozen is off: %s", reason)
        return None
    return FrozenPrefixCache(
        model,
        add_example_index(train_set),
        layout=layout,
        budget_mb=config.cache_budget_mb,
        folder=str(output_dir / "prefix_cache"),
        build_batch_size=config.eval_batch_size,
    )


def _save(trainer, model, tokenizer, config: TrainConfig, output_dir: Path) -> None:
    from progtuning.methods.api import save_method

    model_dir = output_dir / "model"
    if config.method == "full":
        trainer.save_model(str(model_dir))
    else:
        save_method(model, method_config(config), str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader (or a crash) never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes it private; a results file is for everyone to read
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def library_versions() -> dict:
    import accelerate
    import datasets
    import peft
    import transformers

    import progtuning

    return {
        "progtuning": progtuning.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }
