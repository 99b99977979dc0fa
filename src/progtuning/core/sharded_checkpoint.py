"""Sharded, pickle-free checkpoints of an FSDP2 model and its optimizer (``torch.distributed.checkpoint``).

Every rank writes its own shards; no rank ever holds the whole model or optimizer state::

    FOLDER/model/shard-0000R-model-00001-of-00001.safetensors       rank R-1's shard of every tensor
    FOLDER/optimizer/shard-0000R-model-00001-of-00001.safetensors   the optimizer's tensors, keyed by parameter name
    FOLDER/sharded.json                                             format, world size, every tensor's global
                                                                    shape, the optimizer's hyper-parameters

Why not DCP's default storage: its ``FileSystemReader`` unpickles the ``.metadata`` file, and its
default planner loads non-tensor entries with ``torch.load(weights_only=False)`` — a checkpoint
from elsewhere could run code on load. Here the tensors go through DCP's safetensors storage
(``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader``: each shard's offsets live in its
safetensors header, as JSON) and everything else is JSON. Loading reads headers, JSON and raw
tensor bytes only. (DCP's load planning exchanges plans between the running ranks with
``all_gather_object``; that is process-to-process traffic of this job, not data from disk.)

:func:`save_sharded` is atomic on its own: it writes into ``.partial-NAME`` beside ``FOLDER`` and
renames it once every rank's files and ``sharded.json`` are on disk. :func:`load_sharded` loads
into the model's (and optimizer's) current sharding, so another number of processes can load it
too; an exact resume still wants the same number (RNG states and data shards are per process).
:func:`check_sharded` refuses, in one line, a checkpoint that is incomplete, corrupt or made for
another model, before anything loads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from progtuning.errors import ProgtuningError

FORMAT = "progtuning-sharded-1"
INDEX = "sharded.json"
MODEL = "model"
OPTIMIZER = "optimizer"
PARTIAL_PREFIX = ".partial-"


# -------------------------------------------------------------------------------------------------
# save
# -------------------------------------------------------------------------------------------------
def save_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``model`` (and ``optimizer``) as a sharded checkpoint; every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    folder = Path(folder)
    staging = folder.parent / (PARTIAL_PREFIX + folder.name)
    writer = _rank() == 0
    if writer:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing it
        staging.mkdir(parents=True)
    _barrier()
    model_state = model.state_dict()
    dcp.save(model_state, storage_writer=HuggingFaceStorageWriter(str(staging / MODEL), save_distributed=True))
    index: dict[str, Any] = {"format": FORMAT, "world_size": _world_size(), "model": _describe(model_state)}
    if optimizer is not None:
        tensors, structure = _flatten_optimizer(model, optimizer)
        if tensors:
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(staging / OPTIMIZER), save_distributed=True))
        index["optimizer"] = structure
        index["optimizer_tensors"] = _describe(tensors)
    _barrier()  # every rank's shards are written (and fsynced by DCP)
    if writer:
        _write_json(staging / INDEX, index)
        _commit(staging, folder)
    _barrier()  # nobody reads before the rename
    return folder


def _describe(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {key: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")} for key, value in state.items()}


def _flatten_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's tensors keyed ``state.PARAM_NAME.KEY``, and everything else as JSON."""
    inner = _unwrap(optimizer)
    index_to_name = _index_to_name(model, inner)
    state_dict = inner.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {}
    for index, entry in state_dict["state"].items():
        name = index_to_name[index]
        described: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                dcp_key = f"state.{name}.{key}"
                tensors[dcp_key] = value
                described[key] = {"tensor": dcp_key, "sharded": _is_dtensor(value)}
            else:
                described[key] = {"value": _encode(value)}
        state[name] = described
    groups = []
    for group in state_dict["param_groups"]:
        encoded = {key: _encode(value) for key, value in group.items() if key != "params"}
        encoded["params"] = [index_to_name[i] for i in group["params"]]
        groups.append(encoded)
    return tensors, {"state": state, "param_groups": groups}


# -------------------------------------------------------------------------------------------------
# load
# -------------------------------------------------------------------------------------------------
def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load what :func:`save_sharded` wrote into ``model`` (and ``optimizer``), in place; returns the index."""
    index = load_sharded_model(folder, model)
    if optimizer is not None:
        load_sharded_optimizer(folder, model, optimizer)
    return index


def load_sharded_model(folder: str | Path, model: nn.Module) -> dict:
    """Load the model's shards into ``model`` in its current sharding; every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(folder)
    index = read_index(folder)
    targets = model.state_dict()
    if set(targets) != set(index["model"]):
        raise ProgtuningError(f"sharded checkpoint {folder} was made with another model: resume with the same model")
    dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder / MODEL)))
    model.load_state_dict(targets)
    return index


