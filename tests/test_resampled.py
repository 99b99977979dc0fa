"""The fast resampled scores equal the task's metric functions on the resampled examples.

For each metric with a fast form: draw resamples of a split (with replacement), score each one by
calling the metric function on the drawn examples, and compare with the fast form over the draw
counts. Sums of integer counts are exact, so classification scores agree to float rounding of one
division; Pearson is a two-pass weighted formula against scipy's, so the tolerance is 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest

from progtuning.tasks import metrics
from progtuning.tasks.resampled import draw_counts, resampled_scores

RESAMPLES = 40


def _draws(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def _check(metric, name, outputs, labels, draws):
    fast = resampled_scores(metric, name, outputs, labels, draw_counts(draws, len(labels)))
    slow = np.array([metric(outputs[i], labels[i])[name] for i in draws])
    assert fast is not None
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9)


@pytest.mark.parametrize("classes", [2, 3, 6])
def test_classification_scores(classes):
    rng = np.random.default_rng(classes)
    n = 60
    labels = rng.integers(0, classes, n)
    # mostly right, with some classes rare: resamples where a class is never predicted or never true
    logits = rng.normal(size=(n, classes)) + 2.5 * np.eye(classes)[labels] * (rng.random(n) < 0.7)[:, None]
    metric = metrics.classification_metric(classes)
    names = ["accuracy", "f1"] if classes == 2 else ["accuracy", "macro_f1"]
    for name in names:
        _check(metric, name, logits, labels, _draws(n))
    _check(metrics.accuracy, "accuracy", logits, labels, _draws(n, 1))
    _check(metrics.matthews, "matthews_correlation", logits, labels, _draws(n, 2))
    if classes == 2:
        _check(metrics.f1_and_accuracy, "f1", logits, labels, _draws(n, 3))


def test_degenerate_resamples_score_as_the_functions_do():
    # spam-like: 3 positives in 30; many resamples draw no positive at all (F1 0 by zero_division)
    labels = np.array([1, 1, 1] + [0] * 27)
    preds = np.eye(2)[np.array([1, 0, 0] + [0] * 26 + [1])]
    _check(metrics.classification_metric(2), "f1", preds, labels, _draws(30, 4))
    _check(metrics.matthews, "matthews_correlation", preds, labels, _draws(30, 5))
    # a resample that draws one example only: Matthews and Pearson are 0, as the functions say
    one = np.zeros((1, 30), dtype=np.int64)
    _check(metrics.matthews, "matthews_correlation", preds, labels, one)
    _check(metrics.regression_metric, "pearson", np.linspace(0, 1, 30), np.linspace(1, 3, 30), one)


def test_pearson():
    rng = np.random.default_rng(7)
    labels = rng.normal(size=50)
    outputs = labels + rng.normal(scale=0.7, size=50)
    _check(metrics.regression_metric, "pearson", outputs, labels, _draws(50, 6))
    _check(metrics.pearson_and_spearmanr, "pearson", outputs[:, None], labels, _draws(50, 7))  # (n, 1) outputs
    constant = np.full(50, 0.3)
    _check(metrics.regression_metric, "pearson", constant, labels, _draws(50, 8))


def test_scores_without_a_fast_form_say_so():
    counts = draw_counts(_draws(10), 10)
    outputs, labels = np.linspace(0, 1, 10), np.linspace(0, 2, 10)
    assert resampled_scores(metrics.regression_metric, "spearman", outputs, labels, counts) is None
    assert resampled_scores(metrics.regression_metric, "mse", outputs, labels, counts) is None
    assert resampled_scores(lambda o, y: {"x": 1.0}, "x", outputs, labels, counts) is None


def test_draw_counts_count_each_draw():
    draws = np.array([[0, 0, 2], [1, 2, 2]])
    assert draw_counts(draws, 3).tolist() == [[2, 0, 1], [0, 1, 2]]
