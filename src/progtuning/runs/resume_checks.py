"""Checks before a resume: refuse, with one line, a checkpoint that is incomplete, corrupt, unsafe or made for something else.

:func:`check_checkpoint` reads a checkpoint's headers before anything loads it: a truncated or
garbled file, a checkpoint of another model or schedule, or a pickle holding anything but tensors
and numbers (which could run code) is refused with one line. A pickle-based file (in a checkpoint
written by the plain Trainer) is only opened with ``torch.load(weights_only=True)``, as the Trainer
does itself; ``training_args.bin`` is never read. The model/schedule comparison is the callback's
own (:func:`~progtuning.core.callback.check_resume_entry`), so both refuse the same checkpoints.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from progtuning.core.callback import STATE_KEY, check_resume_entry
from progtuning.core.sharded_checkpoint import check_sharded
from progtuning.errors import ProgtuningError
from progtuning.runs.checkpoint_files import STATE_FORMAT, TRAINER_STATE
from progtuning.runs.sharded_trainer import SHARDED

# Files the plain Trainer writes with torch.save and reads back on resume (with weights_only=True).
PICKLED_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "pytorch_model.bin", "adapter_model.bin")


def check_checkpoint(path: str | Path, model: torch.nn.Module | None = None, schedule=None,
                     block_paths: list[str] | None = None) -> dict:
    """Refuse, with one line, a checkpoint that is incomplete, corrupt, unsafe or made for something else.

    Reads only headers and JSON, plus the pickle-based optimizer/scheduler/RNG files with
    ``torch.load(weights_only=True)`` (memory-mapped where possible). Returns the trainer state.
    """
    path = Path(path)
    fix = f"delete {path} to resume from the checkpoint before it, or start again with --overwrite"
    state = _read_trainer_state(path, fix)
    saved = (state.get("stateful_callbacks") or {}).get(STATE_KEY)
    check_resume_entry(saved, schedule, block_paths, f"checkpoint {path}")
    sharded = (path / SHARDED).is_dir()  # FSDP: model and optimizer as shards (checked there, headers only)
    if sharded:
        check_sharded(path / SHARDED, model, fix)
    weights = [p for p in ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
                           "pytorch_model.bin", "adapter_model.bin") if (path / p).exists()]
    if not weights and not sharded:
        raise ProgtuningError(f"checkpoint {path} has no model weights (model.safetensors): {fix}")
    for required in ("scheduler",) if sharded else ("optimizer", "scheduler"):
        if not (path / f"{required}.json").exists() and not (path / f"{required}.pt").exists():
            raise ProgtuningError(f"checkpoint {path} lacks {required}.json, so the run cannot resume exactly: {fix}")
    if not any(path.glob("rng_state*.json")) and not any(path.glob("rng_state*.pth")):
        raise ProgtuningError(f"checkpoint {path} lacks its RNG state (rng_state.json): {fix}")
    for state in sorted(path.glob("*.json")):
        if state.stem in ("optimizer", "scheduler") or state.stem.startswith("rng_state"):
            _check_state_files(path, state.stem, fix)
    for name in sorted({*PICKLED_STATE, *(p.name for p in path.glob("rng_state*.pth"))}):
        if (path / name).exists():
            _check_pickle(path / name, fix)
    if model is not None and not sharded:
        _check_weights_fit(path, model, fix)
    return state


def _read_trainer_state(path: Path, fix: str) -> dict:
    file = path / TRAINER_STATE
    if not file.is_file():
        raise ProgtuningError(f"checkpoint {path} has no {TRAINER_STATE} (an incomplete checkpoint): {fix}")
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ProgtuningError(f"checkpoint {path} is corrupt ({TRAINER_STATE}: {_first_line(error)}): {fix}")
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ProgtuningError(f"checkpoint {path} is corrupt ({TRAINER_STATE} has no global_step): {fix}")
    return state


def _check_state_files(path: Path, name: str, fix: str) -> None:
    """A :func:`save_state` pair: the JSON parses, the safetensors header is whole and has every tensor named."""
    from safetensors import safe_open

    try:
        document = json.loads((path / f"{name}.json").read_text())
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        wanted = set(re.findall(r'"__tensor__": "(\d+)"', json.dumps(document["state"])))
        file = path / f"{name}.safetensors"
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())
        _check_safetensors_size(file, file.stat().st_size)
        if wanted - present:
            raise ValueError(f"{len(wanted - present)} tensors missing from {name}.safetensors")
    except Exception as error:
        raise ProgtuningError(f"checkpoint file {path / name}.json/.safetensors is corrupt "
                              f"({_first_line(error)[:160]}): {fix}")


def _check_pickle(file: Path, fix: str) -> None:
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(error))
        what = (f"it would call {found.group(1)}" if found
                else detail.group(1).strip()[:80] if detail else _first_line(error)[:80])
        raise ProgtuningError(
            f"refused {file}: a pickle holding more than tensors and numbers ({what}), which could run code; "
            f"progtuning only loads pickles with torch.load(weights_only=True). Load only checkpoints you made: {fix}"
        )
    except Exception as error:  # truncated zip, bad magic number, ...
        raise ProgtuningError(f"checkpoint file {file} is corrupt ({_first_line(error)[:160]}): {fix}")


def _check_weights_fit(path: Path, model: torch.nn.Module, fix: str) -> None:
    expected = _expected_shapes(path, model)
    found = _saved_shapes(path, fix)
    if found is None or expected is None:
        return
    unknown = [k for k in found if k not in expected]
    wrong = [k for k in found if k in expected and tuple(found[k]) != tuple(expected[k])]
    if unknown or wrong or not found:
        example = (
            f"{wrong[0]} is {list(found[wrong[0]])} in the checkpoint, {list(expected[wrong[0]])} in the model" if wrong
            else f"{unknown[0]} is not in the model" if unknown else "it holds no tensor"
        )
        raise ProgtuningError(
            f"checkpoint {path} was made with another model ({len(unknown) + len(wrong)} tensors do not fit: "
            f"{example}): resume with the same model, method and labels, or start a new run"
        )


def _expected_shapes(path: Path, model: torch.nn.Module) -> dict[str, tuple] | None:
    if (path / "adapter_model.safetensors").exists():
        try:
            from peft import get_peft_model_state_dict
        except ImportError:
            return None
        if not hasattr(model, "peft_config"):
            return {}
        return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _saved_shapes(path: Path, fix: str) -> dict[str, tuple] | None:
    from safetensors import safe_open

    if (path / "model.safetensors.index.json").exists():
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ProgtuningError(f"checkpoint {path} is corrupt (model.safetensors.index.json: {_first_line(error)}): {fix}")
    else:
        files = [f for f in ("model.safetensors", "adapter_model.safetensors") if (path / f).exists()]
    if not files:
        return None  # pickle-based weights: checked by _check_pickle, shapes by the loader
    shapes: dict[str, tuple] = {}
    for name in files:
        file = path / name
        try:
            size = file.stat().st_size
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    slice_ = f.get_slice(key)
                    shapes[key] = tuple(slice_.get_shape())
            _check_safetensors_size(file, size)
        except ProgtuningError:
            raise
        except Exception as error:
            raise ProgtuningError(f"checkpoint file {file} is corrupt ({_first_line(error)[:160]}): {fix}")
    return shapes


def _check_safetensors_size(file: Path, size: int) -> None:
    # The header says where the last tensor ends; a file cut short (killed mid-write, copied halfway) is refused.
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{size} bytes, the header needs {8 + header_len + end}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
