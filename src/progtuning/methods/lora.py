"""LoRA (Hu et al. 2022) through peft: low-rank updates on chosen linear layers, plus the head.

The LoRA matrices go on ``lora_target_modules`` (default per architecture: the attention query
and value projections, :data:`LORA_TARGETS`; other model types fall back to peft's own table).
The head (by default peft's convention: the classifier only; ``method_head: classifier+pooler``
adds the pooler) trains as peft ``modules_to_save`` copies, and nothing else outside the LoRA
matrices does. Saving, loading and merging are peft's (:class:`~progtuning.methods.peft.PeftMethod`).
"""

from __future__ import annotations

from progtuning.errors import ProgtuningError
from progtuning.methods.base import TASK_TYPES
from progtuning.methods.peft import PeftMethod

# Default LoRA targets by model_type (attention query and value, as in the LoRA paper).
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


class LoRA(PeftMethod):
    name = "lora"
    exact_head = True

    def peft_config(self, model, config, task_type, head):
        import peft

        targets = lora_targets(model, config.lora_target_modules)
        conv1d = {type(m).__name__ for n, m in model.named_modules() if _matches(n, targets)} == {"Conv1D"}
        return peft.LoraConfig(
            task_type=TASK_TYPES[task_type],
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
            modules_to_save=list(head),
        )


def lora_targets(model, wanted: list[str] | None = None) -> list[str]:
    """The module names LoRA wraps in ``model``: ``wanted``, else the architecture's default."""
    from torch import nn

    if wanted:
        targets = list(wanted)
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


METHOD = LoRA()
