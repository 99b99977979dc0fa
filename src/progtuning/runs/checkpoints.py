"""Crash safety for a Trainer run: atomic checkpoints, checks before a resume, clean stops.

* :class:`ProgtuningTrainer` is the HF ``Trainer`` that ``progtuning train`` runs. It writes every
  checkpoint into ``OUTPUT/checkpoints/.partial-checkpoint-N/`` and renames it to
  ``checkpoint-N`` only once every file (all ranks' files) is on disk, so a kill at any moment
  leaves the last complete checkpoint as the newest ``checkpoint-N``; old checkpoints are rotated
  out only after that rename. It also refuses to commit a checkpoint whose weights are not
  finite. Nothing in its checkpoints is a pickle: the optimizer, scheduler and RNG states are
  written as ``NAME.safetensors`` (every tensor) + ``NAME.json`` (the structure around them, see
  :func:`save_state`), and ``training_args.json`` replaces the Trainer's ``training_args.bin``.
  The heads progtuning trains (classification, regression, QA) average their loss over the
  batch; transformers 5 treats a model whose ``forward`` takes ``**kwargs`` as one that sums
  it, which skips the division by the gradient-accumulation steps and multiplies the loss by
  the number of processes (measured: 5.6e-4 off the same global batch without accumulation).
  ``batch_mean_loss=True`` (the default) turns that off.
* :func:`check_checkpoint` reads a checkpoint's headers before anything loads it: a truncated or
  garbled file, a checkpoint of another model, or a pickle holding anything but tensors and
  numbers (which could run code) is refused with one line. A pickle-based file (in a checkpoint
  written by the plain Trainer) is only opened with ``torch.load(weights_only=True)``, as the
  Trainer does itself; ``training_args.bin`` is never read.
* :class:`StopOnSignal`: SIGTERM or Ctrl-C finishes the current optimizer step, saves a checkpoint
  and stops (all ranks agree on the step); ``train.py`` then says how to resume.
* :class:`StopOnNonFiniteLoss`: a NaN/inf training loss stops the run before the optimizer step,
  naming the step and the stage; nothing is saved, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from progtuning.core.sharded_checkpoint import check_sharded
from progtuning.errors import ProgtuningError
from progtuning.runs.sharded_trainer import SHARDED, ShardedTraining

logger = logging.getLogger("progtuning")

CHECKPOINT_PREFIX = "checkpoint"
PARTIAL_PREFIX = ".partial-"  # .partial-checkpoint-12: being written (never resumed from)
DELETING_PREFIX = ".deleting-"  # .deleting-checkpoint-4: being rotated out
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
# Files the plain Trainer writes with torch.save and reads back on resume (with weights_only=True).
PICKLED_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "pytorch_model.bin", "adapter_model.bin")
STATE_FORMAT = "progtuning-state-1"


class TrainingStopped(ProgtuningError):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signal_name: str, signum: int, step: int, stage: int | None, checkpoint: str | None):
        self.signal_name, self.signum, self.step, self.stage, self.checkpoint = signal_name, signum, step, stage, checkpoint
        self.exit_code = 128 + signum
        super().__init__(self.message())

    def message(self, resume_command: str | None = None) -> str:
        where = f"step {self.step}" + (f" (stage {self.stage})" if self.stage is not None else "")
        saved = f"checkpoint {self.checkpoint} saved" if self.checkpoint else "no checkpoint saved"
        how = f"resume with: {resume_command}" if resume_command else "resume with the same command plus --resume"
        return f"stopped by {self.signal_name} at {where}, {saved}: {how}"


class NonFiniteLoss(ProgtuningError):
    """The training loss (or the weights about to be saved) stopped being finite."""


# -------------------------------------------------------------------------------------------------
# the Trainer
# -------------------------------------------------------------------------------------------------
class ProgtuningTrainer(ShardedTraining, Trainer):
    """``transformers.Trainer`` with atomic checkpoints and batch-mean loss scaling (see the module docstring).

    A model sharded by FSDP2 before the Trainer was built gets sharded checkpoints (:class:`ShardedTraining`).
    """

    def __init__(self, *args: Any, batch_mean_loss: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if batch_mean_loss:
            # The model's loss is a mean over its batch: divide by the accumulation steps, and let DDP
            # average over the ranks, exactly as for a model without **kwargs in its forward.
            self.model_accepts_loss_kwargs = False
        self._staging_root: str | None = None

    # -- optimizer, scheduler and RNG state as safetensors + JSON ------------------------------------
    def _plain_state(self) -> bool:
        """Plain (DDP or single) runs: their states are ordinary state dicts. Others keep the Trainer's files."""
        from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available()
                    or is_sagemaker_mp_enabled())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.sharded or not self._plain_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            try:
                save_state(self.optimizer.state_dict(), output_dir, "optimizer")
                save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")
            except TypeError as error:  # an exotic optimizer state: the Trainer's torch.save files instead
                logger.warning("optimizer state saved with torch.save (%s)", error)
                for name in ("optimizer", "scheduler"):
                    for suffix in (".json", ".safetensors"):
                        Path(output_dir, name + suffix).unlink(missing_ok=True)
                super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self.sharded or not self._plain_state() or not os.path.isfile(os.path.join(checkpoint, "optimizer.json")):
            return super()._load_optimizer_and_scheduler(checkpoint)  # sharded: ShardedTraining  # torch.save files, weights_only=True
        on_device = self.args.world_size > 1 and self.args.device.type != "cpu"  # as the Trainer does
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer", self.args.device if on_device else "cpu"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._plain_state() or _other_accelerator():
            return super()._save_rng_state(output_dir)
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all() if self._distributed() else torch.cuda.random.get_rng_state()
        os.makedirs(output_dir, exist_ok=True)  # a rank can get here before rank 0 created the folder
        save_state(states, output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not self._plain_state() or not os.path.isfile(os.path.join(checkpoint, self._rng_name() + ".json")):
            return super()._load_rng_state(checkpoint)
        states = load_state(checkpoint, self._rng_name())
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            from transformers.trainer_pt_utils import set_rng_state_for_device

            set_rng_state_for_device("CUDA", torch.cuda, states, self._distributed())

    def _distributed(self) -> bool:
        from transformers.training_args import ParallelMode

        return self.args.parallel_mode == ParallelMode.DISTRIBUTED

    # -- atomic checkpoints ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            replace_pickled_training_args(output_dir if output_dir is not None else self.args.output_dir, self.args)

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, PARTIAL_PREFIX + name)
        _check_finite_weights(self.model, self.state.global_step, run_dir)
        writer = self.args.should_save
        if writer and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while writing this very checkpoint
        _barrier()
        # The Trainer writes staging/checkpoint-N/ (every rank its RNG file), then rotates inside staging.
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        _barrier()  # every rank's files are written
        if writer:
            written = os.path.join(staging, name)
            if self.state.best_model_checkpoint == written:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(written, TRAINER_STATE))
            _fsync_tree(written)
            _commit(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        elif self.state.best_model_checkpoint == os.path.join(staging, name):
            self.state.best_model_checkpoint = final
        _barrier()  # nobody reads or resumes before the rename


def _other_accelerator() -> bool:
    """NPU/HPU/MLU/MUSA/XLA keep RNG states the Trainer knows how to save: leave those runs to it."""
    from transformers import utils

    names = ("is_torch_npu_available", "is_torch_hpu_available", "is_torch_mlu_available", "is_torch_musa_available",
             "is_torch_xla_available")
    return any(getattr(utils, name, lambda: False)() for name in names)


# -------------------------------------------------------------------------------------------------
# state without pickle
# -------------------------------------------------------------------------------------------------
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


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _commit(written: str, final: str) -> None:
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
    found = sorted((step, path) for step, path in _checkpoints(run_dir))
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


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
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
    found = _checkpoints(str(run_dir))
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


def _fsync_tree(folder: str) -> None:
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


def _check_finite_weights(model: torch.nn.Module, step: int, run_dir: str) -> None:
    bad = next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:
        last = last_checkpoint(run_dir)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise NonFiniteLoss(
            f"weight {bad} is not finite after step {step}: the checkpoint was not saved and training stopped; "
            f"{keep} (lower learning_rate or check the data, then resume)"
        )


# -------------------------------------------------------------------------------------------------
# checks before a resume
# -------------------------------------------------------------------------------------------------
def check_checkpoint(path: str | Path, model: torch.nn.Module | None = None, schedule=None,
                     block_paths: list[str] | None = None) -> dict:
    """Refuse, with one line, a checkpoint that is incomplete, corrupt, unsafe or made for something else.

    Reads only headers and JSON, plus the pickle-based optimizer/scheduler/RNG files with
    ``torch.load(weights_only=True)`` (memory-mapped where possible). Returns the trainer state.
    """
    path = Path(path)
    fix = f"delete {path} to resume from the checkpoint before it, or start again with --overwrite"
    state = _read_trainer_state(path, fix)
    _check_progtuning_entry(path, state, schedule, block_paths)
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


def _check_progtuning_entry(path: Path, state: dict, schedule, block_paths) -> None:
    from progtuning.core.callback import STATE_KEY

    saved = (state.get("stateful_callbacks") or {}).get(STATE_KEY)
    if not isinstance(saved, dict):
        return  # a checkpoint of a run without the callback: nothing to compare
    if block_paths is not None and saved.get("block_paths") != list(block_paths):
        raise ProgtuningError(
            f"checkpoint {path} was made with another model ({len(saved.get('block_paths') or [])} blocks, this "
            f"one has {len(block_paths)}): resume with the same model and method, or start a new run"
        )
    if schedule is not None and saved.get("schedule_fingerprint") != schedule.fingerprint():
        old = saved.get("schedule") or {}
        raise ProgtuningError(
            f"checkpoint {path} was made with another schedule ({old.get('name')}, {len(old.get('stages', []))} "
            f"stages; this run: {schedule.name}, {schedule.num_stages}): resume with the same schedule, or start a "
            "new run in a new output folder"
        )


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


# -------------------------------------------------------------------------------------------------
# clean stops
# -------------------------------------------------------------------------------------------------
class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT (Ctrl-C): finish the optimizer step, save a checkpoint, stop.

    The handlers are installed at ``on_train_begin`` (main thread only) and the previous ones come
    back at ``on_train_end``. A second Ctrl-C interrupts at once. With several processes the ranks
    all-reduce the flag after every step, so they all stop (and save) at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._at_epoch_end = False
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.stopped_at = None, None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "(Ctrl-C again to interrupt at once)", file=sys.stderr, flush=True)
        if signum == signal.SIGINT:
            previous = self._previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.received or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same step, or the others would wait forever in the next all-reduce
            device = args.device if "nccl" in str(torch.distributed.get_backend()) else "cpu"
            tensor = torch.tensor([flag], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = int(tensor.item())
            if flag and self.received is None:
                self.received = flag
        if flag:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            # At the end of an epoch the Trainer evaluates and then saves (on_epoch_end): keep that order, so
            # the checkpoint holds the same RNG state as an uninterrupted run's (evaluation draws from it).
            self._at_epoch_end = abs(state.epoch - round(state.epoch)) < 1e-9
            if not self._at_epoch_end:
                control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is None:
            return
        if self._at_epoch_end:
            control.should_save = True
        else:  # saved at the step's end already; no evaluation of a half epoch
            control.should_save = False
            control.should_evaluate = False

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise :class:`NonFiniteLoss` as soon as a training forward returns a NaN/inf loss.

    A forward hook on the model reads ``outputs.loss`` (the Trainer's logged mean hides NaNs, see
    ``logging_nan_inf_filter``); raising there stops the run before backward and the optimizer
    step, so no checkpoint of the broken state is written. ``progtuning`` is the
    :class:`~progtuning.core.callback.ProgtuningCallback` whose stage the message names. Costs one
    host-device sync per micro-batch.
    """

    def __init__(self, progtuning=None) -> None:
        self.progtuning = progtuning
        self._hook = None
        self._step = 0
        self._run_dir: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run_dir = args.output_dir
        self.close()
        if model is not None:
            self._hook = model.register_forward_hook(self._check)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the loss hook (``on_train_end`` does it; call it yourself if ``train()`` raised)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _check(self, module, inputs, output) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all()):
            return
        value = "nan" if bool(torch.isnan(loss.detach()).any()) else "inf"
        freezer = getattr(self.progtuning, "freezer", None)
        stage = f" (stage {freezer.stage_index})" if freezer is not None and freezer.stage_index is not None else ""
        last = last_checkpoint(self._run_dir) if self._run_dir else None
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLoss(
            f"the training loss is {value} at step {self._step + 1}{stage}: training stopped before the optimizer "
            f"step and nothing was saved; {keep} (lower learning_rate, or check the data, then resume)"
        )
