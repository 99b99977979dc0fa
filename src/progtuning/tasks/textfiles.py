"""A user's own text task from CSV, TSV or JSONL files: reading, label mapping and checks.

This module owns :func:`load_text_files`, which turns one to three files (train, and optionally
validation and test) into a :class:`~progtuning.tasks.text.TextTask` and a ``datasets.DatasetDict``.

Formats, by file extension:

* ``.csv`` — comma-separated with a header row; quoted fields may hold commas and newlines.
* ``.tsv`` / ``.tab`` — tab-separated with a header row, read without quote handling (as GLUE's
  TSV files are), so a ``"`` inside a text is just a character.
* ``.jsonl`` — one JSON object per line; ``.json`` — the same, or one JSON array of objects.

All files are UTF-8 (a byte-order mark is fine). Only an empty (or blank) cell counts as missing:
texts such as ``NA`` or ``null`` are kept as written. A row with an empty text or label is refused,
naming the first one; with ``skip_bad_rows`` such rows are dropped and counted instead.

Labels. Regression labels must be numbers and become float32. Classification labels become ids
0..K-1 in a ``label`` column, with one mapping for all splits, built from the train file:

* with ``label_names``: a label equal to one of the names gets that name's position; integer
  labels are otherwise taken as ids and must lie in ``0..len(label_names)-1``;
* with ``num_labels``: integer labels must lie in ``0..num_labels-1``;
* otherwise integer labels (``1``, ``"1"``, ``1.0``) that are exactly 0..K-1 are kept as ids, and
  any other labels (strings, or integers such as 1..5 stars) are sorted and numbered in that
  order, their text becoming the label names.

Refused, with the same message in every format: numbers that are not integers as classes (use
regression), labels that mix numbers and names (``pos`` beside ``0``/``1``), and a train file with a
single class. A label in validation or test that never appears in train is an error. Without a validation file,
10% of train is split off (stratified by label where every label has two or more examples,
``random_state=0``); a validation example whose label is then missing from train moves back to
train. Every mistake raises :class:`~progtuning.errors.ProgtuningError` with a one-line message.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from progtuning.errors import ProgtuningError
from progtuning.tasks.classification import ClassificationTask
from progtuning.tasks.metrics import classification_metric, regression_metric
from progtuning.tasks.regression import RegressionTask
from progtuning.tasks.text import TextTask

VALIDATION_FRACTION = 0.1
SPLIT_SEED = 0

_FORMATS = {".csv": "CSV", ".tsv": "TSV", ".tab": "TSV", ".jsonl": "JSONL", ".json": "JSON"}


# ---------------------------------------------------------------------------------------------
# reading


def _read_json_records(path: Path, fmt: str) -> list:
    text = path.read_text(encoding="utf-8-sig")
    if fmt == "JSON" and text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number} is not valid JSON ({error.msg})") from None
    return records


def _read(path: str | Path, split: str) -> pd.DataFrame:
    p = Path(path).expanduser()
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ProgtuningError(
            f"cannot tell the format of {split} file '{path}': name it .csv, .tsv or .jsonl"
        )
    if p.is_dir():
        raise ProgtuningError(f"{split} file '{path}' is a directory, not a file: give the file inside it")
    if not p.is_file():
        raise ProgtuningError(f"{split} file '{path}' does not exist: check the path")
    try:
        if fmt in ("CSV", "TSV"):
            frame = pd.read_csv(
                p,
                sep="," if fmt == "CSV" else "\t",
                quoting=csv.QUOTE_MINIMAL if fmt == "CSV" else csv.QUOTE_NONE,
                encoding="utf-8-sig",
                dtype=str,  # "1.50" stays "1.50"; labels are parsed below, the same way for all formats
                keep_default_na=False,  # a text reading "NA" or "null" is still a text
                na_values=[""],
            )
        else:
            records = _read_json_records(p, fmt)
            if not all(isinstance(r, dict) for r in records):
                raise ValueError("every line must be a JSON object")
            frame = pd.DataFrame.from_records(records)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except UnicodeDecodeError:
        raise ProgtuningError(f"{split} file '{path}' is not UTF-8: save it as UTF-8") from None
    except (ValueError, pd.errors.ParserError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProgtuningError(f"cannot read {split} file '{path}' as {fmt}: {reason}") from None
    if len(frame) == 0:
        raise ProgtuningError(f"{split} file '{path}' has no rows: give it at least one example")
    return frame


def _check_columns(frame: pd.DataFrame, columns: dict[str, str], split: str, path: str | Path) -> None:
    for column, option in columns.items():
        if column not in frame.columns:
            existing = ", ".join(str(c) for c in frame.columns)
            raise ProgtuningError(
                f"{split} file '{path}' has no column '{column}' (it has: {existing}): set {option}"
            )


def _drop_bad_rows(
    frame: pd.DataFrame, columns: Sequence[str], split: str, path: str | Path, skip: bool
) -> tuple[pd.DataFrame, int]:
    """Rows with an empty text or label: refused (the first is named), or dropped and counted with ``skip``."""
    bad = np.zeros(len(frame), dtype=bool)
    first: tuple[int, str] | None = None
    for column in columns:
        values = frame[column]
        empty = values.isna().to_numpy() | values.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy()
        if empty.any() and (first is None or int(np.argmax(empty)) < first[0]):
            first = (int(np.argmax(empty)), column)
        bad |= empty
    if first is None:
        return frame, 0
    if not skip:
        raise ProgtuningError(
            f"{split} file '{path}' row {first[0] + 1} has an empty '{first[1]}' ({int(bad.sum())} such rows): "
            "fill them in or drop them, or pass --skip-bad-rows to skip and count them"
        )
    kept = frame[~bad].reset_index(drop=True)
    if len(kept) == 0:
        raise ProgtuningError(f"{split} file '{path}' has no row with a text and a label: check the columns")
    return kept, int(bad.sum())


# ---------------------------------------------------------------------------------------------
# labels


def _as_int(value: object) -> int | None:
    """The value as a class id if it is an integer (1, "1" or 1.0, not True), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+(\.0*)?\s*", value):
        return int(float(value)) if "." in value else int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return None


