"""Sequence classification: one text or a text pair → one of K classes (SST-2, MNLI, TREC, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from progtuning.errors import ProgtuningError
from progtuning.tasks.text import TextTask


@dataclass(frozen=True, kw_only=True)
class ClassificationTask(TextTask):
    """Labels are class ids 0..``num_labels``-1; ``label_names`` (if known) name them in id order."""

    num_labels: int
    label_names: tuple[str, ...] | None = None

    kind: ClassVar[str] = "classification"

    def check_labels(self, split: str, labels: np.ndarray) -> None:
        bad = labels[(labels < 0) | (labels >= self.num_labels)]
        if bad.size:
            raise ProgtuningError(
                f"{split} split of {self.name} has label {bad[0]} outside 0..{self.num_labels - 1}: fix the labels"
            )

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_labels": self.num_labels}
        if self.label_names:
            kwargs["id2label"] = dict(enumerate(self.label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(self.label_names)}
        return kwargs
