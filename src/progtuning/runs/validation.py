"""Every config value checked before anything heavy is imported or anything is written.

``progtuning train`` calls :func:`validate_values` from ``TrainConfig.validate`` and then
:func:`preflight` before it imports torch, so a mistake is one line and exit code 2 within a
fraction of a second:

* :func:`validate_values` — each value on its own and against the others: finite numbers, ranges,
  choices, list shapes, options that contradict each other (``--epochs nan``, ``--seed -1``,
  ``--warmup-ratio 5``, ``--overwrite --resume``, ...).
* :func:`preflight` — what the values point at, still without torch: input files and folders
  exist and are what they should be, the output folder can be written (see
  :mod:`progtuning.runs.output_dir`), the model name is an alias, a model folder or a reachable
  hub id (see :mod:`progtuning.runs.models`), ``max_length`` fits the model's positions when its
  config.json can be read, and a ``--resume`` keeps the checkpoint's config (see
  :mod:`progtuning.runs.resume`).
* :func:`check_max_length` — the same length check against a loaded model's config, for models
  whose config.json is only known once loaded (hub ids, aliases converted on first use).

This module imports neither torch nor transformers; keep it that way (a test checks it).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from progtuning.errors import ProgtuningError
from progtuning.tasks.names import check_task_name, is_squad

# Kept here (not imported) because their home modules import torch; a test checks they agree.
ADAPTER_TYPES = ("houlsby", "pfeiffer")
TASK_TYPES = ("classification", "regression")
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit

# Architectures whose positions are a learned table: a longer input indexes past its end and fails
# at the first step. Those that count positions from pad_token_id + 1 (RoBERTa's convention) lose
# that many rows. Rotary and relative-position models (Llama, Qwen2, T5, DeBERTa-v2) have no such limit.
_ABSOLUTE_POSITIONS = {"bert", "electra", "distilbert", "gpt2", "ernie", "megatron-bert", "albert", "deberta"}
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text", "longformer"}


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to a mistyped ``word`` (difflib), or None when nothing is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """``" (did you mean --epochs?)"`` or ``""``: the tail of an error message."""
    match = closest(word, choices)
    return f" (did you mean {prefix}{match}?)" if match else ""


# ---------------------------------------------------------------------------------------------
# values


def validate_values(config: Any) -> None:
    """Raise a one-line :class:`ProgtuningError` for the first value that is wrong on its own."""
    from progtuning.core.schedule import EMBEDDING_POLICIES, UNITS
    from progtuning.runs.config import METHODS

    _choice("method", config.method, METHODS)
    _choice("embeddings", config.embeddings, EMBEDDING_POLICIES, what="embeddings policy")
    _choice("stage_unit", config.stage_unit, UNITS)
    _choice("task_type", config.task_type, TASK_TYPES)
    _choice("adapter_type", config.adapter_type, ADAPTER_TYPES)
    for name in ("task", "model", "output_dir", "text_column", "label_column"):
        if not str(getattr(config, name)).strip():
            raise ProgtuningError(f"{name} is empty: give a value (see `progtuning train --help`)")
    check_task_name(config.task, getattr(config, "dataset", None), config.train_file)

    for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length", "doc_stride",
                 "logging_steps", "lora_r", "lora_alpha", "adapter_reduction_factor"):
        _at_least(name, getattr(config, name), 1)
    for name in ("stages", "threads", "max_train_examples", "max_eval_examples"):
        if getattr(config, name) is not None:
            _at_least(name, getattr(config, name), 1)
    _at_least("cache_budget_mb", config.cache_budget_mb, 0)
    _at_least("max_new_tokens", config.max_new_tokens, 1)
    _at_least("generate_examples", config.generate_examples, 0, why="0 turns the generation check off")
    if config.num_labels is not None:
        _at_least("num_labels", config.num_labels, 2, why="classification needs at least 2 classes")
    if not 0 <= config.seed <= MAX_SEED:
        raise ProgtuningError(f"seed must lie in 0..{MAX_SEED}, got {config.seed}: choose a non-negative seed")

    _finite("epochs", config.epochs, low=0)
    if config.max_steps != -1 and config.max_steps < 1:
        raise ProgtuningError(f"max_steps must be -1 (use epochs) or at least 1, got {config.max_steps}")
    if config.epochs == 0 and config.max_steps == -1:
        raise ProgtuningError("epochs is 0 and max_steps is -1, so nothing would train: set epochs > 0 or max_steps > 0")
    _finite("learning_rate", config.learning_rate, low=0, strict=True)
    _finite("weight_decay", config.weight_decay, low=0)
    _finite("max_grad_norm", config.max_grad_norm, low=0, why="0 turns clipping off")
    _fraction("warmup_ratio", config.warmup_ratio, "the fraction of all steps spent warming up")
    _fraction("lora_dropout", config.lora_dropout, "a dropout probability")

    if config.method == "peft" and not config.peft_config_path:
        raise ProgtuningError("method 'peft' needs --peft-config-path PATH (a peft config JSON)")
    if config.peft_config_path and config.method != "peft":
        raise ProgtuningError(f"peft_config_path is only read by method 'peft', not {config.method!r}: "
                              "pass --method peft or drop --peft-config-path")
    if config.task_type == "regression" and (config.label_names is not None or config.num_labels is not None):
        raise ProgtuningError("label_names and num_labels are for classification: drop them, "
                              "or set --task-type classification")
    _check_label_names(config.label_names, config.num_labels)
    _check_string_list("lora_target_modules", config.lora_target_modules)
    _check_stage_blocks(config.stage_blocks)
    _check_schedule_kind(config)
    _check_publishing(config)
    if config.resume and config.overwrite:
        raise ProgtuningError("--resume continues the run in output_dir and --overwrite replaces it: pass only one")
    if is_squad(config.task) and config.doc_stride >= config.max_length:
        raise ProgtuningError(f"doc_stride ({config.doc_stride}) must be smaller than max_length "
                              f"({config.max_length}): windows would not advance")


def _check_publishing(config: Any) -> None:
    """Early stopping, --merge-lora, --push-to-hub and --dataset against the rest of the config."""
    if config.early_stopping_patience is not None:
        _at_least("early_stopping_patience", config.early_stopping_patience, 1)
    if config.merge_lora and config.method != "lora":
        raise ProgtuningError(f"merge_lora folds LoRA into the base weights: it needs method lora, not {config.method}")
    if config.merge_lora and config.fsdp:
        raise ProgtuningError("--merge-lora cannot fold LoRA into a model sharded by FSDP: drop --merge-lora or --fsdp")
    if config.push_to_hub and not config.save_model:
        raise ProgtuningError("--push-to-hub uploads the saved model: drop --no-save-model")
    if config.dataset and (config.train_file or config.data_dir):
        raise ProgtuningError("give the data once: --dataset (the hub) or --train-file / --data-dir (local files)")


def _check_schedule_kind(config: Any) -> None:
    """The contribution schedule's knobs, and the fixed-schedule keys it cannot take."""
    from progtuning.core.contribution import SCHEDULES, check_policy_values  # plain numbers, no torch

    _choice("schedule", config.schedule, SCHEDULES)
    check_policy_values(config.target_reduction, config.contribution_threshold, config.decision_interval,
                        config.signal_every)
    if config.schedule == "contribution":
        for key in ("stages", "stage_blocks"):
            if getattr(config, key):
                raise ProgtuningError(
                    f"{key} sets a fixed schedule but schedule is contribution: drop {key}, or use schedule: fixed"
                )
    elif config.target_reduction is not None or config.contribution_threshold is not None:
        key = "target_reduction" if config.target_reduction is not None else "contribution_threshold"
        raise ProgtuningError(f"{key} applies to the contribution schedule: add --schedule contribution")


