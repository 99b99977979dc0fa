"""What a fine-tuning method is: its trainable set, and how its result is saved and reloaded.

:class:`Method` is the interface every module in :data:`~progtuning.methods.registry.METHODS`
implements (one instance, ``METHOD``); :mod:`progtuning.methods.api` dispatches to it by name.
:class:`DeltaMethod` is the shared shape of methods that train a named subset of the model's own
(or added) parameters and save just those (BitFit, bottleneck adapters). The helpers below find
the part of the head a method trains (``method_head``).

Which part of the head a PEFT method trains follows peft's convention by default
(``method_head: classifier``): the task's own output layers (``classifier``, ``score``,
``qa_outputs``, ...), new on a pretrained model, and not the pretrained layers
:func:`~progtuning.core.blocks.find_blocks` also counts as head (the pooler, the final norms after
the last block). ``method_head: classifier+pooler`` trains the whole head. Full fine-tuning trains
everything, so it ignores the setting.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Union

from progtuning.core.blocks import HEAD, HEAD_MODULE_NAMES, find_blocks
from progtuning.errors import ProgtuningError
from progtuning.methods.config import METHOD_HEADS

if TYPE_CHECKING:
    from torch import nn

    from progtuning.methods.config import MethodConfig

# The model's job, in our names -> peft's TaskType (which picks peft's model wrapper).
TASK_TYPES: dict[str, str] = {
    "seq_cls": "SEQ_CLS",
    "qa": "QUESTION_ANS",
    "token_cls": "TOKEN_CLS",
    "causal_lm": "CAUSAL_LM",
}
# Task types whose head is pretrained rather than new: the PEFT methods do not train it.
PRETRAINED_HEAD_TASK_TYPES = frozenset({"causal_lm"})


class Method:
    """One fine-tuning method. Subclasses set ``name`` and implement :meth:`apply`, :meth:`save`, :meth:`load`."""

    name: ClassVar[str]
    #: Whether ``load(..., merge=True)`` can fold the method into plain base weights.
    mergeable: ClassVar[bool] = True

    def apply(self, model: nn.Module, config: MethodConfig, task_type: str) -> nn.Module:
        """Return ``model`` with the method applied and exactly its trainable set requiring grad."""
        raise NotImplementedError

    def delta_names(self, model: nn.Module, config: MethodConfig) -> set[str]:
        """The parameters the method trains and saves, by name (methods that keep such a list)."""
        raise ValueError(f"method {self.name!r} keeps no delta parameter list")

    def save(self, model: nn.Module, config: MethodConfig, out: Path, state_dict: dict | None = None) -> None:
        """Write what the method trained into ``out`` (the caller adds ``progtuning_method.json``).

        ``state_dict``: the model's full state dict, when ``model`` itself holds only shards (FSDP)."""
        raise NotImplementedError

    def load(self, base: Union[str, Path, nn.Module], out: Path, config: MethodConfig, merge: bool) -> nn.Module:
        """Rebuild the saved model on ``base`` (a folder or a fresh model of the saved class)."""
        raise NotImplementedError


class DeltaMethod(Method):
    """Trains :meth:`delta_names` (the head among them) and saves only those, as ``weights_file``."""

    weights_file: ClassVar[str]

    def prepare(self, model: nn.Module, config: MethodConfig) -> None:
        """Change the model before choosing what trains (adapters are added here); nothing by default."""

    def apply(self, model, config, task_type):
        self.prepare(model, config)
        names = self.delta_names(model, config)
        if not names:
            raise ProgtuningError(
                f"{config.name} finds nothing to train in {type(model).__name__} (it has no bias parameters): "
                "use lora or adapter"
            )
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        return model

    def save(self, model, config, out, state_dict=None):
        from safetensors.torch import save_file

        names = self.delta_names(model, config)
        source = state_dict if state_dict is not None else dict(model.named_parameters())
        tensors = {n: source[n].detach().cpu().contiguous() for n in names}
        save_file(tensors, str(out / self.weights_file), metadata={"format": "pt", "method": config.name})
        save_base_config(model, out)

    def load(self, base, out, config, merge):
        model = base if _is_module(base) else load_base(base, out)
        model = self.apply(model, config, task_type_of(model))
        _load_delta(model, out / self.weights_file, self.delta_names(model, config))
        return model


