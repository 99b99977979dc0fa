"""What a text task is: columns, labels, metric — the one shape every task source returns.

GLUE (:mod:`progtuning.glue`), the built-in offline tasks (:mod:`progtuning.builtin`) and a
user's own CSV/TSV/JSONL files (:mod:`progtuning.textfiles`) all describe themselves with a
:class:`TextTask` and hand back a ``datasets.DatasetDict``; :mod:`progtuning.train` only ever sees
these two objects. SQuAD is extractive QA, not a text task, and lives in :mod:`progtuning.squad`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

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