def _choice(name: str, value: Any, choices: Iterable[str], what: str | None = None) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ProgtuningError(f"unknown {what or name} {value!r}{did_you_mean(str(value), choices)}: "
                              f"use one of {', '.join(choices)}")


def _at_least(name: str, value: int, low: int, why: str | None = None) -> None:
    if value < low:
        raise ProgtuningError(f"{name} must be at least {low}, got {value}" + (f" ({why})" if why else ""))


def _finite(name: str, value: float, low: float, strict: bool = False, why: str | None = None) -> None:
    if not math.isfinite(value) or value < low or (strict and value == low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ProgtuningError(f"{name} must be a finite number {bound}, got {value}" + (f" ({why})" if why else ""))


def _fraction(name: str, value: float, meaning: str) -> None:
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ProgtuningError(f"{name} must lie in [0, 1) ({meaning}), got {value}")


def _check_label_names(names: list | None, num_labels: int | None) -> None:
    if names is None:
        return
    texts = [str(n) for n in names]
    if len(texts) < 2 or len(set(texts)) != len(texts) or any(isinstance(n, (list, dict)) for n in names):
        raise ProgtuningError(f"label_names {names} must be at least two distinct names, in id order")
    if num_labels is not None and num_labels != len(texts):
        raise ProgtuningError(f"label_names has {len(texts)} names but num_labels is {num_labels}: give one of them")


def _check_string_list(name: str, values: list | None) -> None:
    if values is not None and (not values or not all(isinstance(v, str) and v.strip() for v in values)):
        raise ProgtuningError(f"{name} must be a non-empty list of names, got {values!r}")


def _check_stage_blocks(stages: list | None) -> None:
    if stages is None:
        return
    ok = bool(stages) and all(
        isinstance(stage, list) and stage and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in stage)
        for stage in stages
    )
    if not ok:
        raise ProgtuningError(f"stage_blocks must be a list of non-empty lists of block indices >= 0, "
                              f"e.g. [[4, 5], [5]]; got {stages!r}")