def _as_number(value: object) -> float | None:
    """The value as a finite number (1.5, "1.5", "2e-1"), else None; booleans are not numbers."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _class_labels(
    raw: dict[str, list],
    paths: dict[str, str | Path],
    label_names: Sequence[str] | None,
    num_labels: int | None,
) -> tuple[dict[str, list[int]], tuple[str, ...] | None, int]:
    """Map every split's raw labels to ids with one mapping; returns (ids, names, num_labels)."""
    every = [v for values in raw.values() for v in values]
    named = {str(n) for n in label_names} if label_names is not None else set()
    for value in every:
        # the same message for every format: a CSV/TSV cell "1.5" is a string, a JSON 1.5 a float
        if _as_int(value) is None and _as_number(value) is not None and str(value) not in named:
            raise ProgtuningError(
                f"label {value} is not a class: use task_type='regression' for numeric targets"
            )
    integers = all(_as_int(v) is not None for v in every)
    if not integers and label_names is None and any(_as_int(v) is not None for v in every):
        numbers = sorted({str(v) for v in every if _as_int(v) is not None})[:3]
        words = sorted({str(v) for v in every if _as_int(v) is None})[:3]
        raise ProgtuningError(
            f"labels mix numbers ({', '.join(numbers)}) and names ({', '.join(repr(w) for w in words)}): "
            "use one kind of label in every file, or give label_names"
        )
    distinct = {_as_int(v) if integers else str(v) for v in raw["train"]}
    if len(distinct) < 2:
        raise ProgtuningError(
            f"train file '{paths['train']}' has a single label ({next(iter(distinct))!r}): classification needs "
            "examples of at least two classes (or use task_type='regression' for numeric targets)"
        )

    names: tuple[str, ...] | None
    if label_names is not None:
        names = tuple(str(n) for n in label_names)
        if len(set(names)) != len(names) or not names:
            raise ProgtuningError(f"label_names {list(names)} must be distinct and non-empty")
        by_name = {n: i for i, n in enumerate(names)}
        if all(str(v) in by_name for v in every):
            to_id = lambda v: by_name[str(v)]  # noqa: E731
        elif integers:
            to_id = _as_int
        else:
            bad = next(v for v in every if str(v) not in by_name)
            raise ProgtuningError(
                f"label '{bad}' is not one of label_names ({', '.join(names)}): fix the file or the names"
            )
        count = len(names)
    elif integers and num_labels is not None:
        names, to_id, count = None, _as_int, num_labels
    else:
        train_values = sorted({_as_int(v) if integers else str(v) for v in raw["train"]})
        if integers and train_values == list(range(len(train_values))):
            names, to_id = None, _as_int
        else:
            names = tuple(str(v) for v in train_values)
            by_value = {v: i for i, v in enumerate(train_values)}
            # None (a label train never had) is reported below
            to_id = lambda v: by_value.get(_as_int(v) if integers else str(v))  # noqa: E731
        count = len(train_values)
        if num_labels is not None:
            if count > num_labels:
                raise ProgtuningError(
                    f"train has {count} different labels but num_labels={num_labels}: raise num_labels"
                )
            count = num_labels

    ids = {split: [to_id(v) for v in values] for split, values in raw.items()}
    train_ids = set(ids["train"])
    explicit = label_names is not None or num_labels is not None
    for split, values in ids.items():
        for value, label_id in zip(raw[split], values):
            if explicit and not 0 <= label_id < count:
                raise ProgtuningError(
                    f"label {value} in {split} file '{paths[split]}' is out of range: "
                    f"with {count} labels the ids are 0..{count - 1}"
                )
            if label_id not in train_ids:
                raise ProgtuningError(
                    f"label '{value}' in {split} file '{paths[split]}' never appears in train file "
                    f"'{paths['train']}': fix the label or add training examples for it"
                )
    return ids, names, count


def _regression_labels(raw: dict[str, list], paths: dict[str, str | Path]) -> dict[str, list[float]]:
    out = {}
    for split, values in raw.items():
        converted = []
        for value in values:
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(value, (bool, np.bool_)) or not math.isfinite(number):
                raise ProgtuningError(
                    f"label '{value}' in {split} file '{paths[split]}' is not a number: "
                    "regression needs numeric labels (or use task_type='classification')"
                )
            converted.append(number)
        out[split] = converted
    return out


