"""A text task from a dataset on the Hugging Face hub, by name (``--dataset imdb``), through ``datasets.load_dataset``.

``load_hub_dataset`` reads the dataset (``name`` and optional ``config_name``, as ``load_dataset``
takes them; a local dataset folder works too) and turns it into a
:class:`~progtuning.tasks.text.TextTask` exactly as the user's own files are
(:mod:`progtuning.tasks.textfiles`): the same label rules (a ``ClassLabel`` feature gives the label
names), ``text_column`` / ``text_pair_column`` / ``label_column`` name the columns, and
``task_type`` says classification or regression.

Splits: ``train``; ``validation`` (or ``valid`` / ``dev``), else 10% of train split off as for files;
``test`` if present and labelled (GLUE-style test splits whose labels are all -1 are dropped, with
a note). Other splits (IMDB's ``unsupervised``) are ignored. Offline, or for an unknown name, the
error is one line that says so.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from progtuning.errors import ProgtuningError

logger = logging.getLogger("progtuning")

_VALIDATION_NAMES = ("validation", "valid", "dev")


def load_hub_dataset(
    name: str,
    config_name: str | None = None,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    task_type: str = "classification",
    label_names: list | None = None,
    num_labels: int | None = None,
):
    """The dataset ``name`` as a text task and its ``train`` / ``validation`` / ``test`` splits."""
    import datasets

    from progtuning.tasks import textfiles
    from progtuning.tasks.classification import ClassificationTask
    from progtuning.tasks.metrics import classification_metric, regression_metric
    from progtuning.tasks.regression import RegressionTask

    if task_type not in ("classification", "regression"):
        raise ProgtuningError(f"unknown task_type '{task_type}': use 'classification' or 'regression'")
    raw = _load(name, config_name)
    splits = _choose_splits(raw, name, label_column)
    text_columns = (text_column,) if text_pair_column is None else (text_column, text_pair_column)
    for split, dataset in splits.items():
        missing = [c for c in (*text_columns, label_column) if c not in dataset.column_names]
        if missing:
            raise ProgtuningError(
                f"dataset {name} ({split}) has no column(s) {', '.join(missing)} (it has: "
                f"{', '.join(dataset.column_names)}): set text_column / label_column"
            )
    where = {split: f"{name}[{split}]" for split in splits}
    feature = splits["train"].features[label_column]
    if label_names is None and isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
    values = {split: dataset[label_column] for split, dataset in splits.items()}

    # The same label rules as the user's files (one mapping, built from train, one-line errors).
    if task_type == "regression":
        labels = textfiles._regression_labels(values, where)
        names, count = None, 1
    else:
        labels, names, count = textfiles._class_labels(values, where, label_names, num_labels)
    if "validation" not in splits:
        keep, held = textfiles._split_off_validation(labels["train"], stratify=task_type == "classification")
        if not held:
            raise ProgtuningError(f"dataset {name} has too few training rows to split off a validation set")
        whole, whole_labels = splits.pop("train"), labels.pop("train")
        splits["train"], labels["train"] = whole.select(keep), [whole_labels[i] for i in keep]
        splits["validation"], labels["validation"] = whole.select(held), [whole_labels[i] for i in held]

    features = datasets.Features(
        {
            **{c: datasets.Value("string") for c in text_columns},
            "label": datasets.Value("float32" if task_type == "regression" else "int64"),
        }
    )
    order = [s for s in ("train", "validation", "test") if s in splits]
    data = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {**{c: [str(v) for v in splits[split][c]] for c in text_columns}, "label": labels[split]}, features=features
        )
        for split in order
    })
    common = dict(
        name=name if config_name is None else f"{name}/{config_name}",
        text_columns=text_columns,
        eval_splits=tuple(s for s in order if s not in ("train", "test")),
        description=f"hub dataset {name}" + (f" ({config_name})" if config_name else ""),
        extra={"dataset": name, "dataset_config": config_name, "task_type": task_type},
    )
    if task_type == "regression":
        return RegressionTask(metric=regression_metric, main_metric="pearson", **common), data
    task = ClassificationTask(
        metric=classification_metric(count), main_metric="accuracy", num_labels=count, label_names=names, **common
    )
    return task, data


def _load(name: str, config_name: str | None) -> Any:
    import datasets

    try:
        loaded = datasets.load_dataset(name, config_name)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; each becomes one line
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        why = "offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), and not in the datasets cache" if offline else first
        raise ProgtuningError(
            f"cannot load dataset {name!r}{f' ({config_name})' if config_name else ''}: {why}; check the name, "
            "or give local files with --task files --train-file"
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _choose_splits(raw: Any, name: str, label_column: str) -> dict:
    if "train" not in raw:
        raise ProgtuningError(f"dataset {name} has no train split (it has: {', '.join(raw)}): choose another dataset")
    splits = {"train": raw["train"]}
    validation = next((s for s in _VALIDATION_NAMES if s in raw), None)
    if validation:
        splits["validation"] = raw[validation]
    if "test" in raw:
        test = raw["test"]
        if label_column in test.column_names and all(v == -1 for v in test[label_column]):
            logger.info("progtuning: %s's test split has no labels (all -1): it is not scored", name)
        else:
            splits["test"] = test
    return splits