# ---------------------------------------------------------------------------------------------
# what the values point at


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` found: the checkpoint a ``--resume`` continues from (None for a new run)."""

    resume_from: str | None = None


def preflight(config: Any) -> Checked:
    """Check inputs, output folder, model name, lengths and a resume, without torch."""
    from progtuning.runs.models import check_model_name, local_model_config
    from progtuning.runs.output_dir import check_output_dir

    check_input_paths(config)
    first = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank: the process that writes
    check_output_dir(config.output_dir, overwrite=config.overwrite, resume=config.resume, contents=first)
    check_model_name(config.model)
    model_config = local_model_config(config.model)
    if model_config is not None:
        check_max_length(config.max_length, model_config, config.model)
    if not config.resume:
        return Checked()
    from progtuning.runs.resume import check_resume

    return Checked(check_resume(config))


def check_input_paths(config: Any) -> None:
    """Data files and folders exist and are of the right kind (a folder given as a file is named as such)."""
    for option in ("train_file", "validation_file", "test_file", "peft_config_path"):
        value = getattr(config, option)
        if value is not None:
            check_file(value, f"--{option.replace('_', '-')}")
    if config.data_dir is not None:
        path = Path(config.data_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ProgtuningError(f"--data-dir '{config.data_dir}' is a file, not a folder: give the task's folder")
        if not path.exists():
            raise ProgtuningError(f"--data-dir '{config.data_dir}' does not exist: check the path")


def check_file(value: str | Path, option: str) -> Path:
    """``value`` as an existing regular file, or a one-line error saying what it is instead."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ProgtuningError(f"{option} '{value}' is a directory, not a file: give the file inside it")
    if not path.exists():
        raise ProgtuningError(f"{option} '{value}' does not exist: check the path")
    if not path.is_file():
        raise ProgtuningError(f"{option} '{value}' is not a regular file: give a CSV, TSV or JSONL file")
    return path


def usable_positions(model_config: dict) -> int | None:
    """How many token positions the model can embed, or None where it has no fixed table."""
    kind = str(model_config.get("model_type", ""))
    positions = model_config.get("max_position_embeddings", model_config.get("n_positions"))
    if not isinstance(positions, int):
        return None
    if kind in _OFFSET_POSITIONS:
        pad = model_config.get("pad_token_id")
        return positions - ((pad if isinstance(pad, int) else 1) + 1)
    if kind in _ABSOLUTE_POSITIONS or (kind == "deberta-v2" and model_config.get("position_biased_input")):
        return positions
    return None


def check_max_length(max_length: int, model_config: dict, model: str) -> None:
    limit = usable_positions(model_config)
    if limit is not None and max_length > limit:
        raise ProgtuningError(f"max_length {max_length} is longer than model {model!r} can embed ({limit} positions): "
                              f"use --max-length {limit} or less")


def read_json_file(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
