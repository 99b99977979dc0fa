"""A ``--resume`` continues the same run: the config is compared with the checkpoint's, key by key.

Every checkpoint holds ``progtuning_config.json``: the run's config (paths made absolute) and the
sha256 of each data file it read. On ``--resume`` (:func:`check_resume`, before anything heavy
loads) the newest intact checkpoint is chosen (:mod:`progtuning.runs.integrity`) and any key that
would change what is trained is refused in one line naming the keys, old and new values. Only the
keys in :data:`HARMLESS` may change; they change how the run is watched or kept, not what it
computes (``threads`` may change float rounding, never the hyperparameters). Data files are
compared by content: a file moved elsewhere is fine, a file edited in place is not.

A checkpoint without the file (the plain Trainer's, or an older progtuning's) is resumed without
this comparison; its model and schedule are still checked
(:func:`~progtuning.runs.checkpoints.check_checkpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from progtuning.errors import ProgtuningError

RUN_CONFIG = "progtuning_config.json"
FORMAT = "progtuning-config-1"
CHECKPOINTS = "checkpoints"

# Keys a resume may change (documented in docs/resume.md): evaluation batch size, logging, CPU threads,
# and where/whether things are written. Everything else changes what the run computes.
HARMLESS = frozenset({
    "eval_batch_size", "logging_steps", "threads", "output_dir", "overwrite", "resume", "save_checkpoints",
    "save_model", "cache_budget_mb",
})
DATA_FILES = ("train_file", "validation_file", "test_file", "peft_config")  # compared by content
FOLDERS = ("data_dir",)  # compared as absolute paths


def config_record(config: Any) -> dict:
    """What a checkpoint keeps of the run's config (see the module docstring)."""
    from progtuning.runs.integrity import sha256_file

    values = config.to_dict()
    for key in (*DATA_FILES, *FOLDERS):
        if values.get(key):
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    if Path(str(values["model"])).expanduser().is_dir():
        values["model"] = os.path.abspath(os.path.expanduser(values["model"]))
    hashes = {key: sha256_file(values[key]) for key in DATA_FILES if values.get(key) and os.path.isfile(values[key])}
    return {"format": FORMAT, "config": values, "data_sha256": hashes}


def write_config_record(folder: str | Path, record: dict) -> None:
    with open(Path(folder) / RUN_CONFIG, "w") as f:
        json.dump(record, f, indent=2)


def read_config_record(checkpoint: str | Path) -> dict | None:
    path = Path(checkpoint) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ProgtuningError(f"checkpoint {checkpoint} is corrupt ({RUN_CONFIG}: {error}): delete it to resume from "
                              "the one before, or start again with --overwrite")
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("config"), dict):
        raise ProgtuningError(f"checkpoint {checkpoint} is corrupt ({RUN_CONFIG} is not a {FORMAT} file): delete it "
                              "to resume from the one before, or start again with --overwrite")
    return record


def changed_keys(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this run's value)`` for each key that changes the run."""
    from progtuning.runs.config import FIELDS

    old_config, new_config = saved["config"], current["config"]
    changes = []
    for key in FIELDS:
        if key in HARMLESS or key in DATA_FILES and key in saved.get("data_sha256", {}):
            continue
        default = FIELDS[key].default
        old, new = old_config.get(key, default), new_config.get(key)
        if old != new:
            changes.append((key, old, new))
    for key, digest in saved.get("data_sha256", {}).items():
        if current["data_sha256"].get(key) != digest:
            changes.append((key, "its content then", "other content" if new_config.get(key) else None))
    return changes


def check_resume(config: Any) -> str:
    """The checkpoint this ``--resume`` continues from, or a one-line refusal (see the module docstring)."""
    from progtuning.runs.integrity import select_checkpoint

    run_dir = Path(config.output_dir).expanduser() / CHECKPOINTS
    if not run_dir.is_dir():
        raise ProgtuningError(f"--resume found no checkpoint in {run_dir}: run without --resume")
    checkpoint = select_checkpoint(run_dir)
    saved = read_config_record(checkpoint)
    if saved is None:
        return str(checkpoint)
    changes = changed_keys(saved, config_record(config))
    if changes:
        listed = ", ".join(f"{key} ({_show(old)} -> {_show(new)})" for key, old, new in changes)
        raise ProgtuningError(
            f"--resume refused: {listed} differ from {checkpoint.name}'s config, which would change the run; resume "
            "with the checkpoint's values, or start a new run (--overwrite or another --output-dir)"
        )
    return str(checkpoint)


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
