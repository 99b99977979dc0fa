"""One experiment end to end: task + model + method + Progtuning → HF Trainer → results.json.

This is the only module that knows the datasets and the Trainer together. ``run(config)``:

1. checks everything the user gave (every config value, files, output folder, model name, a
   resume's checkpoint and config: :mod:`progtuning.runs.validation`; then task, columns, labels,
   model) before writing anything, so a mistake leaves nothing half-written; the output folder is
   claimed with a manifest of what progtuning writes there (:mod:`progtuning.runs.output_dir`), and
   a run that fails before its first checkpoint takes it back;
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
import os
import shutil
import time
from dataclasses import dataclass, field
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
from progtuning.runs.validation_curve import ValidationCurve
from progtuning.core.contribution_freezer import ContributionFreezer, prefix_ladder
from progtuning.runs.contribution import check_target_up_front, contribution_policy
from progtuning.core.counting import count_updates
from progtuning.core.distributed import launcher_rank
from progtuning.errors import ProgtuningError, warn
from progtuning.core.schedule import Schedule, explicit, no_progtuning, progressive
from progtuning.runs.results import (
    CHECKPOINTS_DIR,
    MODEL_CARD_FILE,
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
    features: Any  # the task's tokenized splits (tasks.base.Features)
    notes: list[str] = field(default_factory=list)  # one-line warnings, shown and kept in results.json


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def run(config: TrainConfig, checked=None) -> dict:
    """Train one experiment and return (and write) its results.

    ``checked`` is :func:`~progtuning.runs.validation.preflight`'s answer when the caller (the CLI)
    already ran it before importing this module; otherwise it runs here.
    """
    from progtuning.runs.output_dir import claim, io_error, is_io_fault, release_if_unused
    from progtuning.runs.resume import config_record
    from progtuning.runs.validation import preflight

    started = time.perf_counter()
    output_dir = Path(config.output_dir).expanduser()
    checked = checked or preflight(config)
    _check_integrations(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.progtuning or config.fsdp:
        from progtuning.core.distributed import refuse_unsupported_parallelism

        refuse_unsupported_parallelism()  # FSDP / DeepSpeed from the launcher: one line before any loading
    if config.fsdp:
        from progtuning.runs.sharded_trainer import check_fsdp_config

        check_fsdp_config(config)
    prepared = prepare(config)
    check_target_up_front(config, prepared.model)  # an unreachable target_reduction: one line, nothing written
    record = config_record(config)  # kept in every checkpoint: a resume must not change the run
    writer = launcher_rank() == 0
    claimed = None
    if writer and not config.resume:
        claimed = claim(output_dir, overwrite=config.overwrite)
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = _train(prepared, output_dir, checked.resume_from, record)
        results["wall_time_s"] = round(time.perf_counter() - started, 2)
        results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if writer:  # several processes (torchrun): one writer
            _publish(config, output_dir, results)
    except BaseException as error:
        if claimed is not None:
            release_if_unused(claimed)  # failed before its first checkpoint: no folder left behind
        if is_io_fault(error):
            raise io_error(error, f"cannot write the run's files in {config.output_dir}", _io_hint(error, output_dir)) \
                from None
        raise
    return results


def _io_hint(error: OSError, output_dir: Path) -> str | None:
    """How to go on after an I/O fault: resume from the last checkpoint if there is one."""
    import errno

    from progtuning.runs.checkpoint_files import last_checkpoint

    last = last_checkpoint(output_dir / CHECKPOINTS_DIR)
    if last is None:
        return None
    fix = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make the folder writable"
    return f"{fix}, then resume with --resume (the last good checkpoint is {last})"


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

    from progtuning.runs.models import remote_code_note, resolve_model
    from progtuning.runs.validation import check_max_length
    from progtuning.tasks.registry import load_task

    task, data = load_task(config)
    notes = _data_notes(task)
    model_path = resolve_model(config.model)
    tokenizer = _load_tokenizer(model_path, config)
    set_seed(config.seed)  # the new head's initialisation
    model = _load_model(model_path, config, task, tokenizer)
    check_max_length(config.max_length, model.config.to_dict(), config.model)  # known for every model only now
    note = remote_code_note(config.model, model.config.to_dict(), config.trust_remote_code)
    if note:
        notes.append(note)
    for note in notes:
        warn(note)
    model = _apply_method(model, config, task)
    task.check_model(model, config)
    # Tokenizing checks the examples against the model (lengths, templates): before anything is written.
    features = task.preprocess(data, tokenizer, config)
    return Prepared(config, task, data, tokenizer, model, model_path, features, notes)


def _data_notes(task) -> list[str]:
    skipped = (getattr(task, "extra", None) or {}).get("skipped_rows") or {}
    if not any(skipped.values()):
        return []
    counts = ", ".join(f"{n} in the {split} file" for split, n in skipped.items() if n)
    return [f"skipped {sum(skipped.values())} row(s) with an empty text or label ({counts}; --skip-bad-rows)"]


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
    import pickle

    from progtuning.runs.models import describe_load_error

    try:
        model = task.load_model(model_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
        unsafe = describe_load_error(config.model, error)  # a pickle with code: never advise weights_only=False
        if unsafe is None and isinstance(error, RuntimeError):
            raise
        raise ProgtuningError(unsafe or _model_error(config.model, error)) from None
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
    # The stages share the run equally: T = the number of epochs gives one epoch each (the paper),
    # another T gives E/T epochs each or, when T does not divide E, equal shares of the optimizer steps.
    # A max_steps run is measured in steps, not epochs: its stages start one per epoch (stage_unit
    # fraction shares its steps), and a run too short for them is refused when training starts.
    epochs = config.epochs if config.max_steps <= 0 else None
    if config.stage_blocks:
        return explicit(num_blocks, config.stage_blocks, config.embeddings, config.stage_unit, epochs=epochs)
    stages = config.stages or max(1, math.ceil(config.epochs))
    return progressive(num_blocks, stages, config.embeddings, config.stage_unit, epochs=epochs)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _train(prepared: Prepared, output_dir: Path, resume_from: str | None = None, record: dict | None = None) -> dict:
    from progtuning.core.blocks import find_blocks
    from progtuning.runs.checkpoints import ProgtuningTrainer
    from progtuning.runs.history import RunHistory
    from progtuning.runs.training_args import build_training_arguments, early_stopping_callbacks

    config, task, model, tokenizer = prepared.config, prepared.task, prepared.model, prepared.tokenizer
    layout = find_blocks(model, blocks=config.blocks)
    policy = contribution_policy(config)
    schedule = prefix_ladder(layout.num_blocks, config.embeddings) if policy else build_schedule(config, layout.num_blocks)
    callback = ProgtuningCallback(policy or schedule, blocks=config.blocks, embeddings=config.embeddings,
                                  eval_frozen_blocks=config.eval_frozen_blocks)
    telemetry = StageTelemetry(callback)  # after the Progtuning callback: the stage is set
    history = RunHistory(callback, telemetry)

    features = prepared.features
    train_set, collator = features.train, task.collator(tokenizer)
    cache = _prefix_cache(config, model, layout, train_set, collator, output_dir)
    if cache is not None:
        train_set, collator = cache.dataset, ExampleIndexCollator(collator)
    cache_callback = PrefixCacheCallback(callback, cache)  # after the Progtuning callback: the stage is set
    checkpointing = None
    if config.gradient_checkpointing:
        from progtuning.core.checkpointing import StageCheckpointing

        checkpointing = StageCheckpointing(callback)  # after the Progtuning callback: the stage is set

    evaluate_each_epoch = task.evaluates_each_epoch and "validation" in features.eval
    args = build_training_arguments(config, output_dir, task, evaluate_each_epoch=evaluate_each_epoch,
                                    keep_all_columns=cache is not None, checkpoints_dir=CHECKPOINTS_DIR)
    traffic = None
    if config.fsdp:  # after TrainingArguments: accelerate has set up the process group and this rank's device
        from progtuning.core.fsdp import TrafficLog, shard_by_block

        shard_by_block(model.to(args.device), layout)  # one FSDP2 unit per block, plus the root
        traffic = TrafficLog(callback)
    curve = ValidationCurve(task.main_metric if evaluate_each_epoch else None)
    trainer = ProgtuningTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=features.eval["validation"] if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=task.trainer_metrics(),
        # history last: it sees every save
        callbacks=[callback, telemetry, cache_callback, curve, *([checkpointing] if checkpointing else []),
                   *([traffic] if traffic else []),
                   *early_stopping_callbacks(config), history],
        seal=_sealer(record),
        lr_scheduler_factory=_lr_scheduler_factory(config, callback),
    )
    train_started = time.perf_counter()
    train_output = _fit(trainer, callback, config, output_dir, schedule, layout, resume_from)
    train_time = time.perf_counter() - train_started

    metrics, outputs = {}, {}
    for split in features.eval:
        metrics[split], split_outputs = task.evaluate_with_outputs(trainer, features, split)
        if split_outputs is not None:
            outputs[split] = split_outputs
    if config.save_model and (config.fsdp or trainer.is_world_process_zero()):  # FSDP: every rank gathers
        _save(trainer, model, tokenizer, config, task, output_dir)
    run = _Trained(trainer, train_output, train_time, schedule, layout, callback, history, cache_callback, curve,
                   traffic)
    return _results(prepared, run, metrics, outputs)


@dataclass
class _Trained:
    """What a finished training leaves behind for results.json."""

    trainer: Any
    output: Any  # the Trainer's TrainOutput
    train_time: float
    schedule: Schedule
    layout: Any
    callback: ProgtuningCallback
    history: Any  # RunHistory: the whole run's stages, also after a resume
    cache_callback: PrefixCacheCallback
    curve: ValidationCurve
    traffic: Any = None  # FSDP: the TrafficLog (bytes communicated and each rank's state per stage)


def _results(prepared: Prepared, run: _Trained, metrics: dict, outputs: dict) -> dict:
    """The results.json mapping (its keys: :class:`progtuning.runs.results.Results`)."""
    from progtuning.runs.history import whole_run_loss

    config, task, schedule, state = prepared.config, prepared.task, run.schedule, run.trainer.state
    steps_per_epoch = run.callback.steps_per_epoch
    policy = isinstance(run.callback.freezer, ContributionFreezer)
    # From the schedule, not from the stage records: a resumed run recorded only its second half,
    # and the stages switch exactly where planned (test_train checks it). The contribution schedule
    # keeps its whole history in the checkpoint instead.
    if policy:
        lengths = run.callback.freezer.level_lengths(state.global_step)
    else:
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
        "task": {**task.summary(prepared.data),
                 "skipped_rows": (getattr(task, "extra", None) or {}).get("skipped_rows") or {}},
        "model": {
            "name": config.model,
            "path": prepared.model_path,
            "num_blocks": run.layout.num_blocks,
            "total_params": accounting.total_params,
            "method_trainable_params": accounting.method_trainable_params,
        },
        "schedule": schedule.to_dict(),
        "planned_stage_starts": None if policy else schedule.stage_starts(steps_per_epoch, run.callback.total_steps),
        **({"contribution": run.callback.freezer.summary(state.global_step)} if policy else {}),
        # The whole run's stages and loss, also after a resume (history.py).
        "stages": [
            {**{k: v for k, v in stage.items() if k != "losses"}, "blocks": list(schedule.stages[stage["stage"]].blocks)}
            for stage in run.history.stages(state.global_step)
        ],
        "resumed_from_step": run.history.resumed_from,
        "steps": state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "train_loss": whole_run_loss(state.log_history, run.history.resumed_from, run.output.training_loss,
                                     state.global_step),
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
        **({"fsdp": {"stages": run.traffic.records()}} if run.traffic else {}),
        # What paired statistics need: each example's output (bootstrap over examples), and the
        # validation score after each epoch against training time so far (time to reach a score).
        "per_example": outputs,
        "validation_curve": run.curve.points,
        "log_history": state.log_history,
        "warnings": prepared.notes,
    }


def _sealer(record: dict | None):
    """What closes each checkpoint: the run's config (compared on resume), then a sha256 per file."""
    from progtuning.runs.integrity import write_checksums
    from progtuning.runs.resume import write_config_record

    def seal(folder: str) -> None:
        if record is not None:
            write_config_record(folder, record)
        write_checksums(folder)

    return seal


