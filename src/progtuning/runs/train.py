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

import logging
import math
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from progtuning.core.callback import ProgtuningCallback
from progtuning.core.telemetry import StageTelemetry
from progtuning.cache.callback import PrefixCacheCallback
from progtuning.cache.data import ExampleIndexCollator, add_example_index, input_reason
from progtuning.cache.prefix import unsupported_reason
from progtuning.cache.prefix_cache import FrozenPrefixCache
from progtuning.runs.config import TrainConfig
from progtuning.core.counting import count_updates
from progtuning.core.distributed import launcher_rank
from progtuning.errors import ProgtuningError
from progtuning.core.schedule import Schedule, explicit, no_progtuning, progressive
from progtuning.runs.results import (
    CHECKPOINTS_DIR,
    MODEL_CARD_FILE,
    MODEL_DIR,
    PREFIX_CACHE_DIR,
    RESULTS_FILE,
    SCHEMA_VERSION,
    run_mode,
    write_json_atomic,
)
from progtuning.tasks.base import Task

logger = logging.getLogger("progtuning")


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written."""

    config: TrainConfig
    task: Task
    data: Any  # DatasetDict of raw examples
    tokenizer: Any
    model: torch.nn.Module
    model_path: str


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def run(config: TrainConfig) -> dict:
    """Train one experiment and return (and write) its results."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    _check_output_dir(output_dir, config)
    _check_integrations(config)
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
        _publish(config, output_dir, results)
    return results


def _check_integrations(config: TrainConfig) -> None:
    """The Trainer settings, logging integrations and hub push asked for: one-line errors before any loading."""
    from progtuning.runs.reporting import check_report_to
    from progtuning.runs.training_args import check_training_args

    check_training_args(config.training_args)
    check_report_to(config.report_to)
    if config.push_to_hub:
        from progtuning.runs.hub import check_can_push

        check_can_push()


def _publish(config: TrainConfig, output_dir: Path, results: dict) -> None:
    """The model card, then results.json (last: a folder with it is finished), then the hub push if asked."""
    from progtuning.runs.hub import default_repo_id, push_run
    from progtuning.runs.model_card import write_model_card

    repo_id = (config.hub_model_id or default_repo_id(output_dir)) if config.push_to_hub else None
    if config.save_model:
        write_model_card(results, output_dir / MODEL_CARD_FILE, repo_id)
    write_json_atomic(output_dir / RESULTS_FILE, results)
    if config.push_to_hub:
        logger.info("progtuning: pushed to %s", push_run(output_dir, repo_id, private=config.hub_private))


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
    return Prepared(config, task, data, tokenizer, model, model_path)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def _check_output_dir(output_dir: Path, config: TrainConfig) -> None:
    if config.resume:
        if not _last_checkpoint(output_dir):
            raise ProgtuningError(f"--resume found no checkpoint in {output_dir / CHECKPOINTS_DIR}: run without --resume")
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

    folder = output_dir / CHECKPOINTS_DIR
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

    return apply_method(model, config.method_config(), task_type=task.task_type)


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
    from progtuning.runs.publish import save_run_model
    from progtuning.runs.training_args import build_training_arguments, early_stopping_callbacks

    config, task, model, tokenizer = prepared.config, prepared.task, prepared.model, prepared.tokenizer
    layout = find_blocks(model, blocks=config.blocks)
    schedule = build_schedule(config, layout.num_blocks)
    callback = ProgtuningCallback(schedule, blocks=config.blocks, eval_frozen_blocks=config.eval_frozen_blocks)
    telemetry = StageTelemetry(callback)  # after the Progtuning callback: the stage is set

    features = task.preprocess(prepared.data, tokenizer, config)
    train_set, collator = features.train, task.collator(tokenizer)
    cache = _prefix_cache(config, model, layout, train_set, collator, output_dir)
    if cache is not None:
        train_set, collator = cache.dataset, ExampleIndexCollator(collator)
    cache_callback = PrefixCacheCallback(callback, cache)  # after the Progtuning callback: the stage is set

    evaluate_each_epoch = task.evaluates_each_epoch and "validation" in features.eval
    args = build_training_arguments(config, output_dir, task, evaluate_each_epoch=evaluate_each_epoch,
                                    keep_all_columns=cache is not None, checkpoints_dir=CHECKPOINTS_DIR)
    trainer = ProgtuningTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=features.eval["validation"] if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=task.trainer_metrics(),
        callbacks=[callback, telemetry, cache_callback, *early_stopping_callbacks(config)],
    )
    train_started = time.perf_counter()
    train_output = _fit(trainer, callback, config, output_dir, schedule, layout)
    train_time = time.perf_counter() - train_started

    metrics = {split: task.evaluate(trainer, features, split) for split in features.eval}
    if config.save_model and trainer.is_world_process_zero():
        save_run_model(model, tokenizer, config, task, output_dir / MODEL_DIR)
    run = _Trained(trainer, train_output, train_time, schedule, layout, callback, telemetry, cache_callback)
    return _results(prepared, run, metrics)


