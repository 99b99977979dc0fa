"""One experiment end to end: task + model + method + Progtuning → HF Trainer → results.json.

This is the only module that knows the datasets and the Trainer together. ``run(config)``:

1. checks everything the user gave (task, columns, labels, model, output folder) before writing
   anything, so a mistake leaves nothing half-written;
2. tokenizes the splits, applies the fine-tuning method, and trains with
   :class:`~progtuning.core.callback.ProgtuningCallback` (the baseline uses the same callback with a
   single all-trainable stage, so both runs are logged and measured the same way);
3. evaluates the validation split(s), and the test split once at the very end (model selection
   never looks at test), saves model and tokenizer, and writes ``OUTPUT_DIR/results.json``.

SQuAD runs the same loop with a question-answering head; its predictions are post-processed
outside the Trainer (:mod:`progtuning.tasks.squad`).
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
from progtuning.core.contribution_freezer import prefix_ladder
from progtuning.runs.contribution import check_target_up_front, contribution_policy
from progtuning.core.counting import count_updates
from progtuning.core.distributed import launcher_rank
from progtuning.errors import ProgtuningError
from progtuning.core.schedule import Schedule, explicit, no_progtuning, progressive

logger = logging.getLogger("progtuning")

RESULTS_FILE = "results.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class QATask:
    """SQuAD described the way results.json and the tables need it."""

    name: str
    version: str
    main_metric: str = "f1"
    num_labels: None = None


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written."""

    config: TrainConfig
    task: Any  # TextTask, or the SQuAD description
    data: Any  # DatasetDict of raw examples
    tokenizer: Any
    model: torch.nn.Module
    model_path: str
    is_qa: bool


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
    check_target_up_front(config, prepared.model)  # an unreachable target_reduction: one line, nothing written
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
    from progtuning.tasks.registry import is_squad

    is_qa = is_squad(config.task)
    if is_qa:
        from progtuning.tasks.squad import load_squad

        from progtuning.tasks.registry import SQUAD_TASKS, subsample

        version = SQUAD_TASKS[config.task.lower()]
        task = QATask(name=f"squad-v{version}", version=version)
        data = load_squad(version, config.data_dir)
        data = subsample(data, config.max_train_examples, config.max_eval_examples, config.seed)
    else:
        from progtuning.tasks.registry import load_text_task

        task, data = load_text_task(config)
        check_text_data(task, data)
    model_path = resolve_model(config.model)
    tokenizer = _load_tokenizer(model_path, config)
    set_seed(config.seed)  # the new head's initialisation
    model = _load_model(model_path, config, task, is_qa, tokenizer)
    model = _apply_method(model, config, is_qa)
    return Prepared(config, task, data, tokenizer, model, model_path, is_qa)


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