def _lr_scheduler_factory(config: TrainConfig, callback: ProgtuningCallback):
    """``lr_schedule: per_stage``: the warm-up/decay restarts at every stage; ``run``: the Trainer's own."""
    if config.lr_schedule != "per_stage":
        return None
    from progtuning.core.lr_schedule import per_stage_lr_scheduler

    return lambda optimizer, num_training_steps: per_stage_lr_scheduler(optimizer, callback, config.warmup_ratio)


def _fit(trainer, callback: ProgtuningCallback, config: TrainConfig, output_dir: Path, schedule, layout,
         resume_from: str | None = None):
    """``trainer.train()``, resumed if asked, stopped cleanly on SIGTERM/Ctrl-C or a non-finite loss."""
    from progtuning.runs.checkpoint_files import clean_partial_checkpoints, last_checkpoint
    from progtuning.runs.integrity import select_checkpoint
    from progtuning.runs.resume_checks import check_checkpoint
    from progtuning.runs.stops import StopOnNonFiniteLoss, StopOnSignal, TrainingStopped

    stop, nan_guard = StopOnSignal(), StopOnNonFiniteLoss(callback)
    trainer.add_callback(stop)
    trainer.add_callback(nan_guard)
    resume = None
    if config.resume:
        if launcher_rank() == 0:
            clean_partial_checkpoints(output_dir / CHECKPOINTS_DIR)  # what a killed run left half-written
        # The newest intact checkpoint, its config checked against this run's (preflight).
        resume = resume_from or str(select_checkpoint(output_dir / CHECKPOINTS_DIR))
        check_checkpoint(resume, trainer.model, schedule, list(layout.block_paths))  # one line, before anything loads
        from progtuning.runs.sharded_trainer import check_same_sharding

        check_same_sharding(resume, config.fsdp)
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
    """The frozen-prefix cache if asked for (True) or left to the preset (None: where it can run) and
    valid here; otherwise None, with the reason logged (a warning only where it was asked for)."""
    if config.cache_frozen is False:
        return None
    asked = config.cache_frozen is True
    reason = (
        ("the baseline freezes nothing" if not config.progtuning else None)
        or ("the embeddings train in every stage" if not asked and config.embeddings == "always" else None)
        or ("on a GPU, building it costs about what it saves" if not asked and _trains_on_gpu(config) else None)
        or unsupported_reason(model, layout)
        or input_reason(train_set, collator)
    )
    if reason:
        if asked:
            logger.warning("--cache-frozen is off: %s", reason)
        else:
            logger.info("the frozen-prefix cache is off: %s", reason)
        return None
    return FrozenPrefixCache(
        model,
        add_example_index(train_set),
        layout=layout,
        budget_mb=config.cache_budget_mb,
        folder=str(output_dir / PREFIX_CACHE_DIR),
        build_batch_size=config.eval_batch_size,
    )


