"""Methods through peft: what they share, and the ``peft`` method (any peft config, from its JSON).

A peft method wraps the model with ``peft.get_peft_model``; peft trains the head (the part
``method_head`` names: by default peft's own convention, the classifier only) as
``modules_to_save`` copies, which :func:`check_head_trains` verifies. Saved with peft's own
``save_pretrained`` (``adapter_model.safetensors`` + ``adapter_config.json``) and reloaded with
``PeftModel.from_pretrained``, optionally merged into the base weights (``merge_and_unload``).
LoRA (:mod:`progtuning.methods.lora`) is a peft method whose config progtuning builds itself.

(This module is ``progtuning.methods.peft``; ``import peft`` inside it is the peft package.)
"""

from __future__ import annotations

import json
from pathlib import Path

from progtuning.errors import ProgtuningError
from progtuning.methods.base import (
    PRETRAINED_HEAD_TASK_TYPES,
    TASK_TYPES,
    Method,
    head_module_paths,
    load_base,
    save_base_config,
)


class PeftMethod(Method):
    """A method applied by peft. Subclasses build the peft config (:meth:`peft_config`)."""

    #: LoRA knows exactly what it trains: the head copies must be the head and nothing else.
    exact_head: bool = False

    def peft_config(self, model, config, task_type: str, head: list[str]):
        raise NotImplementedError

    def apply(self, model, config, task_type):
        import peft

        head = [] if task_type in PRETRAINED_HEAD_TASK_TYPES else head_module_paths(model, config.method_head)
        head_names = _param_names_under(model, head)  # before peft renames them
        peft_config = self.peft_config(model, config, task_type, head)
        wrapped = peft.get_peft_model(model, peft_config)
        if hasattr(peft_config, "modules_to_save"):
            check_head_trains(wrapped, head_names, exact=self.exact_head)
        return wrapped

    def save(self, model, config, out, state_dict=None):
        if not hasattr(model, "peft_config"):
            raise ProgtuningError(
                f"method {config.name!r} saves a peft model, got {type(model).__name__}: apply_method first"
            )
        model.save_pretrained(out, state_dict=state_dict)
        save_base_config(model, out)

    def load(self, base, out, config, merge):
        import peft
        from torch import nn

        model = base if isinstance(base, nn.Module) else load_base(base, out)
        model = peft.PeftModel.from_pretrained(model, str(out), is_trainable=not merge)
        return model.merge_and_unload() if merge else model


class AnyPeft(PeftMethod):
    """Any peft method, from a peft config JSON (``peft_config_path``); the head joins its ``modules_to_save``."""

    name = "peft"

    def peft_config(self, model, config, task_type, head):
        peft_config = _read_peft_config(config.peft_config_path)
        if peft_config.task_type is None:
            peft_config.task_type = TASK_TYPES[task_type]
        if hasattr(peft_config, "modules_to_save"):
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(head))
        return peft_config


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


def _param_names_under(model, module_paths: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in module_paths)]


def check_head_trains(wrapped, head_names: list[str], exact: bool) -> None:
    """Every head parameter has a trained peft copy (and, if ``exact``, nothing outside the head does)."""
    # peft trains the head through copies under "<module>.modules_to_save.default." and matches
    # module names by plain suffix ("classifier" also matches "pre_classifier").
    copies = {
        n.replace(".modules_to_save.default.", ".").removeprefix("base_model.model.")
        for n, p in wrapped.named_parameters()
        if p.requires_grad and ".modules_to_save." in n
    }
    missing, extra = sorted(set(head_names) - copies), sorted(copies - set(head_names))
    if missing or (exact and extra):
        raise RuntimeError(f"peft trains the wrong head copies: missing {missing[:4]}, outside the head {extra[:4]}")


METHOD = AnyPeft()
