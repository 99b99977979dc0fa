"""What a text task is: columns, labels, metric — the one shape every task source returns.

GLUE (:mod:`progtuning.tasks.glue`), the built-in offline tasks (:mod:`progtuning.tasks.builtin`) and a
user's own CSV/TSV/JSONL files (:mod:`progtuning.tasks.textfiles`) all describe themselves with a
:class:`TextTask` and hand back a ``datasets.DatasetDict``; :mod:`progtuning.runs.train` only ever sees
these two objects. SQuAD is extractive QA, not a text task, and lives in :mod:`progtuning.tasks.squad`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from progtuning.errors import ProgtuningError

if TYPE_CHECKING:
    from datasets import DatasetDict

# (predictions, labels) -> {"metric_name": value}. For classification `predictions` are the
# logits, shape (n, num_labels); for regression the raw outputs, shape (n,) or (n, 1).
MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass(frozen=True)
class TextTask:
    """A sequence classification or regression task over one text or a text pair."""

    name: str
    text_columns: tuple[str, ...]  # one column, or two for a pair
    num_labels: int  # 1 means regression
    metric: MetricFn
    main_metric: str  # the key of `metric`'s result used for model selection and tables
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    # splits scored during and after training; "validation" first. MNLI adds "validation_mismatched".
    eval_splits: tuple[str, ...] = ("validation",)
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


SQUAD_TASKS = {"squad": "1.1", "squad_v1": "1.1", "squad-v1": "1.1", "squad_v2": "2.0", "squad-v2": "2.0"}


def is_squad(name: str) -> bool:
    return name.lower() in SQUAD_TASKS


def load_text_task(config) -> tuple[TextTask, "DatasetDict"]:
    """The task and its splits for a :class:`~progtuning.runs.config.TrainConfig`, subsampled as asked.

    Dispatch: ``files`` → the user's CSV/TSV/JSONL; a built-in name → the offline packages;
    a GLUE name → the hub or ``data_dir``. Anything else is a one-line error listing the choices.
    """
    import progtuning.tasks.builtin as builtin
    import progtuning.tasks.glue as glue
    import progtuning.tasks.textfiles as textfiles

    name = config.task
    if name == "files" or config.train_file:
        if not config.train_file:
            raise ProgtuningError("task 'files' needs --train-file PATH (CSV, TSV or JSONL)")
        task, data = textfiles.load_text_files(
            config.train_file,
            validation=config.validation_file,
            test=config.test_file,
            text_column=config.text_column,
            text_pair_column=config.text_pair_column,
            label_column=config.label_column,
            task_type=config.task_type,
            label_names=config.label_names,
            num_labels=config.num_labels,
            skip_bad_rows=getattr(config, "skip_bad_rows", False),
        )
    elif name in builtin.BUILTIN_TASKS:
        # Stratified subsets; the evaluation subset is drawn with a fixed seed, so runs with
        # different seeds are scored on the same examples.
        return builtin.load_builtin(name, config.max_train_examples, config.max_eval_examples, seed=config.seed)
    elif glue.is_glue_task(name):
        task, data = glue.load_glue(name, data_dir=config.data_dir)
    else:
        raise ProgtuningError(
            f"unknown task {name!r}: use a built-in task ({', '.join(builtin.BUILTIN_TASKS)}), "
            f"a GLUE task ({', '.join(glue.GLUE_TASKS)}), squad, squad_v2, or 'files' with --train-file"
        )
    return task, subsample(data, config.max_train_examples, config.max_eval_examples, config.seed)


def subsample(data: "DatasetDict", max_train: int | None, max_eval: int | None, seed: int) -> "DatasetDict":
    """Seeded subsets: ``max_train`` of train, ``max_eval`` of every other split."""
    from datasets import DatasetDict

    out = {}
    for split, dataset in data.items():
        limit = max_train if split == "train" else max_eval
        if limit is not None and len(dataset) > limit:
            dataset = dataset.shuffle(seed=seed).select(range(limit))
        out[split] = dataset
    return DatasetDict(out)
