"""Scoring saved outputs again: the task's own metric function, found from a results.json.

A report that resamples a test set (a bootstrap over examples) must score each resample exactly
as training scored the whole split, so it takes the metric from the task's definition, never a
copy: :func:`metric_for` reads the ``task`` entry of results.json (``Task.summary()``: name,
kind, main metric, number of labels) and returns the :data:`~progtuning.tasks.metrics.MetricFn`
the task was scored with. It reads no data. Kinds whose outputs are not kept per example (QA)
have none.
"""

from __future__ import annotations

from typing import Any

from progtuning.errors import ProgtuningError
from progtuning.tasks.metrics import MetricFn, classification_metric, regression_metric


def metric_for(task: dict[str, Any]) -> MetricFn | None:
    """The metric function of the task a results.json describes (``results["task"]``), or None."""
    from progtuning.tasks import builtin, glue

    name, kind = str(task.get("name")), task.get("kind")
    try:
        if name in builtin.BUILTIN_TASKS:
            return builtin.builtin_task(name).metric
        if glue.is_glue_task(name):
            return glue.glue_task(name).metric
    except (ProgtuningError, OSError):
        pass  # a built-in task whose package is missing here: its kind says the same
    # the user's files (textfiles.load_text_files): the metric follows from the kind
    if kind == "regression":
        return regression_metric
    if kind == "classification" and task.get("num_labels"):
        return classification_metric(int(task["num_labels"]))
    return None
