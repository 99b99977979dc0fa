"""Task scores on many resamples of one split at once: the bootstrap's fast path.

A bootstrap rescores a run's outputs on every resample of its test examples. Calling the task's
metric function (:mod:`progtuning.tasks.metrics`, scikit-learn underneath) a thousand times per
run costs milliseconds per call; a study has hundreds of runs. A resample is a *weighting* of the
examples (how often each one was drawn), and every classification score here is a function of the
confusion matrix, every correlation one of weighted moments, so the scores of all resamples follow
from one matrix product. The metric functions in :mod:`progtuning.tasks.metrics` carry this form
as their ``resampled`` attribute, for the names it covers:

* classification (``accuracy``, ``f1`` of class 1, ``macro_f1``, ``matthews_correlation``):
  sklearn's definitions, 0 where sklearn's ``zero_division=0`` gives 0;
* regression: ``pearson`` (0 where a resample's predictions or labels are constant, as
  :func:`~progtuning.tasks.metrics.correlations` does). Spearman and MSE have no fast form.

:func:`resampled_scores` returns ``None`` for anything else, and the caller falls back to calling
the metric function per resample. tests/test_resampled.py checks every form against its metric
function on random resamples, and the bootstrap checks it again on each run's full split.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# (outputs, labels, weights (B, n), name) -> the named score on each of the B resamples, or None
ResampledFn = Callable[[np.ndarray, np.ndarray, np.ndarray, str], "np.ndarray | None"]


def resampled_scores(metric, name: str, outputs, labels, weights: np.ndarray) -> np.ndarray | None:
    """``metric(outputs[drawn], labels[drawn])[name]`` for every row of ``weights`` (draw counts), or None
    where ``metric`` has no fast form for ``name``."""
    fast = getattr(metric, "resampled", None)
    if fast is None:
        return None
    return fast(np.asarray(outputs), np.asarray(labels), np.asarray(weights, dtype=np.float64), name)


def draw_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """``(B, n)`` how often each example appears in each resample of index ``draws`` ``(B, n)``."""
    rows = draws.shape[0]
    flat = (draws + (np.arange(rows) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


# ----------------------------------------------------------------------------- classification
def confusions(preds: np.ndarray, labels: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
    """``(B, K, K)`` weighted confusion matrices, rows = true class, columns = predicted class."""
    cells = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    used, position = np.unique(cells, return_inverse=True)
    onehot = np.zeros((len(cells), len(used)))
    onehot[np.arange(len(cells)), position] = 1.0
    counts = np.zeros((weights.shape[0], num_classes * num_classes))
    counts[:, used] = weights @ onehot
    return counts.reshape(-1, num_classes, num_classes)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, 0.0, numerator / safe)


def _f1_per_class(conf: np.ndarray) -> np.ndarray:
    true_positive = np.diagonal(conf, axis1=1, axis2=2)
    return _divide(2 * true_positive, conf.sum(axis=2) + conf.sum(axis=1))  # 2TP / (2TP + FN + FP)


def _matthews(conf: np.ndarray) -> np.ndarray:
    # sklearn's matthews_corrcoef, on each confusion matrix
    t_sum, p_sum = conf.sum(axis=2), conf.sum(axis=1)
    n_correct = np.trace(conf, axis1=1, axis2=2)
    n_samples = conf.sum(axis=(1, 2))
    cov_ytyp = n_correct * n_samples - (t_sum * p_sum).sum(axis=1)
    cov_ypyp = n_samples**2 - (p_sum * p_sum).sum(axis=1)
    cov_ytyt = n_samples**2 - (t_sum * t_sum).sum(axis=1)
    return _divide(cov_ytyp, np.sqrt(cov_ytyt * cov_ypyp))


def resampled_classification(num_labels: int | None = None, f1_name: str = "f1") -> ResampledFn:
    """The fast form of a classification metric over ``num_labels`` classes (None: as many as occur)."""

    def scores(outputs, labels, weights, name):
        from progtuning.tasks.metrics import class_ids

        preds, labels = class_ids(outputs), labels.astype(np.int64)
        classes = num_labels or int(max(preds.max(initial=0), labels.max(initial=0))) + 1
        conf = confusions(preds, labels, weights, classes)
        if name == "accuracy":
            return _divide(np.trace(conf, axis1=1, axis2=2), conf.sum(axis=(1, 2)))
        if name == f1_name and classes == 2:
            return _f1_per_class(conf)[:, 1]  # F1 of class 1
        if name == "macro_f1":
            return _f1_per_class(conf).mean(axis=1)
        if name == "matthews_correlation":
            return _matthews(conf)
        return None

    return scores


# ----------------------------------------------------------------------------- regression
def resampled_regression(outputs, labels, weights, name):
    """The fast form of the regression metrics: ``pearson`` only."""
    if name != "pearson":
        return None
    x = np.asarray(outputs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    drawn = weights > 0
    constant = (_spread(x, drawn) == 0) | (_spread(y, drawn) == 0)
    total = weights.sum(axis=1)
    dx = x[None, :] - ((weights @ x) / total)[:, None]
    dy = y[None, :] - ((weights @ y) / total)[:, None]
    cov = (weights * dx * dy).sum(axis=1)
    var = (weights * dx * dx).sum(axis=1) * (weights * dy * dy).sum(axis=1)
    pearson = _divide(cov, np.sqrt(var))
    return np.where(constant | ~np.isfinite(pearson), 0.0, np.clip(pearson, -1.0, 1.0))


def _spread(values: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    high = np.where(drawn, values[None, :], -np.inf).max(axis=1)
    low = np.where(drawn, values[None, :], np.inf).min(axis=1)
    return high - low
