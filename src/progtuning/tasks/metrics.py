"""Every score progtuning reports: accuracy, F1, Matthews, Pearson/Spearman, SQuAD exact match and F1,
and the exact match / token F1 of generated text.

One module, so each score has one definition and one rule for the undefined case:

* classification scores take logits ``(n, num_labels)`` (or class ids ``(n,)``) and integer labels;
* a correlation is undefined for fewer than two points or a constant input (e.g. an untrained
  regression head); it is reported as 0, never NaN, so "best checkpoint" comparisons stay valid;
* SQuAD answers are normalised as the official ``evaluate-v1.1.py`` / ``evaluate-v2.0.py`` do;
  generated text (:func:`generation_scores`) is compared under the same normalisation.

Task sources pick their metric from here (:data:`MetricFn`: ``(predictions, labels) -> {name: value}``).
Each classification and regression metric also carries ``resampled``, the same scores on many
resamples at once for a bootstrap (:mod:`progtuning.tasks.resampled`).
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np

from progtuning.errors import ProgtuningError
from progtuning.tasks.resampled import resampled_classification, resampled_regression

# (predictions, labels) -> {"metric_name": value}. For classification `predictions` are the
# logits, shape (n, num_labels); for regression the raw outputs, shape (n,) or (n, 1).
MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


# ----------------------------------------------------------------------------- classification
def class_ids(predictions: np.ndarray) -> np.ndarray:
    """Logits ``(n, num_labels)`` → class ids; 1-D input is taken as class ids already."""
    predictions = np.asarray(predictions)
    return predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions.astype(int)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score

    return {"accuracy": float(accuracy_score(np.asarray(labels).astype(int), class_ids(predictions)))}


def f1_and_accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """F1 of the positive class (paraphrase, duplicate), then accuracy: GLUE's MRPC/QQP scores."""
    result = {"f1": _binary_f1(class_ids(predictions), np.asarray(labels).astype(int))}
    return {**result, **accuracy(predictions, labels)}


def matthews(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Matthews correlation (GLUE's CoLA score); sklearn reports 0 where it is undefined."""
    from sklearn.metrics import matthews_corrcoef

    return {"matthews_correlation": float(matthews_corrcoef(np.asarray(labels).astype(int), class_ids(predictions)))}


accuracy.resampled = resampled_classification()  # type: ignore[attr-defined]
f1_and_accuracy.resampled = resampled_classification(2)  # type: ignore[attr-defined]
matthews.resampled = resampled_classification()  # type: ignore[attr-defined]


def classification_metric(num_labels: int, f1_name: str = "f1") -> MetricFn:
    """Accuracy plus F1 of class 1 (binary, reported as ``f1_name``) or macro F1 (multi-class)."""

    def metric(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from sklearn.metrics import f1_score

        preds, labels = class_ids(predictions), np.asarray(labels).astype(int)
        result = accuracy(preds, labels)
        if num_labels == 2:
            result[f1_name] = _binary_f1(preds, labels)
        else:
            result["macro_f1"] = float(
                f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)
            )
        return result

    metric.resampled = resampled_classification(num_labels, f1_name)  # type: ignore[attr-defined]
    return metric


def _binary_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, zero_division=0))


# ----------------------------------------------------------------------------- regression
def correlations(predictions: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) of two score vectors; 0 where a correlation is undefined (see the module docstring)."""
    from scipy.stats import pearsonr, spearmanr

    preds = np.asarray(predictions, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant inputs: scipy warns about precision
        pearson, spearman = float(pearsonr(preds, labels)[0]), float(spearmanr(preds, labels)[0])
    return (0.0 if np.isnan(pearson) else pearson), (0.0 if np.isnan(spearman) else spearman)


def regression_metric(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (as for STS-B), plus mean squared error."""
    pearson, spearman = correlations(predictions, labels)
    preds = np.asarray(predictions, dtype=np.float64).reshape(-1)
    mse = float(np.mean((preds - np.asarray(labels, dtype=np.float64).reshape(-1)) ** 2))
    return {"pearson": pearson, "spearman": spearman, "mse": mse}


