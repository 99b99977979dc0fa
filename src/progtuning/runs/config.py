"""One experiment's settings: a dataclass that is at once the YAML schema, the CLI overrides and the
resolved config saved in ``results.json``.

A YAML config's first line is a comment with the exact command that runs it::

    # progtuning train configs/rotten-tomatoes/minilm-l6.yaml
    task: rotten-tomatoes
    model: minilm-l6
    epochs: 3

Any key can be overridden on the command line (``--epochs 4 --method lora``); booleans take
``--flag`` / ``--no-flag``. The method's own keys (``lora_r``, ``adapter_type``, ...) are declared
once, in :class:`~progtuning.methods.config.MethodSettings`, and inherited here. Configs are read with ``yaml.safe_load``: a Python object tag is refused.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from progtuning.core.lr_schedule import LR_SCHEDULES
from progtuning.core.presets import DEFAULT_PRESET, PRESETS, get_preset
from progtuning.core.schedule import EMBEDDING_POLICIES, UNITS
from progtuning.errors import ProgtuningError
from progtuning.methods.config import METHOD_HELP, MethodConfig, MethodSettings
from progtuning.methods.registry import METHODS

# Named in the help texts; TrainConfig fills each preset key left unset (None) from its preset.
_DEFAULT = get_preset(DEFAULT_PRESET)

# Keys that were renamed: old -> new (an old config gets a one-line hint instead of "unknown key").
RENAMED_KEYS = {"peft_config": "peft_config_path"}


def _help(text: str, default: Any = None, **kwargs) -> Any:
    if "default_factory" in kwargs:
        return field(default_factory=kwargs["default_factory"], metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class _WhatToTrain:
    """The first keys of a TrainConfig (split off so that the method settings follow ``method``)."""

    # -- what to train on --
    task: str = _help("task: a built-in task (rotten-tomatoes, trec6, sms-spam-instruct, movie-dialog, ...), a GLUE "
                      "task (sst2, mnli, ...), squad / squad_v2, 'files' with train_file, or causal-lm / instruct "
                      "(language modelling on text / instruction files) with train_file", "rotten-tomatoes")
    model: str = _help("model alias (minilm-l6, minilm-l3, mpnet-base, smollm2-135m), local folder or hub id", "minilm-l6")
    data_dir: Optional[str] = _help("local GLUE task folder / SQuAD JSON folder instead of the hub")
    dataset: Optional[str] = _help("a dataset on the Hugging Face hub by name (imdb, stanfordnlp/sst2, ...) or a local "
                                   "dataset folder, read with datasets.load_dataset; columns: text_column, label_column")
    dataset_config: Optional[str] = _help("--dataset: the name of its configuration (e.g. sst2 for nyu-mll/glue)")
    train_file: Optional[str] = _help("task 'files': CSV/TSV/JSONL training file")
    validation_file: Optional[str] = _help("task 'files': validation file (default: 10% of train, seeded)")
    test_file: Optional[str] = _help("task 'files': test file, scored once at the end")
    text_column: str = _help("task 'files': text column", "text")
    text_pair_column: Optional[str] = _help("task 'files': second text column for pair tasks")
    label_column: str = _help("task 'files': label column", "label")
    task_type: str = _help("task 'files': classification or regression", "classification")
    num_labels: Optional[int] = _help("task 'files': number of classes, when labels are ids 0..K-1 (checks the range)")
    label_names: Optional[list] = _help("task 'files': class names in id order")
    skip_bad_rows: bool = _help("task 'files': skip rows with an empty text or label (counted in results.json) "
                                "instead of refusing the file", False)
    max_train_examples: Optional[int] = _help("subsample the training set (seeded) to this many examples")
    max_eval_examples: Optional[int] = _help("subsample validation and test to this many examples")
    max_length: int = _help("maximum tokens per example (SQuAD: window length)", 128)
    doc_stride: int = _help("SQuAD: overlap between windows of a long context", 128)
    packing: Optional[bool] = _help("plain-text language modelling: pack examples into max_length blocks "
                                    "(default) or one per sequence (--no-packing)")
    max_new_tokens: int = _help("instruction tasks: most tokens generated per prompt in the greedy generation check", 32)
    generate_examples: int = _help("instruction tasks: prompts per evaluation split in the generation check (0: none)", 100)
    # -- the fine-tuning method (its settings: MethodSettings, next in the field order) --
    method: str = _help(METHOD_HELP, "full")


@dataclass
class TrainConfig(MethodSettings, _WhatToTrain):
    """One experiment: task, model, method (with every MethodSettings key), Progtuning, optimisation, output."""

    # -- Progtuning --
    progtuning: bool = _help("progressive freezing on (off = the baseline run with everything else equal)", True)
    preset: Optional[str] = _help(
        f"the settings the paper leaves open, as one choice: {' | '.join(PRESETS)} (default {DEFAULT_PRESET}); "
        + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
        + ". Keys given explicitly win")
    schedule: str = _help("fixed (the paper: part t freezes at stage t) | contribution (decided from signals "
                          "measured during the run)", "fixed")
    target_reduction: Optional[float] = _help("contribution: fraction of updated parameters to save vs no freezing "
                                              "(e.g. 0.25); without it the signals alone decide")
    contribution_threshold: Optional[float] = _help("contribution: a block is ready to freeze when its contribution "
                                                    "per parameter is below this fraction of the best block's "
                                                    "(default 0.3)")
    decision_interval: float = _help("contribution: fraction of the run's optimizer steps between decisions", 0.1)
    signal_every: int = _help("contribution: measure the signals every N optimizer steps", 1)
    stages: Optional[int] = _help("number of parts/stages T (default: epochs)")
    embeddings: Optional[str] = _help(f"embeddings train: always | first_stage | never (default: the preset's, "
                                      f"{_DEFAULT.embeddings} in {_DEFAULT.name})")
    stage_unit: str = _help("stage boundaries per epoch or per fraction of optimizer steps", "epoch")
    stage_blocks: Optional[list] = _help("explicit stages: a list of block-index lists (growing, top-down, custom)")
    variant: Optional[str] = _help("name of this schedule variant (a sweep sets it): results.json records the "
                                   "run's mode as prog-<variant>")
    variant_baseline: bool = _help("the variant is a cheap baseline, not a Progtuning arm (a sweep sets it): "
                                   "its mode is base-<variant>, and arms may be compared with it", False)
    compare_with: Optional[str] = _help("the baseline reports compare this run with: base (default) or "
                                        "base-<variant> (a sweep sets it)")
    blocks: Optional[str] = _help("dotted path of the block list for models the locator does not know")
    eval_frozen_blocks: Optional[bool] = _help(f"run frozen blocks in eval mode, their dropout off (default: the "
                                               f"preset's, {_DEFAULT.eval_frozen_blocks} in {_DEFAULT.name})")
    gradient_checkpointing: bool = _help("recompute activations in backward, in the stage's trainable blocks "
                                         "(non-reentrant checkpoints)", False)
    cache_frozen: Optional[bool] = _help("cache the frozen prefix's outputs across epochs (needs the embeddings frozen; "
                                         "BERT-family encoders). Unset: the preset decides, and a preset that caches "
                                         "does so only where the model, method and data allow it, on the CPU (null in the saved "
                                         "config; results.json's prefix_cache says what ran)")
    cache_budget_mb: int = _help("RAM for the frozen-prefix cache; beyond it the cache is a memory-mapped file", 1024)
    # -- processes --
    fsdp: bool = _help("shard the model with FSDP2, one unit per block (several processes: torchrun or "
                       "accelerate launch --multi_gpu); checkpoints are sharded too", False)
    # -- optimisation --
    epochs: float = _help("training epochs", 3)
    max_steps: int = _help("stop after this many optimizer steps (-1: use epochs)", -1)
    learning_rate: float = _help("peak learning rate (AdamW, linear decay)", 5e-5)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    warmup_ratio: float = _help("fraction of steps for linear warm-up (per_stage: of each stage's steps)", 0.0)
    lr_schedule: str = _help("learning-rate schedule: run (one warm-up/decay for the run) | per_stage "
                             "(restarted at every stage switch, over the stage's steps; one optimizer)", "run")
    batch_size: int = _help("training batch size per device", 32)
    eval_batch_size: int = _help("evaluation batch size", 64)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    max_grad_norm: float = _help("gradient clipping norm", 1.0)
    seed: int = _help("seed for initialisation, data order and subsampling", 0)
    threads: Optional[int] = _help("torch CPU threads (default: torch's choice)")
    # -- output --
    output_dir: str = _help("run folder: model, tokenizer, results.json", "runs/default")
    overwrite: bool = _help("replace an existing non-empty output_dir", False)
    resume: bool = _help("continue from the last checkpoint in output_dir", False)
    save_checkpoints: bool = _help("keep a checkpoint at every epoch (needed for --resume)", True)
    save_model: bool = _help("save the fine-tuned model and tokenizer at the end", True)
    logging_steps: int = _help("log the training loss every N steps", 10)
    trust_remote_code: bool = _help("allow model code from the hub (off: only transformers' own code runs)", False)
    # -- logging, the Trainer's other settings, publishing (docs/ecosystem.md) --
    report_to: str = _help("logging integrations, comma-separated: none, tensorboard, wandb, mlflow, ... "
                           "(each gets the stage with every training log)", "none")
    training_args: Optional[dict] = _help("any other transformers TrainingArguments field: a YAML mapping, or "
                                          "--training-args.NAME VALUE (fp16, lr_scheduler_type, eval_strategy, ...)")
    early_stopping_patience: Optional[int] = _help("stop after this many evaluations without a better score "
                                                   "(transformers' EarlyStoppingCallback; keeps the best model)")
    early_stopping_threshold: float = _help("early stopping: the least improvement that counts", 0.0)
    merge_lora: bool = _help("lora: save the LoRA update folded into the base weights (a plain transformers model)",
                             False)
    push_to_hub: bool = _help("upload the model, its card (README.md) and results.json to the Hugging Face hub", False)
    hub_model_id: Optional[str] = _help("hub repository for --push-to-hub (default: the output folder's name)")
    hub_private: bool = _help("--push-to-hub: create the repository private", False)

    def __post_init__(self) -> None:
        # the preset's settings under the keys given explicitly (a key left None is not given)
        for key, value in get_preset(self.preset).settings().items():
            if getattr(self, key) is None:
                # a preset's cache stays None, "where it can": unlike an explicit --cache-frozen, it never
                # refuses a model, a method or a process layout the cache does not support
                setattr(self, key, None if key == "cache_frozen" and value else value)

    def validate(self) -> None:
        from progtuning.runs.validation import validate_values

        validate_values(self)
        self.method_config()  # the method's own checks (lora_r, adapter_type, peft_config_path, ...)
        if self.variant is not None and not self.variant.replace("-", "").replace("_", "").isalnum():
            raise ProgtuningError(f"variant {self.variant!r} must be letters, digits, - or _: it names the run's mode")
        if self.variant_baseline and not self.variant:
            raise ProgtuningError("variant_baseline needs a variant name: the run's mode is base-<variant>")
        if self.compare_with is not None and not re.fullmatch(r"base(-[A-Za-z0-9_-]+)?", self.compare_with):
            raise ProgtuningError(f"compare_with {self.compare_with!r} names no baseline: use base or base-<variant>")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ProgtuningError(f"unknown lr_schedule {self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")

    def method_config(self) -> MethodConfig:
        """The method and its settings, as :func:`~progtuning.methods.api.apply_method` takes them."""
        return MethodConfig.from_settings(self.method, self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML config (optional), apply overrides, coerce types and validate.

    ``defaults``: a command's own defaults, under the YAML and the overrides (the probe trains the
    embeddings unless told otherwise)."""
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        values.update(read_yaml(path))
    for key, value in (overrides or {}).items():
        if key in NESTED and isinstance(value, dict) and isinstance(values.get(key), dict):
            value = {**values[key], **value}  # --training-args.X adds to the YAML's mapping
        values[key] = value
    renamed = sorted(k for k in values if k in RENAMED_KEYS)
    if renamed:
        raise ProgtuningError(f"config key {renamed[0]} is now called {RENAMED_KEYS[renamed[0]]}: rename it")
    unknown = sorted(set(values) - set(FIELDS), key=str)
    if unknown:
        raise ProgtuningError(unknown_keys_message([str(k) for k in unknown], path))
    config = TrainConfig(**{key: coerce(key, value) for key, value in values.items()})
    config.validate()
    return config


