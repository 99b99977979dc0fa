"""The ``TrainingArguments`` of ``progtuning train``: what the config sets, and every other field through ``training_args``.

A run's config sets the Trainer's usual knobs under its own names (``epochs``, ``learning_rate``,
``batch_size``, ...). Any *other* ``transformers.TrainingArguments`` field passes through unchanged
from the ``training_args`` mapping::

    training_args:                # YAML
      bf16: true
      lr_scheduler_type: cosine
      warmup_steps: 100
      eval_strategy: steps
      eval_steps: 50
      save_strategy: steps
      save_steps: 50
      load_best_model_at_end: true

    progtuning train CONFIG --training-args.bf16 --training-args.lr_scheduler_type cosine

Every key is checked against the dataclass before anything loads: an unknown one is refused in one
line naming the closest field. Three tables say what progtuning does with the rest, and why
(``docs/ecosystem.md`` prints them):

* :data:`OWNED` — fields the config sets under its own name: use that key instead.
* :data:`REFUSED` — fields that would break Progtuning or the run folder, with the reason.
* :data:`ADJUSTED` — fields progtuning gives a default or a check of its own; the user's value wins
  where it is given.

Early stopping is the config's ``early_stopping_patience`` (transformers' ``EarlyStoppingCallback``):
it needs an evaluation each epoch (or ``eval_strategy``), keeps the best model
(``load_best_model_at_end``) and, unless ``metric_for_best_model`` is given, judges by the task's main
metric rather than the loss.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from progtuning.errors import ProgtuningError

# TrainingArguments field -> the config key that sets it.
OWNED: dict[str, str] = {
    "output_dir": "output_dir",  # checkpoints go to OUTPUT_DIR/checkpoints
    "num_train_epochs": "epochs",
    "max_steps": "max_steps",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_grad_norm": "max_grad_norm",
    "seed": "seed",
    "data_seed": "seed",
    "logging_steps": "logging_steps",
    "report_to": "report_to",
    "resume_from_checkpoint": "resume",
    "push_to_hub": "push_to_hub",
    "hub_model_id": "hub_model_id",
    "hub_private_repo": "hub_private",
    "fsdp": "fsdp",  # --fsdp: FSDP2 set up by progtuning, one unit per block
}

# TrainingArguments field -> why progtuning refuses it.
REFUSED: dict[str, str] = {
    "fsdp_config": "FSDP is set up by progtuning itself with --fsdp, one unit per block (docs/distributed.md), not by "
                   "the Trainer's option",
    "deepspeed": "DeepSpeed partitions parameters and optimizer state where the stage switch cannot follow them "
                 "(docs/distributed.md)",
    "ddp_find_unused_parameters": "it stays on: frozen blocks get no gradient, which DDP must expect",
    "remove_unused_columns": "the task decides its model inputs (the frozen-prefix cache keeps an index column)",
    "label_names": "the task kind decides its label columns",
    "prediction_loss_only": "the task's scores need the predictions",
    "include_for_metrics": "the task's metric decides what evaluation gathers",
    "batch_eval_metrics": "the task's metric scores the whole split at once",
    "restore_callback_states_from_checkpoint": "it would rebuild the Progtuning callback from the checkpoint and "
                                               "replace this run's schedule",
    "enable_jit_checkpoint": "progtuning stops cleanly on SIGTERM itself, with a checkpoint and the resume command",
    "hub_token": "a token does not belong in a config: use HF_TOKEN or `hf auth login`",
    "hub_strategy": "progtuning pushes once, at the end of the run (--push-to-hub)",
    "hub_always_push": "progtuning pushes once, at the end of the run (--push-to-hub)",
    "hub_revision": "progtuning pushes once, at the end of the run (--push-to-hub)",
    "local_rank": "the launcher (torchrun, accelerate launch) sets it",
    "do_train": "progtuning train always trains, then scores the validation and test splits",
    "do_eval": "progtuning train always trains, then scores the validation and test splits",
    "do_predict": "use `progtuning predict RUN_DIR --file ...` after training",
}

# TrainingArguments field -> what progtuning does with it (documentation; the code is below).
ADJUSTED: dict[str, str] = {
    "eval_strategy": "'epoch' when the task scores inside the Trainer and has a validation split, else 'no'; "
                     "extractive QA refuses another value (its scores need post-processing after training)",
    "save_strategy": "'epoch' (off with --no-save-checkpoints); a value of yours replaces it",
    "save_total_limit": "2; a value of yours replaces it",
    "metric_for_best_model": "the task's main metric when load_best_model_at_end or early stopping is on "
                             "and none is given",
    "load_best_model_at_end": "on with early_stopping_patience",
    "warmup_steps": "the config's warmup_ratio; give one of the two",
    "activation_checkpointing_kwargs": "use_reentrant: true is refused: reentrant checkpoints give a block whose "
                                       "input is frozen no gradients (the default is non-reentrant)",
    "gradient_checkpointing_kwargs": "as activation_checkpointing_kwargs (its older name)",
    "dataloader_num_workers": "0; a value of yours replaces it",
    "disable_tqdm": "False; a value of yours replaces it",
    "use_cpu": "on when no GPU is visible",
    "logging_strategy": "'steps' (every logging_steps)",
}


def field_names() -> list[str]:
    from transformers import TrainingArguments

    return [f.name for f in dataclasses.fields(TrainingArguments) if f.init]


def check_training_args(values: dict | None) -> dict[str, Any]:
    """``values`` checked against ``TrainingArguments`` and coerced to its field types (one-line errors)."""
    if not values:
        return {}
    if not isinstance(values, dict):
        raise ProgtuningError(f"training_args must be a mapping of TrainingArguments fields, got {type(values).__name__}")
    from transformers import TrainingArguments

    names = field_names()
    hints = typing.get_type_hints(TrainingArguments)
    checked = {}
    for key, value in values.items():
        key = str(key)
        if key in OWNED:
            raise ProgtuningError(
                f"training_args.{key} is set by the config key {OWNED[key]}: use --{OWNED[key].replace('_', '-')} "
                f"(or `{OWNED[key]}:` in the YAML)"
            )
        if key in REFUSED:
            raise ProgtuningError(f"training_args.{key} is refused: {REFUSED[key]}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ProgtuningError(
                f"training_args.{key} is not a TrainingArguments field{hint}: see docs/ecosystem.md"
            )
        checked[key] = _coerce(key, value, hints[key])
    for kwargs_key in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        kwargs = checked.get(kwargs_key)
        if isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
            raise ProgtuningError(f"training_args.{kwargs_key}: use_reentrant: true is refused: {ADJUSTED[kwargs_key]}")
    return checked


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """A command-line string as the field's type (YAML values are typed already)."""
    if not isinstance(value, str):
        return value
    members = set(typing.get_args(hint)) or {hint}
    members = {typing.get_origin(m) or m for m in members}
    text = value.strip()
    if type(None) in members and text.lower() in ("none", "null"):
        return None
    if bool in members:
        if text.lower() in ("true", "yes", "1", "on"):
            return True
        if text.lower() in ("false", "no", "0", "off"):
            return False
        if members <= {bool, type(None)}:
            raise ProgtuningError(f"training_args.{key} expects true or false, got {value!r}")
    for number in (int, float):
        if number in members:
            try:
                return number(text)
            except ValueError:
                if members <= {int, float, type(None)}:
                    raise ProgtuningError(f"training_args.{key} expects a number, got {value!r}") from None
    if (dict in members or list in members) and text[:1] in "{[":
        return yaml.safe_load(text)
    return value


