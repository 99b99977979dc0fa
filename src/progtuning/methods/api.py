"""What *can* train: the fine-tuning method (full, LoRA, bottleneck adapters, BitFit, any peft method).

:func:`apply_method` turns a freshly loaded model into the method's model and leaves exactly the
method's *trainable set* requiring grad. Call it before the optimizer and before
:class:`~progtuning.core.freezing.ProgressiveFreezer`, which captures that set once and only ever
freezes inside it::

    model = apply_method(model, MethodConfig(name="lora"))
    freezer = ProgressiveFreezer(model, progressive(num_blocks=6, num_stages=3))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=5e-4)

The trainable set of each method. Every method trains the *head* as :func:`~progtuning.core.blocks.find_blocks`
defines it (classifier, pre-classifier, pooler, QA outputs, and final norms after the last
block), because a new task head starts untrained. A causal language model's head is not new (the
pretrained LM head, often tied to the input embeddings, and the final norm): the PEFT methods
(``lora``, ``peft``, ``adapter``, ``bitfit``) leave it frozen, as peft's ``CAUSAL_LM`` does, so the
method's own parameters are all that trains; ``full`` trains it with everything else.

* ``full``: every parameter.
* ``lora``: LoRA matrices (peft) on ``lora_target_modules`` (default per architecture, see
  :data:`LORA_TARGETS`) plus the head, which peft trains as ``modules_to_save`` copies.
* ``peft``: any other peft method, from a peft config JSON (``peft_config_path``); the head is
  added to its ``modules_to_save`` where that config has one.
* ``adapter``: bottleneck adapters (:mod:`progtuning.methods.adapters`) plus the head, plus the block
  LayerNorms when ``adapter_train_layernorm`` (default: yes for Houlsby, as in the Houlsby paper;
  no for Pfeiffer).
* ``bitfit``: every bias (embedding and block LayerNorm biases included) plus the head.

Saving and loading (:func:`save_method` / :func:`load_method`) keeps only what the method trained.
Every directory holds ``progtuning_method.json`` (the :class:`MethodConfig`) and ``config.json``
(the model config, whose ``architectures`` names the model class to rebuild), plus:

=========  ==========================================================================
full       the whole model (``model.save_pretrained``: ``model.safetensors``)
lora/peft  peft's ``save_pretrained``: ``adapter_model.safetensors`` + ``adapter_config.json``
           (LoRA matrices and the head copies); reloaded with ``PeftModel.from_pretrained``,
           optionally merged into the base weights (``merge=True``: ``merge_and_unload``)
adapter    ``adapters.safetensors``: adapter weights, head, trained block LayerNorms
bitfit     ``bitfit.safetensors``: every bias and the head (the parameters BitFit changed)
=========  ==========================================================================

``load_method(base, out_dir)`` takes the base model (a directory to load it from, or a freshly
loaded model of the same class) and returns the fine-tuned model, with the method's trainable
set requiring grad again, so it predicts as the saved model did and can train on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from progtuning.methods.adapters import ADAPTER_TYPES, ACTIVATIONS, add_adapters, adapter_parameter_names
from progtuning.core.blocks import HEAD, HEAD_MODULE_NAMES, find_blocks
from progtuning.errors import ProgtuningError

METHODS: tuple[str, ...] = ("full", "lora", "adapter", "bitfit", "peft")
TASK_TYPES: dict[str, str] = {"seq_cls": "SEQ_CLS", "qa": "QUESTION_ANS", "causal_lm": "CAUSAL_LM"}  # ours -> peft's
# Task types whose head is pretrained rather than new: the PEFT methods do not train it.
PRETRAINED_HEAD_TASK_TYPES = frozenset({"causal_lm"})

# Default LoRA targets by model_type (attention query and value, as in the LoRA paper); other
# model types fall back to peft's own table.
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mpnet": ["q", "v"],
    "deberta-v2": ["query_proj", "value_proj"],
}

METHOD_FILE = "progtuning_method.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
BITFIT_WEIGHTS = "bitfit.safetensors"


@dataclass
class MethodConfig:
    """The fine-tuning method and its settings; also what :func:`save_method` writes as JSON."""

    name: str = field(
        default="full",
        metadata={
            "help": "fine-tuning method: full, lora, adapter, bitfit, or peft (any peft method, from peft_config_path)"
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "module names LoRA wraps (a name matches itself or a dotted path ending in it); "
            "default: the attention query and value projections of the architecture"
        },
    )
    peft_config_path: Optional[str] = field(
        default=None,
        metadata={"help": "for name=peft: a peft config JSON file (or a directory holding adapter_config.json)"},
    )
    adapter_type: str = field(
        default="houlsby",
        metadata={
            "help": "adapter placement: houlsby (after attention and feed-forward) or pfeiffer (after feed-forward)"
        },
    )
    adapter_reduction_factor: int = field(
        default=16, metadata={"help": "adapter bottleneck = hidden size // reduction factor"}
    )
    adapter_train_layernorm: Optional[bool] = field(
        default=None,
        metadata={"help": "also train the LayerNorms inside the blocks; default: true for houlsby, false for pfeiffer"},
    )
    adapter_activation: str = field(
        default="gelu", metadata={"help": "adapter nonlinearity: gelu (default; no dead units at init) or relu"}
    )

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ProgtuningError(f"unknown fine-tuning method {self.name!r}: use one of {', '.join(METHODS)}")
        if self.name == "peft" and not self.peft_config_path:
            raise ProgtuningError("method 'peft' needs peft_config_path: the path of a peft config JSON")
        if self.peft_config_path and self.name != "peft":
            raise ProgtuningError(
                f"peft_config_path is only read by method 'peft', not {self.name!r}: use name='peft' or drop the path"
            )
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if self.lora_r < 1:
            raise ProgtuningError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ProgtuningError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ProgtuningError(f"unknown adapter type {self.adapter_type!r}: use one of {', '.join(ADAPTER_TYPES)}")
        if self.adapter_reduction_factor < 1:
            raise ProgtuningError(f"adapter_reduction_factor must be >= 1, got {self.adapter_reduction_factor}")
        if self.adapter_activation not in ACTIVATIONS:
            raise ProgtuningError(
                f"unknown adapter activation {self.adapter_activation!r}: use one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def train_layernorm(self) -> bool:
        """Whether the adapter method trains the block LayerNorms (Houlsby: yes, Pfeiffer: no, unless set)."""
        if self.adapter_train_layernorm is not None:
            return bool(self.adapter_train_layernorm)
        return self.adapter_type == "houlsby"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProgtuningError(f"unknown method setting(s) {unknown}: known settings are {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MethodConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# -- applying a method ------------------------------------------------------------------------
def apply_method(model: nn.Module, config: MethodConfig, task_type: str | None = None) -> nn.Module:
    """Return ``model`` with ``config``'s method applied and exactly its trainable set requiring grad.

    ``task_type`` is ``"seq_cls"``, ``"qa"`` or ``"causal_lm"`` (default: read from the model
    class); LoRA and other peft methods need it to pick peft's model wrapper. Call this before building the
    optimizer or the :class:`~progtuning.core.freezing.ProgressiveFreezer`.
    """
    task_type = task_type or _task_type_of(model)
    if task_type not in TASK_TYPES:
        raise ProgtuningError(f"unknown task type {task_type!r}: use one of {', '.join(TASK_TYPES)}")
    if hasattr(model, "peft_config"):
        raise ProgtuningError("the model is already a peft model: apply the method to a freshly loaded base model")
    if config.name == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if config.name in ("lora", "peft"):
        return _apply_peft(model, config, task_type)
    if config.name == "adapter":
        add_adapters(model, config.adapter_type, config.adapter_reduction_factor, config.adapter_activation)
    names = delta_parameter_names(model, config)
    if not names:
        raise ProgtuningError(
            f"{config.name} finds nothing to train in {type(model).__name__} (it has no bias parameters): use lora or adapter"
        )
    _train_only(model, names)
    return model


def delta_parameter_names(model: nn.Module, config: MethodConfig) -> set[str]:
    """The parameters BitFit or the adapter method trains (and saves), by name; read from the
    model's structure, not from ``requires_grad``, so it holds whatever stage is applied."""
    layout = find_blocks(model)
    names = set() if _task_type_of(model) in PRETRAINED_HEAD_TASK_TYPES else set(layout.names(HEAD))
    params = dict(model.named_parameters())
    if config.name == "bitfit":
        names |= {n for n in params if n.rsplit(".", 1)[-1] == "bias"}
    elif config.name == "adapter":
        adapters = adapter_parameter_names(model)
        if not adapters:
            raise ProgtuningError("the model has no adapters: apply the adapter method (apply_method) first")
        names |= set(adapters)
        if config.train_layernorm:
            names |= _block_norm_parameter_names(model, layout.block_paths)
    else:
        raise ValueError(f"method {config.name!r} keeps no delta parameter list")
    return names


