"""A user's own CSV/TSV/JSONL task: every format, the label mapping, and every user error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from progtuning.errors import ProgtuningError
from progtuning.tasks.textfiles import load_text_files

FIXTURES = Path(__file__).parent / "fixtures" / "textfiles"


def f(name: str) -> str:
    return str(FIXTURES / name)


def _fails(match: str, *args, **kwargs) -> str:
    with pytest.raises(ProgtuningError, match=match) as info:
        load_text_files(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_csv_with_string_labels_and_all_three_files():
    task, data = load_text_files(f("train.csv"), f("validation.csv"), f("test.csv"))
    assert list(data) == ["train", "validation", "test"]
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (23, 3, 2)
    assert data["train"].column_names == ["text", "label"]
    assert task.label_names == ("negative", "neutral", "positive")  # sorted
    assert task.num_labels == 3 and task.main_metric == "accuracy"
    assert task.eval_splits == ("validation", "test") and task.name == "train"
    assert data["validation"]["label"] == [2, 0, 1]  # same mapping in every split
    assert data["test"]["label"] == [2, 0]
    texts = data["train"]["text"]
    assert "mixed feelings, honestly\nbut fine" in texts  # quoted comma and newline
    assert "NA" in texts  # not read as missing
    assert task.metric(np.eye(3)[[2, 0, 0]], np.array([2, 0, 1]))["accuracy"] == pytest.approx(2 / 3)


def test_train_only_splits_off_a_seeded_stratified_validation():
    task, data = load_text_files(f("train.csv"))
    assert list(data) == ["train", "validation"] and task.eval_splits == ("validation",)
    assert (len(data["train"]), len(data["validation"])) == (20, 3)
    assert sorted(data["validation"]["label"]) == [0, 1, 2]  # one of each label
    assert not set(data["train"]["text"]) & set(data["validation"]["text"])
    _, again = load_text_files(f("train.csv"))
    assert again["validation"]["text"] == data["validation"]["text"]


def test_label_that_would_exist_only_in_validation_stays_in_train(tmp_path):
    # 20 rows, one label with a single example: stratifying is impossible, and the plain seeded
    # split puts row 18 into validation, where it could never have been learned
    rows = [f"text {i},{'rare' if i == 18 else 'ab'[i % 2]}" for i in range(20)]
    path = tmp_path / "rare.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    task, data = load_text_files(str(path))
    assert "text 18" in data["train"]["text"]
    assert (len(data["train"]), len(data["validation"])) == (19, 1)
    assert task.label_names == ("a", "b", "rare")


def test_tsv_sentence_pairs_with_integer_labels():
    task, data = load_text_files(
        f("pairs_train.tsv"), f("pairs_validation.tsv"), text_column="sentence1", text_pair_column="sentence2"
    )
    assert task.text_columns == ("sentence1", "sentence2")
    assert data["train"].column_names == ["sentence1", "sentence2", "label"]
    assert task.num_labels == 2 and task.label_names is None  # 0/1 kept as ids
    assert data["train"]["label"] == [1, 0, 1, 0, 1, 0, 1]
    assert data["train"]["sentence1"][2] == 'He said "hi".'  # quotes are literal in TSV
    assert data["train"]["sentence1"][6] == '"Go home," she said.'  # even at the start of a field
    assert set(task.metric(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 0]))) == {"accuracy", "f1"}


def test_jsonl_regression():
    task, data = load_text_files(
        f("ratings.jsonl"), f("ratings_validation.jsonl"), text_column="review", label_column="score",
        task_type="regression",
    )
    assert task.is_regression and task.main_metric == "pearson" and task.label_names is None
    assert data["train"].features["label"].dtype == "float32"
    assert data["train"]["label"][:2] == pytest.approx([4.5, 3.2])
    assert data["validation"]["label"] == [3.0, -2.5]
    assert {"pearson", "spearman"} <= set(task.metric(np.array([1.0, 2.0]), np.array([0.5, 3.0])))


def test_regression_train_only_split_and_json_array_with_star_labels():
    _, data = load_text_files(f("ratings.jsonl"), text_column="review", label_column="score", task_type="regression")
    assert (len(data["train"]), len(data["validation"])) == (10, 2)
    task, stars = load_text_files(f("stars.json"), label_column="stars", name="stars")
    assert task.name == "stars" and task.label_names == ("1", "2", "3") and task.num_labels == 3
    assert set(stars["train"]["label"]) == {0, 1, 2}


def test_label_names_and_num_labels_map_and_check_range():
    task, data = load_text_files(f("out_of_range.jsonl"), f("out_of_range.jsonl"), label_names=["x", "y", "z"])
    assert task.label_names == ("x", "y", "z") and data["validation"]["label"] == [0, 1, 2]
    _fails(r"label 2 in train file .*out_of_range\.jsonl' is out of range: with 2 labels the ids are 0\.\.1",
           f("out_of_range.jsonl"), label_names=["neg", "pos"])
    _fails(r"label 2 .* out of range", f("out_of_range.jsonl"), num_labels=2)
    task, _ = load_text_files(f("train.csv"), f("validation.csv"), label_names=["positive", "negative", "neutral"])
    assert task.label_names == ("positive", "negative", "neutral")
    _fails(r"label '\w+' is not one of label_names \(positive, negative\)",
           f("train.csv"), label_names=["positive", "negative"])


def test_unseen_validation_label():
    message = _fails(r"label 'mixed' in validation file .* never appears in train file",
                     f("train.csv"), f("validation_unseen_label.csv"))
    assert "validation_unseen_label.csv" in message


def test_missing_columns_name_the_existing_ones(tmp_path):
    message = _fails(r"train file .* has no column 'sentence'", f("train.csv"), text_column="sentence")
    assert "(it has: id, text, label)" in message and "text_column" in message
    _fails(r"no column 'sentiment' .*label_column", f("train.csv"), label_column="sentiment")
    _fails(r"no column 'hypothesis' .*text_pair_column", f("train.csv"), text_pair_column="hypothesis")
    half = tmp_path / "half.tsv"
    half.write_text("sentence1\tlabel\nA bird sings.\t1\n")
    _fails(r"validation file .*half\.tsv' has no column 'sentence2' \(it has: sentence1, label\)",
           f("pairs_train.tsv"), str(half), text_column="sentence1", text_pair_column="sentence2")


def test_unreadable_missing_and_empty_files(tmp_path):
    _fails(r"train file '.*nope\.csv' does not exist", f("nope.csv"))
    _fails(r"test file '.*nope\.jsonl' does not exist", f("train.csv"), test=f("nope.jsonl"))
    notes = tmp_path / "notes.txt"
    notes.write_text("text,label\n")
    _fails(r"cannot tell the format .* \.csv, \.tsv or \.jsonl", str(notes))
    _fails(r"validation file .*header_only\.csv' has no rows", f("train.csv"), f("header_only.csv"))
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    _fails(r"train file .*blank\.csv' has no rows", str(blank))
    _fails(r"cannot read train file .*broken\.jsonl' as JSONL: line 2 is not valid JSON", f("broken.jsonl"))
    _fails(r"latin1\.csv' is not UTF-8", f("latin1.csv"))
    _fails(r"row 2 has an empty 'text'", f("empty_cell.csv"))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\na,1\nb,0,extra,more\n")
    _fails(r"cannot read train file .*ragged\.csv' as CSV", str(ragged))


def test_bad_options_and_bad_labels(tmp_path):
    _fails(r"unknown task_type 'ranking'", f("train.csv"), task_type="ranking")
    _fails(r"label 'neutral' in train file .* is not a number", f("train.csv"), task_type="regression")
    _fails(r"label_names and num_labels are for classification", f("ratings.jsonl"), task_type="regression",
           text_column="review", label_column="score", label_names=["a", "b"])
    _fails(r"label 4\.5 is not a class: use task_type='regression'", f("ratings.jsonl"),
           text_column="review", label_column="score")
    one = tmp_path / "one.csv"
    one.write_text("text,label\nonly,0.5\n")  # (one row of a class task is refused earlier: a single class)
    _fails(r"too few rows to split off validation", str(one), task_type="regression")