def _trains_on_gpu(config: TrainConfig) -> bool:
    # Measured on an H200 (docs/results-gpu.md): a whole run took 0.98-1.06x of full fine-tuning's time
    # with the cache and 0.75x without. With one epoch per stage the cache only spares the last stage
    # a re-run of the earlier frozen blocks (~4% of the compute), less than building its host-memory
    # rows costs there.
    return torch.cuda.is_available() and not (config.training_args or {}).get("use_cpu")


def _save(trainer, model, tokenizer, config: TrainConfig, task: Task, output_dir: Path) -> None:
    """What the method trained, with progtuning_method.json, so load_method rebuilds it (any method),
    the tokenizer and the task's spec (runs/publish.py)."""
    from progtuning.runs.publish import save_run_model

    # Written beside its place and renamed into it: a full disk never leaves half a model (or a resumed
    # run's older model replaced by half of a new one).
    state = None
    if config.fsdp:  # the shards, gathered unit by unit into rank 0's memory (every rank takes part)
        from progtuning.core.fsdp import full_state_dict

        state = full_state_dict(model)
        if not trainer.is_world_process_zero():
            return
    final, staging, old = output_dir / MODEL_DIR, output_dir / f".partial-{MODEL_DIR}", output_dir / f".deleting-{MODEL_DIR}"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        save_run_model(model, tokenizer, config, task, staging, state_dict=state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


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
