"""What *can* train: the fine-tuning method (full, LoRA, bottleneck adapters, BitFit, any peft method).

:func:`apply_method` turns a freshly loaded model into the method's model and leaves exactly the
method's *trainable set* requiring grad. Call it before the optimizer and before
:class:`~progtuning.core.freezing.ProgressiveFreezer`, which captures that set once and only ever
freezes inside it::

    model = apply_method(model, MethodConfig(name="lora"))
    freezer = ProgressiveFreezer(model, progressive(num_blocks=6, num_stages=3))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=5e-4)

The trainable set of each method (one module each, listed in
:data:`~progtuning.methods.registry.METHODS`). Every PEFT method trains the task's new output
layers, because they start untrained: by default only those, as peft does (``method_head:
classifier``: ``classifier`` / ``score`` / ``qa_outputs`` ...); with ``method_head:
classifier+pooler`` the whole *head* as :func:`~progtuning.core.blocks.find_blocks` defines it
(classifier, pre-classifier, pooler, QA outputs, and final norms after the last block). A causal
language model's head is not new (the pretrained LM head, often tied to the input embeddings, and the final norm): the PEFT
methods leave it frozen, as peft's ``CAUSAL_LM`` does, so the method's own parameters are all that
trains; ``full`` trains it with everything else:

* ``full``: every parameter.
* ``lora``: LoRA matrices (peft) on ``lora_target_modules`` (default per architecture, see
  :data:`~progtuning.methods.lora.LORA_TARGETS`) plus the head, which peft trains as ``modules_to_save`` copies.
* ``peft``: any other peft method, from a peft config JSON (``peft_config_path``); the head is
  added to its ``modules_to_save`` where that config has one.
* ``adapter``: bottleneck adapters (:mod:`progtuning.methods.adapter`) plus the head, plus the block
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

from pathlib import Path
from typing import TYPE_CHECKING, Union

from progtuning.errors import ProgtuningError
from progtuning.methods.base import TASK_TYPES, head_module_paths, task_type_of
from progtuning.methods.config import MethodConfig
from progtuning.methods.registry import METHODS, get_method

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "METHODS",
    "METHOD_FILE",
    "MethodConfig",
    "TASK_TYPES",
    "apply_method",
    "delta_parameter_names",
    "head_module_paths",
    "load_method",
    "save_method",
]

METHOD_FILE = "progtuning_method.json"


def apply_method(model: nn.Module, config: MethodConfig, task_type: str | None = None) -> nn.Module:
    """Return ``model`` with ``config``'s method applied and exactly its trainable set requiring grad.

    ``task_type`` is the model's job (``"seq_cls"``, ``"qa"``, ... see :data:`TASK_TYPES`; default:
    read from the model class); LoRA and other peft methods need it to pick peft's model wrapper.
    Call this before building the optimizer or the :class:`~progtuning.core.freezing.ProgressiveFreezer`.
    """
    task_type = task_type or task_type_of(model)
    if task_type not in TASK_TYPES:
        raise ProgtuningError(f"unknown task type {task_type!r}: use one of {', '.join(TASK_TYPES)}")
    if hasattr(model, "peft_config"):
        raise ProgtuningError("the model is already a peft model: apply the method to a freshly loaded base model")
    return get_method(config.name).apply(model, config, task_type)


def delta_parameter_names(model: nn.Module, config: MethodConfig) -> set[str]:
    """The parameters BitFit or the adapter method trains (and saves), by name; read from the
    model's structure, not from ``requires_grad``, so it holds whatever stage is applied."""
    return get_method(config.name).delta_names(model, config)


def save_method(
    model: nn.Module, config: MethodConfig, out_dir: Union[str, Path], state_dict: dict | None = None
) -> Path:
    """Save what ``config``'s method trained in ``model`` to ``out_dir`` (see the module docstring).

    ``state_dict``: the model's full state dict, when ``model`` itself holds only shards (FSDP).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    get_method(config.name).save(model, config, out, state_dict)
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
    method = get_method(config.name)
    if merge and not method.mergeable:
        raise ProgtuningError(f"method {config.name!r} is non-linear and cannot be merged: load it with merge=False")
    return method.load(base, out, config, merge)
