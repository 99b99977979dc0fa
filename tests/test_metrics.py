"""One definition per score: the correlation rule for undefined cases is the same everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from progtuning.tasks.glue import glue_task
from progtuning.tasks.metrics import correlations, pearson_and_spearmanr, regression_metric


@pytest.mark.parametrize(
    "predictions, labels",
    [
        (np.array([1.0]), np.array([2.0])),  # one point
        (np.full(4, 2.5), np.array([1.0, 3.0, 2.0, 4.0])),  # an untrained head: constant output
        (np.array([1.0, 3.0, 2.0, 4.0]), np.full(4, 3.0)),  # constant labels
    ],
)
def test_undefined_correlations_are_zero_everywhere(predictions, labels):
    assert correlations(predictions, labels) == (0.0, 0.0)
    assert pearson_and_spearmanr(predictions, labels) == {"pearson": 0.0, "spearmanr": 0.0}
    result = regression_metric(predictions, labels)
    assert (result["pearson"], result["spearman"]) == (0.0, 0.0) and np.isfinite(result["mse"])


def test_glue_and_the_other_regression_tasks_report_the_same_numbers():
    predictions, labels = np.array([[1.0], [3.0], [2.0], [4.0], [0.5]]), np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    glue = glue_task("stsb").metric(predictions, labels)
    ours = regression_metric(predictions, labels)
    assert glue["pearson"] == ours["pearson"] and glue["spearmanr"] == ours["spearman"]
    assert 0 < ours["spearman"] < 1
