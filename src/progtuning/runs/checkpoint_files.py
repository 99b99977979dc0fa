"""A run's checkpoint folder on disk: names, atomic commits, rotation, and optimizer/RNG state without pickle.

``OUTPUT/checkpoints/`` holds ``checkpoint-N`` folders. One is written as
``.partial-checkpoint-N`` and renamed into place when complete (:func:`commit`); old ones go by
rename to ``.deleting-checkpoint-N`` first, then deletion (:func:`rotate_checkpoints`), so a kill at
any moment leaves only whole ``checkpoint-N`` folders; :func:`clean_partial_checkpoints` removes
what a killed run left. Optimizer, scheduler and RNG states are ``NAME.safetensors`` (every tensor)
+ ``NAME.json`` (the structure around them): :func:`save_state` / :func:`load_state`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PREFIX = "checkpoint"
PARTIAL_PREFIX = ".partial-"  # .partial-checkpoint-12: being written (never resumed from)
DELETING_PREFIX = ".deleting-"  # .deleting-checkpoint-4: being rotated out
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
STATE_FORMAT = "progtuning-state-1"


def save_state(obj: Any, folder: str | Path, name: str) -> None:
    """Write a state dict as ``name.safetensors`` (its tensors) + ``name.json`` (everything around them).

    Handles what optimizer, scheduler and RNG states hold: dicts (any key type), lists, tuples,
    tensors, numpy arrays and scalars, numbers, strings, booleans and None. Floats round-trip
    exactly (JSON keeps ``repr``), so a resume from these files is bit-identical.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().to("cpu").contiguous()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{name}: cannot store a {type(value).__name__} without pickle")

    structure = encode(obj)
    folder = Path(folder)
    save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"format": STATE_FORMAT})
    with open(folder / f"{name}.json", "w") as f:
        json.dump({"format": STATE_FORMAT, "state": structure}, f)


def load_state(folder: str | Path, name: str, device: str | torch.device = "cpu") -> Any:
    """Read what :func:`save_state` wrote (no pickle involved)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    with open(folder / f"{name}.json") as f:
        document = json.load(f)
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f"{name}.json is not a {STATE_FORMAT} file")
    tensors = load_file(str(folder / f"{name}.safetensors"), device=str(device))

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            if "__ndarray__" in value:
                return np.asarray(value["__ndarray__"], dtype=value["dtype"])
            if "__tuple__" in value:
                return tuple(decode(v) for v in value["__tuple__"])
            if "__dict__" in value:
                return {decode(k): decode(v) for k, v in value["__dict__"]}
            raise ValueError(f"{name}.json: unknown entry {sorted(value)}")
        return value

    return decode(document["state"])


def commit(written: str, final: str) -> None:
    """Move a finished checkpoint into place; an older folder of the same name goes only after."""
    old = None
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), DELETING_PREFIX + os.path.basename(final))
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(written, final)
    _fsync_dir(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rotate_checkpoints(run_dir: str, limit: int | None, best: str | None = None) -> list[str]:
    """Keep the newest ``limit`` checkpoints (and ``best``); each one goes by rename first, then deletion."""
    if not limit or limit <= 0:
        return []
    found = sorted((step, path) for step, path in list_checkpoints(run_dir))
    keep = {found[-1][1]} if found else set()
    if best:
        keep.add(os.path.abspath(best))
    removed = []
    surplus = len(found) - max(limit, len(keep))
    for _, path in found:
        if surplus <= 0:
            break
        if os.path.abspath(path) in {os.path.abspath(k) for k in keep}:
            continue
        trash = os.path.join(run_dir, DELETING_PREFIX + os.path.basename(path))
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
        surplus -= 1
    return removed


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(run_dir):
        return []
    found = []
    for entry in os.listdir(run_dir):
        match = _CHECKPOINT_RE.match(entry)
        if match and os.path.isdir(os.path.join(run_dir, entry)):
            found.append((int(match.group(1)), os.path.join(run_dir, entry)))
    return found


def last_checkpoint(run_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``run_dir`` (partial folders are never candidates)."""
    found = list_checkpoints(str(run_dir))
    return max(found)[1] if found else None


def clean_partial_checkpoints(run_dir: str | Path) -> list[str]:
    """Delete what a killed run left half-written or half-deleted; returns the removed paths."""
    removed = []
    if not os.path.isdir(run_dir):
        return removed
    for entry in os.listdir(run_dir):
        if entry.startswith((PARTIAL_PREFIX, DELETING_PREFIX)):
            path = os.path.join(run_dir, entry)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def replace_pickled_training_args(folder: str, args) -> None:
    """Write ``training_args.json`` instead of the Trainer's ``training_args.bin``.

    That file is a pickle of the whole ``TrainingArguments`` object: nothing here reads it back, and
    a model or checkpoint folder free of pickles is easier to trust. The JSON says the same.
    """
    pickled = os.path.join(folder, "training_args.bin")
    if os.path.exists(pickled):
        os.remove(pickled)
    with open(os.path.join(folder, "training_args.json"), "w") as f:
        f.write(args.to_json_string())


def fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)