regression_metric.resampled = resampled_regression  # type: ignore[attr-defined]


def pearson_and_spearmanr(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's STS-B scores, under the names of the GLUE metric (``spearmanr``)."""
    pearson, spearman = correlations(predictions, labels)
    return {"pearson": pearson, "spearmanr": spearman}


pearson_and_spearmanr.resampled = resampled_regression  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- SQuAD
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official SQuAD normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str, version_2: bool) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        # v2: "" against a no-answer gold is right; either side empty alone is wrong (v1 scores
        # an empty side 0 through the overlap check below)
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(answers: Any) -> list[str]:
    if isinstance(answers, Mapping):  # HF: {"text": [...], "answer_start": [...]}
        return list(answers["text"])
    return [a["text"] if isinstance(a, Mapping) else a for a in answers]  # official list, or strings


def squad_metrics(
    predictions: Mapping[str, str],
    references: Iterable[Mapping[str, Any]],
    version_2: bool = False,
) -> dict[str, float]:
    """Exact match and F1 (percent) of predicted answers against the gold answers.

    ``references``: rows with ``id`` and ``answers`` (a SQuAD ``Dataset`` split works). Each
    question scores its best match over its gold answers; a question without a prediction scores
    0. With ``version_2`` a question without gold answers expects ``""``, and the result adds
    ``HasAns_*`` / ``NoAns_*`` scores over the answerable / unanswerable questions.
    """
    if hasattr(references, "select_columns"):
        references = references.select_columns(["id", "answers"])
    exact: dict[str, list[float]] = {"HasAns": [], "NoAns": []}
    f1: dict[str, list[float]] = {"HasAns": [], "NoAns": []}
    for ref in references:
        golds = _gold_texts(ref["answers"])
        if version_2:
            golds = [g for g in golds if normalize_answer(g)]
        kind = "HasAns" if golds else "NoAns"
        golds = golds or [""]
        prediction = predictions.get(ref["id"])
        exact[kind].append(0.0 if prediction is None else max(_exact(prediction, g) for g in golds))
        f1[kind].append(0.0 if prediction is None else max(_f1(prediction, g, version_2) for g in golds))

    every_exact, every_f1 = exact["HasAns"] + exact["NoAns"], f1["HasAns"] + f1["NoAns"]
    if not every_exact:
        raise ProgtuningError("squad_metrics got no reference questions; pass the rows that were predicted")
    result = {
        "exact_match": 100.0 * float(np.mean(every_exact)),
        "f1": 100.0 * float(np.mean(every_f1)),
    }
    if version_2:
        result["total"] = float(len(every_exact))
        for kind in ("HasAns", "NoAns"):
            if exact[kind]:
                result[f"{kind}_exact"] = 100.0 * float(np.mean(exact[kind]))
                result[f"{kind}_f1"] = 100.0 * float(np.mean(f1[kind]))
                result[f"{kind}_total"] = float(len(exact[kind]))
    return result


# ----------------------------------------------------------------------------- generated text
def generation_scores(predictions: Iterable[str], references: Iterable[str]) -> dict[str, float]:
    """Exact match and token F1 of generated texts against one reference each, as fractions in 0..1.

    Texts are normalised as SQuAD answers are (lower case, no punctuation or articles), so
    ``"Spam."`` matches ``"spam"``; token F1 is SQuAD v1.1's (an empty side scores 0).
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ProgtuningError("generation_scores got no references: generate for at least one example")
    exact = [_exact(p, r) for p, r in zip(predictions, references)]
    f1 = [_f1(p, r, version_2=False) for p, r in zip(predictions, references)]
    return {"exact_match": float(np.mean(exact)), "token_f1": float(np.mean(f1))}