def unknown_keys_message(keys: list[str], path: str | Path | None = None) -> str:
    """One line naming unknown keys and, for the first, the closest known one."""
    from progtuning.runs.validation import did_you_mean

    where = f" in {path}" if path is not None else ""
    hint = (f" (did you mean {_NAMES_ELSEWHERE[keys[0]]}?)" if keys[0] in _NAMES_ELSEWHERE
            else did_you_mean(keys[0], FIELDS))
    return f"unknown config key(s) {', '.join(keys)}{where}{hint}: see `progtuning train --help` for the valid keys"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ProgtuningError(f"cannot read config {path}: {error.strerror}; check the path")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0]
        raise ProgtuningError(f"config {path} is not valid (safe) YAML: {first}; fix the file (Python tags are refused)")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProgtuningError(f"config {path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or explain what was expected."""
    if key not in FIELDS:
        raise ProgtuningError(unknown_keys_message([key]))
    hint = _TYPES[key]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    base = typing.get_origin(base) or base  # list[str] -> list
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ProgtuningError(f"config key {key} needs a value")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return bool(value)
        if base in (int, float) and isinstance(value, bool):
            raise ValueError  # YAML `epochs: yes` is a mistake, not 1
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                value = value.strip()
                number = float(value)  # "1e3" and "4.0" are integers too; "nan" is not
                if not number.is_integer():
                    raise ValueError
                return int(value) if value.lstrip("+-").isdigit() else int(number)
            return int(value)
        if base is float:
            return float(value)
        if base is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return value
        if base is list:
            if isinstance(value, str):
                value = yaml.safe_load(value)
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise ProgtuningError(f"config key {key} expects {getattr(base, '__name__', base)}, got {value!r}")


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``['--epochs', '4', '--no-progtuning', '--overwrite']`` → ``{'epochs': '4', 'progtuning': False, ...}``.

    A key that is not a config key is refused at once, naming the closest known key: guessing
    whether it takes a value would misread the rest of the line (``--fp16 --epochs 1``).
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ProgtuningError(f"unexpected argument {token!r}: overrides look like --key value "
                                  "(the config file, if any, comes first)")
        key, has_value, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if key.split(".", 1)[0] in NESTED and "." in key:
            i += _nested_override(overrides, key, value if has_value else None, tokens[i + 1 : i + 2])
            continue
        negated = key.startswith("no_") and key[3:] in FIELDS and _is_bool(key[3:])
        if key not in FIELDS and not negated:
            raise ProgtuningError(unknown_flag_message(key))
        if has_value:
            if negated:
                raise ProgtuningError(f"--{key.replace('_', '-')} takes no value: drop '={value}'")
            overrides[key] = value
            i += 1
        elif negated:
            overrides[key[3:]] = False
            i += 1
        elif _is_bool(key) and (i + 1 == len(tokens) or tokens[i + 1].startswith("--")):
            overrides[key] = True
            i += 1
        else:
            if i + 1 == len(tokens) or (tokens[i + 1].startswith("--") and not _is_number(tokens[i + 1])):
                raise ProgtuningError(f"--{key.replace('_', '-')} needs a value")
            overrides[key] = tokens[i + 1]
            i += 2
    return overrides


# Names other tools use (the HF Trainer's arguments, run_glue's) for what progtuning calls otherwise.
_NAMES_ELSEWHERE = {
    "lr": "learning_rate", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "model_name_or_path": "model", "max_seq_length": "max_length", "overwrite_output_dir": "overwrite",
    "resume_from_checkpoint": "resume", "task_name": "task",
}
# TrainingArguments fields people often pass as top-level flags: they go through --training-args.NAME
# (runs/training_args.py checks them against TrainingArguments when the run starts).
_TRAINING_ARGS_FIELDS = {"fp16", "bf16", "warmup_steps", "lr_scheduler_type", "optim", "eval_strategy", "eval_steps",
                         "save_strategy", "save_steps", "load_best_model_at_end", "metric_for_best_model",
                         "torch_compile", "tf32", "label_smoothing_factor"}
_NOT_OFFERED = {"deepspeed": "DeepSpeed"}


def unknown_flag_message(key: str) -> str:
    """``unknown key --fp16 (...): ...`` with the closest known key, or what progtuning offers instead."""
    from progtuning.runs.validation import did_you_mean

    flag = "--" + key.replace("_", "-")
    if key in _NAMES_ELSEWHERE:
        hint = f" (did you mean --{_NAMES_ELSEWHERE[key].replace('_', '-')}?)"
    elif key in _TRAINING_ARGS_FIELDS:
        extra = " or --warmup-ratio" if key == "warmup_steps" else ""
        hint = f" (a TrainingArguments field: pass it as --training-args.{key}{extra})"
    elif key in _NOT_OFFERED:
        hint = f" (progtuning train has no {_NOT_OFFERED[key]} option)"
    else:
        flags = [f"--{name.replace('_', '-')}" for name in FIELDS]
        flags += [f"--no-{name.replace('_', '-')}" for name in FIELDS if _is_bool(name)]
        hint = did_you_mean(flag, flags)
    return f"unknown key {flag}{hint}: see `progtuning train --help` for the valid keys"


def _is_bool(key: str) -> bool:
    return _TYPES[key] in (bool, Optional[bool])


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# Keys whose value is a mapping, also set one entry at a time: --training-args.fp16 true
NESTED = ("training_args",)


def _nested_override(overrides: dict, key: str, value: str | None, following: list[str]) -> int:
    """``--training-args.NAME [VALUE]`` into ``overrides["training_args"]``; returns the tokens it used.

    Without a value (the next token is another option, or none follows) it is a flag: ``true``. The
    names and values are checked against ``TrainingArguments`` when the run starts.
    """
    outer, name = key.split(".", 1)
    if not name:
        raise ProgtuningError(f"--{outer.replace('_', '-')}.NAME needs a field name, e.g. --training-args.fp16")
    used = 1
    if value is None:
        if following and not following[0].startswith("--"):
            value, used = following[0], 2
        else:
            value = "true"
    overrides.setdefault(outer, {})[name] = value
    return used


def config_help() -> str:
    """One line per key, for ``--help``."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  --{f.name.replace('_', '-'):<28} {f.metadata.get('help', '')} [{default}]")
    return "\n".join(lines)