@dataclass
class _Trained:
    """What a finished training leaves behind for results.json."""

    trainer: Any
    output: Any  # the Trainer's TrainOutput
    train_time: float
    schedule: Schedule
    layout: Any
    callback: ProgtuningCallback
    telemetry: StageTelemetry
    cache_callback: PrefixCacheCallback


def _results(prepared: Prepared, run: _Trained, metrics: dict) -> dict:
    """The results.json mapping (its keys: :class:`progtuning.runs.results.Results`)."""
    config, task, schedule, state = prepared.config, prepared.task, run.schedule, run.trainer.state
    steps_per_epoch = run.callback.steps_per_epoch
    # From the schedule, not from the stage records: a resumed run recorded only its second half,
    # and the stages switch exactly where planned (test_train checks it).
    lengths = schedule.stage_lengths(steps_per_epoch, state.global_step)
    accounting = count_updates(run.callback.freezer, lengths, epochs=state.global_step / steps_per_epoch)
    cache = run.cache_callback.cache
    main = task.main_metric
    return {
        "schema": SCHEMA_VERSION,
        "mode": run_mode(config.to_dict()),
        "config": config.to_dict(),
        "versions": library_versions(),
        "seed": config.seed,
        "task": task.summary(prepared.data),
        "model": {
            "name": config.model,
            "path": prepared.model_path,
            "num_blocks": run.layout.num_blocks,
            "total_params": accounting.total_params,
            "method_trainable_params": accounting.method_trainable_params,
        },
        "schedule": schedule.to_dict(),
        "planned_stage_starts": schedule.stage_starts(steps_per_epoch, run.callback.total_steps),
        "stages": [
            {**record, "blocks": list(schedule.stages[record["stage"]].blocks)}
            for record in run.telemetry.stage_records()
        ],
        "steps": state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "train_loss": run.output.training_loss,
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
            "stages": run.cache_callback.records,
            "hits": cache.hits if cache else 0,
            "misses": cache.misses if cache else 0,
        },
        "train_time_s": round(run.train_time, 2),
        "log_history": state.log_history,
    }


def _fit(trainer, callback: ProgtuningCallback, config: TrainConfig, output_dir: Path, schedule, layout):
    """``trainer.train()``, resumed if asked, stopped cleanly on SIGTERM/Ctrl-C or a non-finite loss."""
    from progtuning.runs.checkpoint_files import clean_partial_checkpoints, last_checkpoint
    from progtuning.runs.resume_checks import check_checkpoint
    from progtuning.runs.stops import StopOnNonFiniteLoss, StopOnSignal, TrainingStopped

    stop, nan_guard = StopOnSignal(), StopOnNonFiniteLoss(callback)
    trainer.add_callback(stop)
    trainer.add_callback(nan_guard)
    resume = None
    if config.resume:
        if launcher_rank() == 0:
            clean_partial_checkpoints(output_dir / CHECKPOINTS_DIR)  # what a killed run left half-written
        resume = _last_checkpoint(output_dir)
        check_checkpoint(resume, trainer.model, schedule, list(layout.block_paths))  # one line, before anything loads
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    finally:  # also when training raised: give the signal handlers back, drop the loss hook
        stop.restore()
        nan_guard.close()
    if stop.stopped_at is not None:
        raise TrainingStopped(stop.signal_name, stop.received, stop.stopped_at, callback.freezer.stage_index,
                              last_checkpoint(output_dir / CHECKPOINTS_DIR))
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
        folder=str(output_dir / PREFIX_CACHE_DIR),
        build_batch_size=config.eval_batch_size,
    )


# --------------------------------------------------------------------------------------------
# versions
# --------------------------------------------------------------------------------------------
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
