"""Sequence regression: one text or a text pair → one real-valued score (STS-B, review ratings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from progtuning.tasks.text import TextTask


@dataclass(frozen=True, kw_only=True)
class RegressionTask(TextTask):
    """Labels are float32 scores; the head has one output trained with mean squared error."""

    kind: ClassVar[str] = "regression"
    is_regression: ClassVar[bool] = True
    num_labels: ClassVar[int] = 1  # one output: the score
    label_names: ClassVar[None] = None

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1, "problem_type": "regression"}
