"""What a finished run saves for others: the model folder as the hub and peft expect it.

* :func:`base_model_reference` names the base model the way others can load it: an offline
  alias becomes the hub id it was taken from (:data:`HUB_IDS`), anything else stays as the user
  wrote it. A saved LoRA adapter records it as ``base_model_name_or_path`` (not the local cache
  folder the weights happened to be read from), so ``AutoPeftModel.from_pretrained`` and the hub
  find the base.
* :func:`model_to_save` applies ``--merge-lora``: the LoRA update folded into the base weights
  (peft's ``merge_and_unload``), saved as a plain transformers model.
* :func:`save_run_model` writes ``OUTPUT_DIR/model/``: the method's weights
  (:func:`~progtuning.methods.api.save_method`), the tokenizer and the task
  (:mod:`progtuning.tasks.spec`), which ``progtuning predict`` / ``evaluate`` read back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# offline alias -> the hub model its weights come from
HUB_IDS: dict[str, str] = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "minilm-l3": "sentence-transformers/paraphrase-MiniLM-L3-v2",
    "mpnet-base": "sentence-transformers/all-mpnet-base-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def base_model_reference(model: str) -> str:
    """The base model as others can load it: a hub id for an alias, else what the user gave."""
    return HUB_IDS.get(model, model)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a hub model id (``org/name`` or ``name``), not a folder."""
    return not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def model_to_save(model: Any, config: Any) -> tuple[Any, Any]:
    """The model and the :class:`~progtuning.methods.config.MethodConfig` to save it as.

    LoRA adapters record the base model's reference; with ``merge_lora`` the update is folded into
    the base weights and saved as a plain model (method ``full``).
    """
    from progtuning.methods.config import MethodConfig

    method = config.method_config()
    peft_configs = getattr(model, "peft_config", None)
    if isinstance(peft_configs, dict):
        for peft_config in peft_configs.values():
            peft_config.base_model_name_or_path = base_model_reference(config.model)
    if getattr(config, "merge_lora", False):
        return model.merge_and_unload(), MethodConfig(name="full")
    return model, method


def save_run_model(model: Any, tokenizer: Any, config: Any, task: Any, model_dir: Path,
                   state_dict: dict | None = None) -> None:
    """``OUTPUT_DIR/model/``: what the method trained, the tokenizer and the task's spec.

    ``state_dict``: the model's full state dict, when ``model`` itself holds only shards (FSDP).
    """
    from progtuning.methods.api import save_method
    from progtuning.tasks.registry import task_source
    from progtuning.tasks.spec import save_task_spec, task_spec

    if state_dict is not None and getattr(config, "merge_lora", False):
        from progtuning.errors import ProgtuningError

        raise ProgtuningError("--merge-lora cannot fold LoRA into a model sharded by FSDP: drop --merge-lora or --fsdp")
    model, method = model_to_save(model, config)
    save_method(model, method, model_dir, state_dict=state_dict)
    tokenizer.save_pretrained(str(model_dir))
    source = task_source(config)
    save_task_spec(task_spec(task, source, config.label_column if source in ("files", "hub") else None), model_dir)
