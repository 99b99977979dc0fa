"""A trained run's task as JSON (``progtuning_task.json`` beside the model), and the task rebuilt from it.

``progtuning predict`` and ``evaluate`` need the run's task (its columns, labels, head and metric)
but not its training data, which may be gone. :func:`task_spec` records which source served the
task and what a user's data looked like; :func:`task_from_spec` rebuilds it:

* built-in, GLUE and SQuAD tasks by name, from their sources' tables (``builtin_task``,
  ``glue_task``, ``squad_task``) — the same metric as in training;
* the user's files and hub datasets from the recorded kind, columns and labels, with the metric
  their sources give (accuracy and F1 for classes, Pearson/Spearman for scores).

``label_column`` is the column a *file* holds the labels in (the user's name for files and hub
datasets; the task's own column otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from progtuning.errors import ProgtuningError
from progtuning.tasks.base import Task

TASK_FILE = "progtuning_task.json"
SPEC_VERSION = 1


def task_spec(task: Task, source: str, label_column: str | None = None) -> dict[str, Any]:
    """What rebuilds ``task`` (served by ``source``, see :func:`~progtuning.tasks.registry.task_source`)."""
    spec: dict[str, Any] = {
        "version": SPEC_VERSION,
        "source": source,
        "name": task.name,
        "kind": task.kind,
        "main_metric": task.main_metric,
        "input_columns": list(task.input_columns()) if _reusable(task) else None,
        # extractive QA keeps its labels in SQuAD's "answers"
        "label_column": label_column or getattr(task, "label_column", None) or
        ("answers" if task.kind == "extractive_qa" else None),
    }
    if task.kind in ("classification", "regression"):
        spec["text_columns"] = list(task.text_columns)
        spec["num_labels"] = getattr(task, "num_labels", None)
        names = getattr(task, "label_names", None)
        spec["label_names"] = list(names) if names else None
    return spec


def _reusable(task: Task) -> bool:
    try:
        task.input_columns()
    except ProgtuningError:
        return False
    return True


def task_from_spec(spec: dict[str, Any]) -> Task:
    """The task :func:`task_spec` described."""
    source, name = spec.get("source"), spec.get("name")
    if source == "builtin":
        from progtuning.tasks.builtin import builtin_task

        return builtin_task(name)
    if source == "glue":
        from progtuning.tasks.glue import glue_task

        return glue_task(name)
    if source == "squad":
        from progtuning.tasks.squad import squad_task

        return squad_task("squad_v2" if name.endswith("2.0") else "squad")
    if source in ("files", "hub") and spec.get("kind") in ("classification", "regression"):
        return _user_text_task(spec)
    raise ProgtuningError(f"cannot rebuild a {spec.get('kind')} task from source {source!r}: "
                          "predict and evaluate support classification, regression and extractive QA")


def _user_text_task(spec: dict[str, Any]) -> Task:
    from progtuning.tasks.classification import ClassificationTask
    from progtuning.tasks.metrics import classification_metric, regression_metric
    from progtuning.tasks.regression import RegressionTask

    common = dict(name=spec["name"], text_columns=tuple(spec["text_columns"]), main_metric=spec["main_metric"])
    if spec["kind"] == "regression":
        return RegressionTask(metric=regression_metric, **common)
    names = tuple(spec["label_names"]) if spec.get("label_names") else None
    return ClassificationTask(metric=classification_metric(spec["num_labels"]), num_labels=spec["num_labels"],
                              label_names=names, **common)


def save_task_spec(spec: dict[str, Any], folder: str | Path) -> Path:
    path = Path(folder) / TASK_FILE
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def load_task_spec(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise ProgtuningError(f"no {TASK_FILE} in {folder}: the run was saved without it (an older progtuning, or "
                              "--no-save-model); train it again to predict with it")
    return json.loads(path.read_text())
