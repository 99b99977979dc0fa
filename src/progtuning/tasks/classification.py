"""Sequence classification: one text or a text pair → one of K classes (SST-2, MNLI, TREC, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from progtuning.errors import ProgtuningError
from progtuning.tasks.text import TextTask


def _as_class_id(value: Any) -> int | None:
    """1, "1", 1.0 → 1; anything else (a name, 1.5, True) → None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


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

    def label_values(self, values: list, source: str) -> list[int]:
        """Names as in training (a name → its id), or class ids 0..K-1."""
        by_name = {name: i for i, name in enumerate(self.label_names or ())}
        ids = []
        for value in values:
            text = str(value).strip()
            if text in by_name:
                ids.append(by_name[text])
                continue
            number = _as_class_id(value)
            if number is None or not 0 <= number < self.num_labels:
                known = ", ".join(self.label_names) if self.label_names else f"ids 0..{self.num_labels - 1}"
                raise ProgtuningError(f"label {value!r} in {source} is not one of this run's labels ({known})")
            ids.append(number)
        return ids

    def prediction_rows(self, outputs: np.ndarray) -> list[dict]:
        """The predicted label (its name if known) and each class's probability (softmax of the logits)."""
        logits = outputs.reshape(len(outputs), -1).astype(np.float64)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        names = list(self.label_names) if self.label_names else [str(i) for i in range(self.num_labels)]
        rows = []
        for row in probabilities:
            best = int(row.argmax())
            rows.append({
                "prediction": names[best] if self.label_names else best,
                "probabilities": {name: round(float(p), 6) for name, p in zip(names, row)},
            })
        return rows

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_labels": self.num_labels}
        if self.label_names:
            kwargs["id2label"] = dict(enumerate(self.label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(self.label_names)}
        return kwargs