# ---------------------------------------------------------------------------------------------
# splitting off validation


def _split_off_validation(labels: list, stratify: bool) -> tuple[list[int], list[int]]:
    index = np.arange(len(labels))
    strata = np.asarray(labels) if stratify else None
    try:
        train, validation = train_test_split(
            index, test_size=VALIDATION_FRACTION, stratify=strata, random_state=SPLIT_SEED
        )
    except ValueError:  # a label with a single example, or fewer validation rows than labels
        train, validation = train_test_split(index, test_size=VALIDATION_FRACTION, random_state=SPLIT_SEED)
    if stratify:
        # a label that landed only in validation could never be learned: give it back to train
        seen = {labels[i] for i in train}
        back = [i for i in validation if labels[i] not in seen]
        train = np.concatenate([train, back]).astype(int)
        validation = np.asarray([i for i in validation if labels[i] in seen], dtype=int)
    return sorted(train.tolist()), sorted(validation.tolist())


# ---------------------------------------------------------------------------------------------
# public entry point


def load_text_files(
    train: str | Path,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    task_type: str = "classification",
    label_names: Sequence[str] | None = None,
    *,
    num_labels: int | None = None,
    name: str | None = None,
    skip_bad_rows: bool = False,
) -> tuple[TextTask, datasets.DatasetDict]:
    """Load a user's CSV/TSV/JSONL files as a text task (see the module docstring for the rules).

    The returned DatasetDict has splits ``train``, ``validation`` and (if given) ``test``, with
    the text column(s) under their own names and the labels in ``label``. With ``skip_bad_rows``
    a row with an empty text or label is dropped instead of refused; ``task.extra["skipped_rows"]``
    counts them per file.
    """
    if task_type not in ("classification", "regression"):
        raise ProgtuningError(f"unknown task_type '{task_type}': use 'classification' or 'regression'")
    regression = task_type == "regression"
    if regression and (label_names is not None or num_labels is not None):
        raise ProgtuningError(
            "label_names and num_labels are for classification: drop them, or set task_type='classification'"
        )
    if num_labels is not None and num_labels < 2:
        raise ProgtuningError(f"num_labels={num_labels} is too small: classification needs at least 2 labels")
    text_columns = (text_column,) if text_pair_column is None else (text_column, text_pair_column)
    if "label" in text_columns:
        raise ProgtuningError(
            "a text column cannot be called 'label' (that name holds the labels): rename it in the file"
        )

    paths = {s: p for s, p in (("train", train), ("validation", validation), ("test", test)) if p is not None}
    frames = {split: _read(path, split) for split, path in paths.items()}
    options = {**dict(zip(text_columns, ("text_column", "text_pair_column"))), label_column: "label_column"}
    skipped = {}
    for split in list(frames):
        _check_columns(frames[split], options, split, paths[split])
        frames[split], skipped[split] = _drop_bad_rows(frames[split], list(options), split, paths[split], skip_bad_rows)
    texts = {
        split: {col: [str(v) for v in frame[col].tolist()] for col in text_columns} for split, frame in frames.items()
    }
    raw = {split: frame[label_column].tolist() for split, frame in frames.items()}

    if regression:
        labels: dict[str, list] = _regression_labels(raw, paths)
        names, count = None, 1
    else:
        labels, names, count = _class_labels(raw, paths, label_names, num_labels)

    if "validation" not in frames:
        too_small = f"train file '{train}' has too few rows to split off validation: give a validation file"
        if len(labels["train"]) < 2:
            raise ProgtuningError(too_small)
        keep, held = _split_off_validation(labels["train"], stratify=not regression)
        if not held:
            raise ProgtuningError(too_small)
        whole_texts, whole_labels = texts.pop("train"), labels.pop("train")
        for split, rows in (("train", keep), ("validation", held)):
            texts[split] = {col: [values[i] for i in rows] for col, values in whole_texts.items()}
            labels[split] = [whole_labels[i] for i in rows]

    features = datasets.Features(
        {
            **{col: datasets.Value("string") for col in text_columns},
            # float64 labels break MSELoss against fp32 outputs
            "label": datasets.Value("float32" if regression else "int64"),
        }
    )
    splits = [s for s in ("train", "validation", "test") if s in labels]
    data = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({**texts[s], "label": labels[s]}, features=features) for s in splits}
    )
    common = dict(
        name=name or Path(train).stem,
        text_columns=text_columns,
        eval_splits=tuple(s for s in splits if s != "train"),
        description=f"text files: {', '.join(f'{s}={p}' for s, p in paths.items())}",
        extra={"files": {s: str(p) for s, p in paths.items()}, "task_type": task_type, "skipped_rows": skipped},
    )
    if regression:
        return RegressionTask(metric=regression_metric, main_metric="pearson", **common), data
    task = ClassificationTask(
        metric=classification_metric(count), main_metric="accuracy", num_labels=count, label_names=names, **common
    )
    return task, data