def load_sharded_optimizer(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer's shards (its state keyed by ``model``'s parameter names); every rank must call it."""
    folder = Path(folder)
    _load_optimizer(folder, read_index(folder), model, optimizer)


def _load_optimizer(folder: Path, index: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if "optimizer" not in index:
        raise ProgtuningError(f"sharded checkpoint {folder} holds no optimizer state: resume from a full checkpoint")
    inner = _unwrap(optimizer)
    index_to_name = _index_to_name(model, inner)
    name_to_index = {name: i for i, name in index_to_name.items()}
    params = dict(model.named_parameters())
    described = index["optimizer_tensors"]
    targets: dict[str, torch.Tensor] = {}
    for name, entry in index["optimizer"]["state"].items():
        for spec in entry.values():
            if "tensor" not in spec:
                continue
            key = spec["tensor"]
            dtype = getattr(torch, described[key]["dtype"])
            if spec["sharded"]:  # shaped and sharded like its parameter
                targets[key] = torch.empty_like(params[name].detach(), dtype=dtype)
            else:
                targets[key] = torch.empty(described[key]["shape"], dtype=dtype)
    if targets:
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder / OPTIMIZER)))
    state = {}
    for name, entry in index["optimizer"]["state"].items():
        if name not in name_to_index:
            raise ProgtuningError(f"sharded checkpoint {folder} has optimizer state for {name}, which this optimizer "
                                  "does not train: resume with the same model and method")
        state[name_to_index[name]] = {
            key: targets[spec["tensor"]] if "tensor" in spec else _decode(spec["value"]) for key, spec in entry.items()
        }
    groups = []
    for group in index["optimizer"]["param_groups"]:
        decoded = {key: _decode(value) for key, value in group.items() if key != "params"}
        decoded["params"] = [name_to_index[name] for name in group["params"]]
        groups.append(decoded)
    inner.load_state_dict({"state": state, "param_groups": groups})


def read_index(folder: str | Path) -> dict:
    folder = Path(folder)
    with open(folder / INDEX) as f:
        index = json.load(f)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{INDEX} is not a {FORMAT} file")
    return index


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / INDEX).is_file()


# -------------------------------------------------------------------------------------------------
# checks before anything loads
# -------------------------------------------------------------------------------------------------
def check_sharded(folder: str | Path, model: nn.Module | None = None, fix: str = "start a new run") -> dict:
    """Refuse, in one line, a sharded checkpoint that is incomplete, corrupt or made for another model.

    Reads JSON and safetensors headers only: every tensor ``sharded.json`` names must be covered
    exactly by the shards on disk, every shard file must be whole, and the global shapes must fit
    ``model`` (sharded or not). Returns the index.
    """
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise ProgtuningError(f"sharded checkpoint {folder} has no {INDEX} (an incomplete checkpoint): {fix}")
    try:
        index = read_index(folder)
        _check_coverage(folder / MODEL, index["model"])
        if "optimizer" in index and index.get("optimizer_tensors"):
            _check_coverage(folder / OPTIMIZER, index["optimizer_tensors"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ProgtuningError(f"sharded checkpoint {folder} is corrupt ({_first_line(error)[:160]}): {fix}")
    if model is not None:
        expected = {key: list(value.shape) for key, value in model.state_dict().items()}
        saved = {key: spec["shape"] for key, spec in index["model"].items()}
        wrong = sorted(k for k in saved if k in expected and saved[k] != expected[k])
        unknown = sorted(set(saved) ^ set(expected))
        if wrong or unknown:
            example = (f"{wrong[0]} is {saved[wrong[0]]} in the checkpoint, {expected[wrong[0]]} in the model" if wrong
                       else f"{unknown[0]} is in only one of them")
            raise ProgtuningError(
                f"checkpoint {folder} was made with another model ({len(wrong) + len(unknown)} tensors do not fit: "
                f"{example}): resume with the same model, method and labels, or start a new run"
            )
    return index


def _check_coverage(folder: Path, described: dict[str, dict]) -> None:
    """Every described tensor is covered by its shards, element for element; every file is whole."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"no shard files in {folder.name}/")
    covered: dict[str, int] = {}
    for file in files:
        header = _safetensors_header(file)
        offsets = json.loads((header.get("__metadata__") or {}).get("DCP_SHARDING_INFO", "{}"))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if key not in described:
                raise ValueError(f"{file.name} holds {key}, which {INDEX} does not name")
            shape, start = entry["shape"], (offsets.get(key) or {}).get("saved_offsets", [0] * len(entry["shape"]))
            if any(s + o > g for s, o, g in zip(shape, start, described[key]["shape"])):
                raise ValueError(f"{file.name}: the shard of {key} lies outside its shape")
            covered[key] = covered.get(key, 0) + math.prod(shape)
    for key, spec in described.items():
        if covered.get(key, 0) != math.prod(spec["shape"]):
            raise ValueError(f"{key}: the shards hold {covered.get(key, 0)} of {math.prod(spec['shape'])} elements")


def _safetensors_header(file: Path) -> dict:
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length <= 0 or 8 + length > size:
            raise ValueError(f"{file.name}: cut short ({size} bytes)")
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"{file.name}: {size} bytes, the header needs {8 + length + end}")
    return header


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------
def _unwrap(optimizer):
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers
    return optimizer


def _index_to_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The optimizer's parameter index (its state_dict key) -> the parameter's name in ``model``."""
    names = {id(param): name for name, param in model.named_parameters()}
    ordered = [param for group in optimizer.param_groups for param in group["params"]]
    missing = [i for i, param in enumerate(ordered) if id(param) not in names]
    if missing:
        raise ProgtuningError(
            "the optimizer holds parameters that are not the model's (built before sharding?): build the optimizer "
            "after shard_by_block, over the sharded parameters"
        )
    return {i: names[id(param)] for i, param in enumerate(ordered)}


def _is_dtensor(value: torch.Tensor) -> bool:
    return callable(getattr(value, "to_local", None))


def _encode(value: Any) -> Any:
    """JSON for the non-tensor leaves of an optimizer state dict (floats round-trip exactly)."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} of the optimizer state without pickle")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {_decode(k): _decode(v) for k, v in value["__dict__"]}
        raise ValueError(f"unknown entry {sorted(value)}")
    return value


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _commit(staging: Path, folder: Path) -> None:
    """Move the finished folder into place; an older one of the same name goes only after."""
    old = None
    if folder.exists():
        old = folder.parent / (".deleting-" + folder.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(staging, folder)
    fd = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