def check_text_data(task, data) -> None:
    """Columns present, splits non-empty, labels in range — one line per problem."""
    for split in ("train", *task.eval_splits):
        if split not in data:
            raise ProgtuningError(f"task {task.name} has no {split!r} split (found: {', '.join(data)}); provide one")
    for split, dataset in data.items():
        if len(dataset) == 0:
            raise ProgtuningError(f"the {split} split of {task.name} is empty: check the file or the subsampling")
        needed = [*task.text_columns, task.label_column]
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise ProgtuningError(
                f"{split} split of {task.name} lacks column(s) {', '.join(missing)} "
                f"(has: {', '.join(dataset.column_names)}): set text_column / label_column"
            )
        if not task.is_regression:
            labels = np.asarray(dataset[task.label_column])
            bad = labels[(labels < 0) | (labels >= task.num_labels)]
            if bad.size:
                raise ProgtuningError(
                    f"{split} split of {task.name} has label {bad[0]} outside 0..{task.num_labels - 1}: fix the labels"
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


def _load_model(model_path: str, config: TrainConfig, task, is_qa: bool, tokenizer):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    try:
        if is_qa:
            model = AutoModelForQuestionAnswering.from_pretrained(model_path, **kwargs)
        else:
            kwargs["num_labels"] = task.num_labels
            if task.is_regression:
                kwargs["problem_type"] = "regression"
            if task.label_names:
                kwargs["id2label"] = dict(enumerate(task.label_names))
                kwargs["label2id"] = {name: i for i, name in enumerate(task.label_names)}
            model = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
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


def _apply_method(model, config: TrainConfig, is_qa: bool):
    from progtuning.methods.api import apply_method

    return apply_method(model, method_config(config), task_type="qa" if is_qa else "seq_cls")


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
    from transformers import DataCollatorWithPadding, TrainingArguments, default_data_collator

    from progtuning.runs.checkpoints import (
        ProgtuningTrainer,
        StopOnNonFiniteLoss,
        StopOnSignal,
        TrainingStopped,
        check_checkpoint,
        clean_partial_checkpoints,
        last_checkpoint,
    )

    from progtuning.core.blocks import find_blocks

    config, model, tokenizer = prepared.config, prepared.model, prepared.tokenizer
    layout = find_blocks(model, blocks=config.blocks)
    policy = contribution_policy(config)
    schedule = prefix_ladder(layout.num_blocks, config.embeddings) if policy else build_schedule(config, layout.num_blocks)
    callback = ProgtuningCallback(policy or schedule, blocks=config.blocks, embeddings=config.embeddings,
                                  eval_frozen_blocks=config.eval_frozen_blocks)

    if prepared.is_qa:
        train_set, eval_sets, eval_features = tokenize_qa(prepared.data, tokenizer, config)
        collator = default_data_collator
        compute_metrics = None
    else:
        train_set, eval_sets = tokenize_text(prepared.task, prepared.data, tokenizer, config.max_length)
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics = _metric_adapter(prepared.task)
    cache = _prefix_cache(config, model, layout, train_set, collator, output_dir)
    if cache is not None:
        train_set, collator = cache.dataset, ExampleIndexCollator(collator)
    cache_callback = PrefixCacheCallback(callback, cache)  # after the Progtuning callback: the stage is set

    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
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
        eval_strategy="epoch" if "validation" in eval_sets and not prepared.is_qa else "no",
        save_strategy="epoch" if config.save_checkpoints else "no",
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        report_to=[],
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        disable_tqdm=False,
        remove_unused_columns=cache is None,  # the cache looks examples up by their index column
        # Several processes: the wrapper is built before stage 0 is applied, so DDP registers every parameter
        # and skips the frozen ones each step (measured correct for shrinking and growing schedules; see
        # docs/distributed.md). Explicit, because the Trainer turns it off under activation checkpointing.
        ddp_find_unused_parameters=True,
    )
    stop, nan_guard = StopOnSignal(), StopOnNonFiniteLoss(callback)
    trainer = ProgtuningTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets.get("validation") if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[callback, cache_callback, stop, nan_guard],
    )
    train_started = time.perf_counter()
    resume = None
    if config.resume:
        if launcher_rank() == 0:
            clean_partial_checkpoints(output_dir / CHECKPOINTS)  # what a killed run left half-written
        resume = _last_checkpoint(output_dir)
        check_checkpoint(resume, model, schedule, list(layout.block_paths))  # one line, before anything loads
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    finally:  # also when training raised: give the signal handlers back, drop the loss hook
        stop.restore()
        nan_guard.close()
    train_time = time.perf_counter() - train_started
    if stop.stopped_at is not None:
        raise TrainingStopped(stop.signal_name, stop.received, stop.stopped_at, callback.freezer.stage_index,
                              last_checkpoint(output_dir / CHECKPOINTS))

    if prepared.is_qa:
        metrics = {
            split: evaluate_qa(trainer, prepared.data[split], eval_sets[split], eval_features[split], prepared.task)
            for split in eval_sets
        }
    else:
        metrics = {
            split: _strip_prefix(trainer.evaluate(dataset, metric_key_prefix=split), split)
            for split, dataset in eval_sets.items()
        }
    if config.save_model and trainer.is_world_process_zero():
        _save(trainer, model, tokenizer, config, output_dir)

    steps_per_epoch = callback.steps_per_epoch
    # From the schedule, not from the stage records: a resumed run recorded only its second half,
    # and the stages switch exactly where planned (test_train checks it). The contribution schedule
    # keeps its whole history in the checkpoint instead.
    if policy:
        lengths = callback.freezer.level_lengths(trainer.state.global_step)
    else:
        lengths = schedule.stage_lengths(steps_per_epoch, trainer.state.global_step)
    accounting = count_updates(callback.freezer, lengths, epochs=trainer.state.global_step / steps_per_epoch)
    main = prepared.task.main_metric
    return {
        "config": config.to_dict(),
        "versions": library_versions(),
        "seed": config.seed,
        "task": _task_summary(prepared),
        "model": {
            "name": config.model,
            "path": prepared.model_path,
            "num_blocks": layout.num_blocks,
            "total_params": accounting.total_params,
            "method_trainable_params": accounting.method_trainable_params,
        },
        "schedule": schedule.to_dict(),
        "planned_stage_starts": None if policy else schedule.stage_starts(steps_per_epoch, callback.total_steps),
        **({"contribution": callback.freezer.summary(trainer.state.global_step)} if policy else {}),
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


def tokenize_text(task, data, tokenizer, max_length: int):
    """Tokenized train split and evaluation splits (validation first, test last)."""

    text_columns, label_column = task.text_columns, task.label_column

    def encode(batch):
        texts = [batch[column] for column in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    def tokenized(dataset):
        return dataset.map(
            encode,
            batched=True,
            remove_columns=dataset.column_names,
            desc="tokenizing",
            new_fingerprint=_fingerprint(dataset, tokenizer, max_length),
        )

    eval_splits = [s for s in (*task.eval_splits, "test") if s in data]
    return tokenized(data["train"]), {split: tokenized(data[split]) for split in eval_splits}


def tokenize_qa(data, tokenizer, config: TrainConfig):
    """SQuAD windows: train features with answer positions; eval features plus what post-processing needs."""
    from progtuning.tasks.squad import prepare_eval_features, prepare_train_features

    window = dict(tokenizer=tokenizer, max_length=config.max_length, doc_stride=config.doc_stride)
    train = data["train"].map(
        lambda batch: prepare_train_features(batch, **window),
        batched=True,
        remove_columns=data["train"].column_names,
        desc="windows (train)",
        new_fingerprint=_fingerprint(data["train"], tokenizer, config.max_length, config.doc_stride, "train"),
    )
    eval_sets, eval_features = {}, {}
    for split in [s for s in data if s != "train"]:
        features = data[split].map(
            lambda batch: prepare_eval_features(batch, **window),
            batched=True,
            remove_columns=data[split].column_names,
            desc=f"windows ({split})",
            new_fingerprint=_fingerprint(data[split], tokenizer, config.max_length, config.doc_stride, "eval"),
        )
        eval_features[split] = features
        # The model sees only its inputs; example ids and offsets stay behind for post-processing.
        eval_sets[split] = features.remove_columns(["example_id", "offset_mapping"])
    return train, eval_sets, eval_features


def evaluate_qa(trainer, examples, model_inputs, features, task: QATask) -> dict:
    """Predict start/end logits, turn them into answer strings, and score them (EM/F1)."""
    from progtuning.tasks.squad import postprocess_predictions, squad_metrics

    output = trainer.predict(model_inputs)
    start_logits, end_logits = output.predictions[:2]
    version_2 = task.version == "2.0"
    answers = postprocess_predictions(examples, features, start_logits, end_logits, version_2=version_2)
    return squad_metrics(answers, examples, version_2=version_2)


def _fingerprint(dataset, tokenizer, max_length: int, *extra) -> str:
    # Without it, datasets hashes `encode` by pickling its closure with dill, which walks the
    # tokenizer and every global it reaches: minutes on a small CPU for a one-second map.
    import hashlib

    key = repr((dataset._fingerprint, tokenizer.name_or_path, len(tokenizer), max_length, *extra))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _metric_adapter(task):
    def compute(prediction):
        predictions = prediction.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        return task.metric(np.asarray(predictions), np.asarray(prediction.label_ids))

    return compute


def _strip_prefix(metrics: dict, prefix: str) -> dict:
    return {key[len(prefix) + 1 :] if key.startswith(prefix + "_") else key: value for key, value in metrics.items()}


def _save(trainer, model, tokenizer, config: TrainConfig, output_dir: Path) -> None:
    from progtuning.methods.api import save_method

    model_dir = output_dir / "model"
    if config.method == "full":
        trainer.save_model(str(model_dir))
    else:
        save_method(model, method_config(config), str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


def _task_summary(prepared: Prepared) -> dict:
    task = prepared.task
    return {
        "name": task.name,
        "main_metric": task.main_metric,
        "num_labels": getattr(task, "num_labels", None),
        "sizes": {split: len(dataset) for split, dataset in prepared.data.items()},
    }


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