# -- the part of the head a method trains ------------------------------------------------------
# The task's own output layers: what peft trains by default (its modules_to_save for SEQ_CLS are
# classifier/score, for QA qa_outputs; it matches by suffix, so pre_classifier comes along).
CLASSIFIER_MODULE_NAMES = frozenset(
    {"classifier", "pre_classifier", "score", "qa_outputs", "classification_head", "sequence_summary", "logits_proj"}
)


def head_module_paths(model: nn.Module, method_head: str = "classifier+pooler") -> list[str]:
    """Module paths of the head a method trains, outermost head module each.

    ``classifier+pooler``: the whole head as :func:`find_blocks` defines it (``["bert.pooler",
    "classifier"]`` for BERT, ``["score", "transformer.ln_f"]`` for GPT-2); ``classifier``: only
    the task's output layers (``["classifier"]``, ``["score"]``).
    """
    paths = set()
    for name in head_parameter_names(model, method_head):
        parts = name.split(".")[:-1]
        for i, part in enumerate(parts):
            if part in HEAD_MODULE_NAMES:
                paths.add(".".join(parts[: i + 1]))
                break
    return sorted(paths)


def head_parameter_names(model: nn.Module, method_head: str = "classifier+pooler") -> set[str]:
    """The head parameters a method trains under ``method_head`` (see the module docstring)."""
    if method_head not in METHOD_HEADS:
        raise ProgtuningError(f"unknown method_head {method_head!r}: use one of {', '.join(METHOD_HEADS)}")
    if task_type_of(model) in PRETRAINED_HEAD_TASK_TYPES:  # a causal LM's head is pretrained, not new
        return set()
    head = set(find_blocks(model).names(HEAD))
    if method_head == "classifier+pooler":
        return head
    chosen = {n for n in head if CLASSIFIER_MODULE_NAMES & set(n.split(".")[:-1])}
    if head and not chosen and task_type_of(model) != "causal_lm":
        # A new task head that would stay at its random initialisation: refuse rather than train nothing.
        modules = sorted({".".join(n.split(".")[:-1]) for n in head})
        raise ProgtuningError(
            f"no classifier layer in the head of {type(model).__name__} (head modules: {', '.join(modules[:4])}): "
            "set method_head: classifier+pooler to train the whole head"
        )
    return chosen


def task_type_of(model: nn.Module) -> str:
    """The model's job read from its class name (``BertForQuestionAnswering`` → ``qa``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base).__name__
    for marker, task_type in (("QuestionAnswering", "qa"), ("TokenClassification", "token_cls"), ("CausalLM", "causal_lm"),
                              ("LMHeadModel", "causal_lm")):
        if marker in kind:
            return task_type
    return "seq_cls"


# -- files ----------------------------------------------------------------------------------------
def save_base_config(model: nn.Module, out: Path) -> None:
    """The model config, whose ``architectures`` names the class :func:`load_base` rebuilds."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(out)


def saved_model_class(out: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(out)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ProgtuningError(
            f"{out / 'config.json'} names no known model class (architectures={names}): save it with save_method"
        )
    return cls


def load_base(base_dir: Union[str, Path], out: Path) -> nn.Module:
    import transformers

    # The saved config carries the task settings (num_labels, pad_token_id, ...) the head was built with.
    return saved_model_class(out).from_pretrained(str(base_dir), config=transformers.AutoConfig.from_pretrained(out))


def _is_module(value) -> bool:
    from torch import nn

    return isinstance(value, nn.Module)


def _load_delta(model: nn.Module, path: Path, expected: set[str]) -> None:
    import torch
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