def _train_only(model: nn.Module, names: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def _block_norm_parameter_names(model: nn.Module, block_paths: tuple[str, ...]) -> set[str]:
    names = set()
    for path in block_paths:
        for module_name, module in model.get_submodule(path).named_modules():
            if _is_norm(module):
                prefix = f"{path}.{module_name}" if module_name else path
                names |= {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return names


def _is_norm(module: nn.Module) -> bool:
    # nn.LayerNorm, DeBERTa's / T5's LayerNorm, Llama's and Qwen2's RMSNorm.
    kind = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or kind.endswith(("LayerNorm", "RMSNorm"))


def _task_type_of(model: nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    return "qa" if "QuestionAnswering" in name else "seq_cls"


def head_module_paths(model: nn.Module) -> list[str]:
    """Module paths of the head (as :func:`find_blocks` defines it), outermost head module each:
    ``["bert.pooler", "classifier"]`` for BERT, ``["score", "transformer.ln_f"]`` for GPT-2."""
    paths = set()
    for name in find_blocks(model).names(HEAD):
        parts = name.split(".")[:-1]
        for i, part in enumerate(parts):
            if part in HEAD_MODULE_NAMES:
                paths.add(".".join(parts[: i + 1]))
                break
    return sorted(paths)


def _apply_peft(model: nn.Module, config: MethodConfig, task_type: str) -> nn.Module:
    import peft

    head = [] if task_type in PRETRAINED_HEAD_TASK_TYPES else head_module_paths(model)
    head_names = _param_names_under(model, head)  # before peft renames them
    if config.name == "lora":
        targets = _lora_targets(model, config)
        conv1d = {type(m).__name__ for n, m in model.named_modules() if _matches(n, targets)} == {"Conv1D"}
        peft_config = peft.LoraConfig(
            task_type=TASK_TYPES[task_type],
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
            modules_to_save=list(head),
        )
    else:
        peft_config = _read_peft_config(config.peft_config_path)
        if peft_config.task_type is None:
            peft_config.task_type = TASK_TYPES[task_type]
        if hasattr(peft_config, "modules_to_save"):
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(head))
    wrapped = peft.get_peft_model(model, peft_config)
    if hasattr(peft_config, "modules_to_save"):
        _check_head_trains(wrapped, head_names, exact=config.name == "lora")
    return wrapped


def _lora_targets(model: nn.Module, config: MethodConfig) -> list[str]:
    if config.lora_target_modules:
        targets = list(config.lora_target_modules)
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = LORA_TARGETS.get(model_type)
        if targets is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

            targets = PEFT_TARGETS.get(model_type)
        if not targets:
            raise ProgtuningError(
                f"no default LoRA target modules for model type {model_type!r}: name them (lora_target_modules)"
            )
        targets = list(targets)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(_matches(n, [t]) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ProgtuningError(
            f"LoRA target module(s) {missing} not found in {type(model).__name__}: "
            f"its linear layers are named {', '.join(leaves)}"
        )
    return targets


def _matches(name: str, targets: list[str]) -> bool:
    # peft's rule for a list of target names: the full module name, or a dotted suffix of it.
    return any(name == t or name.endswith("." + t) for t in targets)


def _read_peft_config(path: str):
    import peft

    source = Path(path)
    if source.is_dir():
        source = source / "adapter_config.json"
    if not source.is_file():
        raise ProgtuningError(f"peft config {source} not found: give the path of a peft config JSON (peft_config_path)")
    try:
        return peft.get_peft_config(peft.PeftConfig.from_json_file(str(source)))
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ProgtuningError(
            f"{source} is not a valid peft config ({type(err).__name__}: {err}): write it with peft's save_pretrained"
        ) from None


def _param_names_under(model: nn.Module, module_paths: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in module_paths)]


def _check_head_trains(wrapped: nn.Module, head_names: list[str], exact: bool) -> None:
    # peft trains the head through copies under "<module>.modules_to_save.default." and matches
    # module names by plain suffix ("classifier" also matches "pre_classifier"): check that every
    # head parameter got a trained copy and, for LoRA, that nothing outside the head did.
    copies = {
        n.replace(".modules_to_save.default.", ".").removeprefix("base_model.model.")
        for n, p in wrapped.named_parameters()
        if p.requires_grad and ".modules_to_save." in n
    }
    missing, extra = sorted(set(head_names) - copies), sorted(copies - set(head_names))
    if missing or (exact and extra):
        raise RuntimeError(f"peft trains the wrong head copies: missing {missing[:4]}, outside the head {extra[:4]}")


# -- saving and loading ---------------------------------------------------------------------
def save_method(model: nn.Module, config: MethodConfig, out_dir: Union[str, Path]) -> Path:
    """Save what ``config``'s method trained in ``model`` to ``out_dir`` (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if config.name == "full":
        model.save_pretrained(out)
    elif config.name in ("lora", "peft"):
        if not hasattr(model, "peft_config"):
            raise ProgtuningError(
                f"method {config.name!r} saves a peft model, got {type(model).__name__}: apply_method first"
            )
        model.save_pretrained(out)
        _save_base_config(base, out)
    else:
        from safetensors.torch import save_file

        names = delta_parameter_names(model, config)
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n in names}
        save_file(tensors, str(out / _weights_file(config)), metadata={"format": "pt", "method": config.name})
        _save_base_config(base, out)
    config.save(out / METHOD_FILE)
    return out


def load_method(base: Union[str, Path, nn.Module], out_dir: Union[str, Path], merge: bool = False) -> nn.Module:
    """Rebuild the model saved by :func:`save_method` in ``out_dir`` on top of ``base``.

    ``base`` is the directory of the base model the method was applied to, or a freshly loaded
    model of the saved class. ``merge=True`` folds LoRA into the base weights (peft's
    ``merge_and_unload``) and returns a plain transformers model; BitFit is merged already, and
    bottleneck adapters (non-linear) cannot be merged.
    """
    out = Path(out_dir)
    method_file = out / METHOD_FILE
    if not method_file.is_file():
        raise ProgtuningError(f"no {METHOD_FILE} in {out}: give a directory written by save_method")
    config = MethodConfig.load(method_file)
    if merge and config.name == "adapter":
        raise ProgtuningError("bottleneck adapters are non-linear and cannot be merged: load them with merge=False")
    if config.name == "full":
        cls = type(base) if isinstance(base, nn.Module) else _saved_model_class(out)
        return cls.from_pretrained(out)
    model = base if isinstance(base, nn.Module) else _load_base(base, out)
    if config.name in ("lora", "peft"):
        import peft

        model = peft.PeftModel.from_pretrained(model, str(out), is_trainable=not merge)
        return model.merge_and_unload() if merge else model
    model = apply_method(model, config)
    _load_delta(model, out / _weights_file(config), delta_parameter_names(model, config))
    return model


def _weights_file(config: MethodConfig) -> str:
    return ADAPTER_WEIGHTS if config.name == "adapter" else BITFIT_WEIGHTS


def _save_base_config(base: nn.Module, out: Path) -> None:
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(out)


def _saved_model_class(out: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(out)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ProgtuningError(
            f"{out / 'config.json'} names no known model class (architectures={names}): save it with save_method"
        )
    return cls


def _load_base(base_dir: Union[str, Path], out: Path) -> nn.Module:
    import transformers

    # The saved config carries the task settings (num_labels, pad_token_id, ...) the head was built with.
    return _saved_model_class(out).from_pretrained(str(base_dir), config=transformers.AutoConfig.from_pretrained(out))


def _load_delta(model: nn.Module, path: Path, expected: set[str]) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ProgtuningError(f"{path} not found: give a directory written by save_method")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ProgtuningError(
            f"{path.name} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "load it onto the base model it was trained from"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ProgtuningError(
                    f"{name} is {tuple(tensor.shape)} in {path.name} but {tuple(params[name].shape)} in the model: "
                    "load it onto the base model it was trained from"
                )
            params[name].copy_(tensor)
