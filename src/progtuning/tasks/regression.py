"""Sequence regression: one text or a text pair → one real-valued score (STS-B, review ratings)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from progtuning.errors import ProgtuningError
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

    def label_values(self, values: list, source: str) -> list[float]:
        scores = []
        for value in values:
            try:
                score = float(str(value).strip())
            except ValueError:
                score = math.nan
            if isinstance(value, bool) or not math.isfinite(score):
                raise ProgtuningError(f"label {value!r} in {source} is not a number: this run predicts a score")
            scores.append(score)
        return scores

    def prediction_rows(self, outputs: np.ndarray) -> list[dict]:
        return [{"prediction": round(float(score), 6)} for score in outputs.reshape(-1)]
