"""progtuning — progressive fine-tuning (Progtuning, arXiv 2506.21119) for Hugging Face models.

Split a model's blocks into T parts; stage t trains parts t..T plus the head, so the lower parts
freeze one by one and the higher blocks train longest::

    from progtuning import ProgtuningCallback
    trainer = Trainer(model, args, train_dataset=train, callbacks=[ProgtuningCallback()])
    trainer.train()

or, in a plain PyTorch loop, :class:`ProgressiveFreezer` with a :func:`progressive` schedule.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names and the modules that define them. Imported on first use, so that `import progtuning`
# (and the CLI's argument checks) stay free of torch and transformers.
_EXPORTS = {
    "BlockLayout": "progtuning.core.blocks",
    "find_blocks": "progtuning.core.blocks",
    "ProgtuningCallback": "progtuning.core.callback",
    "ProgtuningTrainer": "progtuning.runs.checkpoints",
    "Accounting": "progtuning.core.counting",
    "count_updates": "progtuning.core.counting",
    "plan_updates": "progtuning.core.counting",
    "DistributedFreezer": "progtuning.core.distributed",
    "ProgtuningError": "progtuning.errors",
    "ProgressiveFreezer": "progtuning.core.freezing",
    "release_optimizer_state": "progtuning.core.freezing",
    "MethodConfig": "progtuning.methods.api",
    "apply_method": "progtuning.methods.api",
    "load_method": "progtuning.methods.api",
    "save_method": "progtuning.methods.api",
    "Schedule": "progtuning.core.schedule",
    "Stage": "progtuning.core.schedule",
    "explicit": "progtuning.core.schedule",
    "no_progtuning": "progtuning.core.schedule",
    "progressive": "progtuning.core.schedule",
    "split_into_parts": "progtuning.core.schedule",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'progtuning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Accounting",
    "BlockLayout",
    "DistributedFreezer",
    "MethodConfig",
    "ProgressiveFreezer",
    "ProgtuningCallback",
    "ProgtuningError",
    "ProgtuningTrainer",
    "Schedule",
    "Stage",
    "apply_method",
    "count_updates",
    "explicit",
    "find_blocks",
    "load_method",
    "no_progtuning",
    "plan_updates",
    "progressive",
    "release_optimizer_state",
    "save_method",
    "split_into_parts",
]
__version__ = "0.1.0"
