"""progtuning — progressive fine-tuning (Progtuning, arXiv 2506.21119) for Hugging Face models.

Split a model's blocks into T parts; stage t trains parts t..T plus the head, so the lower parts
freeze one by one and the higher blocks train longest::

    from progtuning import ProgtuningCallback
    trainer = Trainer(model, args, train_dataset=train, callbacks=[ProgtuningCallback()])
    trainer.train()

or, in a plain PyTorch loop, :class:`ProgressiveFreezer` with a :func:`progressive` schedule.
"""

from progtuning.core.blocks import BlockLayout, find_blocks
from progtuning.core.callback import ProgtuningCallback
from progtuning.core.contribution import ContributionPolicy
from progtuning.core.contribution_freezer import ContributionFreezer
from progtuning.runs.checkpoints import ProgtuningTrainer
from progtuning.core.counting import Accounting, count_updates, plan_updates
from progtuning.core.distributed import DistributedFreezer
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer, release_optimizer_state
from progtuning.methods.api import MethodConfig, apply_method, load_method, save_method
from progtuning.core.schedule import Schedule, Stage, explicit, no_progtuning, progressive, split_into_parts

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