def build_training_arguments(config: Any, output_dir: Path, task: Any, *, evaluate_each_epoch: bool,
                             keep_all_columns: bool, checkpoints_dir: str) -> Any:
    """The run's ``TrainingArguments``: the config's keys, progtuning's defaults, then ``training_args``.

    ``evaluate_each_epoch``: the task scores inside the Trainer and the data has a validation split.
    """
    import torch
    from transformers import TrainingArguments

    from progtuning.runs.reporting import report_to_list

    user = check_training_args(getattr(config, "training_args", None))
    if "warmup_steps" in user and config.warmup_ratio:
        raise ProgtuningError("give one of warmup_ratio and training_args.warmup_steps, not both")
    if not evaluate_each_epoch and str(user.get("eval_strategy", "no")) != "no":
        if not task.evaluates_each_epoch:
            raise ProgtuningError(
                f"training_args.eval_strategy={user['eval_strategy']!r} cannot work for {task.kind} tasks: their "
                "scores need post-processing after training (drop it; validation and test are scored at the end)"
            )
        raise ProgtuningError(f"training_args.eval_strategy={user['eval_strategy']!r} needs a validation split: "
                              "give one (validation_file) or drop it")
    patience = getattr(config, "early_stopping_patience", None)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir / checkpoints_dir),
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
        report_to=report_to_list(getattr(config, "report_to", "none")),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        remove_unused_columns=not keep_all_columns,  # the prefix cache looks examples up by their index column
        # Several processes: the wrapper is built before stage 0 is applied, so DDP registers every parameter
        # and skips the frozen ones each step (measured correct for shrinking and growing schedules; see
        # docs/distributed.md). Explicit, because the Trainer turns it off under activation checkpointing.
        ddp_find_unused_parameters=True,
    )
    kwargs.update(user)
    if patience is not None:
        if kwargs["eval_strategy"] == "no":
            raise ProgtuningError(
                "early_stopping_patience needs an evaluation to watch: this task has no validation split scored "
                "during training (give one, or set training_args.eval_strategy)"
            )
        kwargs["load_best_model_at_end"] = True
    if kwargs.get("load_best_model_at_end") and not kwargs.get("metric_for_best_model"):
        kwargs["metric_for_best_model"] = task.main_metric  # the task's score, not the loss
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProgtuningError(f"the Trainer refuses these settings: {first}") from None


def early_stopping_callbacks(config: Any) -> list:
    """transformers' ``EarlyStoppingCallback`` when the config asks for it."""
    patience = getattr(config, "early_stopping_patience", None)
    if patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=patience,
                                  early_stopping_threshold=getattr(config, "early_stopping_threshold", 0.0))]


def settings_table() -> str:
    """The three tables as one Markdown table (docs/ecosystem.md holds it; a test keeps the two equal)."""
    lines = ["| TrainingArguments field | what progtuning does |", "| --- | --- |"]
    lines += [f"| `{k}` | set by the config key `{v}` |" for k, v in OWNED.items()]
    lines += [f"| `{k}` | refused: {v} |" for k, v in REFUSED.items()]
    lines += [f"| `{k}` | {v} |" for k, v in ADJUSTED.items()]
    return "\n".join(lines)
