"""progtuning — progressive fine-tuning (Progtuning, arXiv 2506.21119) for Hugging Face models.

Split a model's blocks into T parts; stage t trains parts t..T plus the head, so the lower parts
freeze one by one and the higher blocks train longest::

    from progtuning import ProgtuningCallback
    trainer = Trainer(model, args, train_dataset=train, callbacks=[ProgtuningCallback()])
    trainer.train()

or, in a plain PyTorch loop, :class:`ProgressiveFreezer` with a :func:`progressive` schedule.

The package is layered: ``core`` (schedule, blocks, freezing, counting, the Trainer callback, DDP;
torch + transformers only), ``methods`` (what can train), ``tasks`` (what is trained on, and how it
is scored), ``cache`` (the frozen-prefix cache) and ``runs`` (the experiment runner and the CLI).
The names below are imported on first use (PEP 562), so ``import progtuning`` loads none of
torch, transformers, datasets or matplotlib until one of them is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Accounting": "progtuning.core.counting",
    "BlockLayout": "progtuning.core.blocks",
    "ContributionFreezer": "progtuning.core.contribution_freezer",
    "ContributionPolicy": "progtuning.core.contribution",
    "DistributedFreezer": "progtuning.core.distributed",
    "MethodConfig": "progtuning.methods.config",
    "ProgressiveFreezer": "progtuning.core.freezing",
    "ProgtuningCallback": "progtuning.core.callback",
    "ProgtuningError": "progtuning.errors",
    "ProgtuningTrainer": "progtuning.runs.checkpoints",
    "Schedule": "progtuning.core.schedule",
    "Stage": "progtuning.core.schedule",
    "StageLogging": "progtuning.core.stage_log",
    "StageTelemetry": "progtuning.core.telemetry",
    "apply_method": "progtuning.methods.api",
    "count_updates": "progtuning.core.counting",
    "explicit": "progtuning.core.schedule",
    "find_blocks": "progtuning.core.blocks",
    "load_method": "progtuning.methods.api",
    "no_progtuning": "progtuning.core.schedule",
    "plan_updates": "progtuning.core.counting",
    "progressive": "progtuning.core.schedule",
    "release_optimizer_state": "progtuning.core.freezing",
    "save_method": "progtuning.methods.api",
    "split_into_parts": "progtuning.core.schedule",
}

__all__ = [
    "Accounting",
    "BlockLayout",
    "ContributionFreezer",
    "ContributionPolicy",
    "DistributedFreezer",
    "MethodConfig",
    "ProgressiveFreezer",
    "ProgtuningCallback",
    "ProgtuningError",
    "ProgtuningTrainer",
    "Schedule",
    "Stage",
    "StageLogging",
    "StageTelemetry",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'progtuning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from progtuning.core.blocks import BlockLayout, find_blocks
    from progtuning.core.callback import ProgtuningCallback
    from progtuning.core.counting import Accounting, count_updates, plan_updates
    from progtuning.core.distributed import DistributedFreezer
    from progtuning.core.freezing import ProgressiveFreezer, release_optimizer_state
    from progtuning.core.schedule import Schedule, Stage, explicit, no_progtuning, progressive, split_into_parts
    from progtuning.core.stage_log import StageLogging
    from progtuning.core.telemetry import StageTelemetry
    from progtuning.errors import ProgtuningError
    from progtuning.methods.api import apply_method, load_method, save_method
    from progtuning.methods.config import MethodConfig
    from progtuning.runs.checkpoints import ProgtuningTrainer
