"""What a run leaves on disk: the file names of a run folder and the schema of ``results.json``.

Every module that writes or reads a run folder (train, sweep, probe, report) takes the names from
here. A run folder (``OUTPUT_DIR``) holds::

    results.json      the run's results (written last, atomically: a folder with it is finished)
    README.md         the model card (base model, task, method, schedule, scores, the command)
    model/            what the method trained + progtuning_method.json + progtuning_task.json + the tokenizer
    checkpoints/      checkpoint-N/ folders (``--resume`` continues from the newest)
    prefix_cache/     the frozen-prefix cache's memory-mapped states (``--cache-frozen``)
    config.yaml       a sweep or probe run: the resolved config that re-runs it
    train.log         a sweep or probe run: its output

``results.json`` is one :class:`Results` mapping. Its ``mode`` says what the run compares: the
method, whether Progtuning was on, the schedule and, in a sweep, the variant name, with a
``label`` (``base``, ``prog``, ``prog-<variant>``, or ``base-<variant>`` for a sweep's cheap
baseline such as frozen embeddings) that reports group by, whether the run is a ``baseline``, and
which baseline it is ``compared_with`` (``base`` unless the sweep named another). Results written
before ``mode`` existed get it from :func:`mode_of_legacy_run` when read (:func:`read_results`),
and a ``mode`` without the last two keys gets them from its label.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, TypedDict

RESULTS_FILE = "results.json"
MODEL_CARD_FILE = "README.md"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
PREFIX_CACHE_DIR = "prefix_cache"
CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
# a probe folder (progtuning probe) and a sweep folder's own state
PROBE_FILE = "probe.json"
PROBE_PLOT = "probe.png"
SWEEP_DIR = "_sweep"

SCHEMA_VERSION = 2  # 2: "mode" and "schema" added; 1 (no "schema" key): the first layout


class Mode(TypedDict):
    """What a run is, for grouping and comparing runs."""

    label: str  # "base", "prog", "prog-<variant>", or "base-<variant>" (a baseline variant)
    method: str  # full, lora, adapter, bitfit, peft
    progtuning: bool  # False: the baseline (one all-trainable stage, measured the same way)
    schedule: str  # "none" (baseline), "progressive" (the paper's preset), "explicit" (stage_blocks) or "contribution"
    embeddings: str  # the embedding policy (always, first_stage, never)
    variant: str | None  # a sweep's variant name (a named schedule change), else None
    baseline: bool  # a baseline (plain, or a cheap one such as frozen embeddings), not a Progtuning arm
    compared_with: str | None  # the label of the baseline reports compare it with (None: the plain baseline itself)


class Results(TypedDict, total=False):
    """The keys of ``results.json`` (``progtuning train`` writes all of them)."""

    schema: int  # SCHEMA_VERSION
    mode: Mode
    config: dict  # the resolved TrainConfig
    versions: dict  # library versions
    seed: int
    task: dict  # Task.summary(): name, kind, main_metric, num_labels, sizes per split
    model: dict  # name, path, num_blocks, total_params, method_trainable_params
    schedule: dict  # Schedule.to_dict()
    planned_stage_starts: list | None  # optimizer step at which each stage starts (None: contribution schedule)
    stages: list  # per stage as it ran: steps, trainable params, blocks, loss, time, memory
    steps: int
    steps_per_epoch: int
    train_loss: float
    metrics: dict  # split -> {metric: value}
    main_metric: str
    validation_score: float | None  # main_metric on validation
    test_score: float | None  # main_metric on test (scored once, never used to select)
    updated_params: int  # parameter-epochs with Progtuning
    baseline_updated_params: int  # ... without it
    reduction: float
    reduction_blocks_only: float
    accounting: dict  # Accounting.to_dict()
    prefix_cache: dict  # per-stage cache records, hits, misses
    train_time_s: float  # the Trainer's loop, per-epoch validation included
    per_example: dict  # split -> {"labels": [...], "outputs": [...]} (logits, or scores for regression); QA: {}
    validation_curve: list  # [{epoch, step, train_time_s, score}] after each epoch; train_time_s excludes evaluation
    wall_time_s: float  # the whole run
    peak_rss_mb: float  # the process's peak resident memory
    log_history: list  # the Trainer's log
    resumed_from_step: int | None  # the step a resumed run continued from (None: one uninterrupted run)
    warnings: list  # one-line notes shown during the run (skipped rows, ignored remote code, ...)
    fsdp: dict  # FSDP runs only: per stage, bytes communicated per step and each rank's state
    contribution: dict  # contribution-schedule runs only: policy, decision log, realised stages, target vs realised


RESULTS_KEYS: tuple[str, ...] = tuple(Results.__annotations__)
OPTIONAL_KEYS: tuple[str, ...] = ("fsdp", "contribution")  # written only by the runs they describe

_LABEL = re.compile(r"^(base|prog)(-[A-Za-z0-9_-]+)?$")


def run_mode(config: dict) -> Mode:
    """The mode of a run from its resolved config (a ``TrainConfig.to_dict()``)."""
    progtuning = bool(config.get("progtuning", True))
    variant = config.get("variant")
    if not progtuning:
        schedule = "none"
    else:
        schedule = "explicit" if config.get("stage_blocks") else "progressive"
        if config.get("schedule", "fixed") == "contribution":
            schedule = "contribution"
    label = mode_label(config)
    baseline = is_baseline_label(label)
    return {
        "label": label,
        "method": str(config.get("method", "full")),
        "progtuning": progtuning,
        "schedule": schedule,
        "embeddings": str(config.get("embeddings", "always")),
        "variant": variant,
        "baseline": baseline,
        "compared_with": None if label == "base" else "base" if baseline else (config.get("compare_with") or "base"),
    }


def is_baseline_label(label: str) -> bool:
    """``base`` and ``base-<variant>`` are baselines; ``prog...`` are Progtuning arms."""
    return label == "base" or label.startswith("base-")


def mode_label(config: dict) -> str:
    """``base``; ``prog-<variant>`` (``base-<variant>`` for a baseline variant) in a sweep; else ``prog``
    plus what differs from the paper's preset."""
    if not config.get("progtuning", True):
        return "base"
    if config.get("variant") and config.get("variant_baseline"):
        return f"base-{config['variant']}"
    if config.get("variant"):
        return f"prog-{config['variant']}"
    label = "prog"
    if config.get("schedule", "fixed") == "contribution":
        label += "-contribution"
        if config.get("target_reduction") is not None:
            label += f"-r{config['target_reduction']:g}"
    if config.get("stage_blocks"):
        label += "-explicit"
    if config.get("embeddings", "always") != "always":
        label += f"-emb-{config['embeddings']}"
    if config.get("stages"):
        label += f"-T{config['stages']}"
    if config.get("stage_unit", "epoch") != "epoch":
        label += f"-{config['stage_unit']}"
    return label


def mode_of_legacy_run(path: str | Path, config: dict) -> str:
    """The label of a results.json without ``mode``: its sweep folder name, else derived from the config.

    Sweeps put a run in ``.../<base|prog[-variant]>/seed<k>/results.json``; that folder name was
    the only record of a variant before ``mode`` was written.
    """
    parent = Path(path).parent
    for name in (parent.parent.name, parent.name):
        if _LABEL.match(name):
            return name
    return mode_label(config)


def read_results(path: str | Path) -> dict:
    """A results.json, with ``mode`` filled in for files written before it existed."""
    path = Path(path)
    results = json.loads(path.read_text())
    if "mode" not in results:
        config = results.get("config", {})
        results["mode"] = {**run_mode(config), "label": mode_of_legacy_run(path, config)}
    mode = results["mode"]
    if "baseline" not in mode:  # written before baseline variants existed: the label says it
        mode["baseline"] = is_baseline_label(mode["label"])
        mode["compared_with"] = None if mode["label"] == "base" else "base"
    return results


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON so that a reader (or a crash) never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; a results file is for everyone to read
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk leaves no temporary file behind
        raise


def _json_default(value: Any):
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
