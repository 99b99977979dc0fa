"""The task names progtuning knows, apart from the sources that load them.

A mistyped ``--task`` fails here, in the config's own checks, before ``datasets``, scikit-learn and
torch are imported (seconds on a small machine). Each source keeps the table it serves from (with
its loaders and metrics); tests/test_task_names.py holds those tables equal to these.
"""

from __future__ import annotations

import re

from progtuning.errors import ProgtuningError

BUILTIN_TASKS = (
    "rotten-tomatoes", "rotten-tomatoes-rating", "trec6", "sms-spam", "bbc-news", "vader-tweets", "vader-amazon",
    "vader-nyt",
)
BUILTIN_LM_TASKS = ("sms-spam-instruct", "rotten-tomatoes-instruct", "trec6-instruct", "movie-dialog", "movie-lines")
LM_FILE_TASKS = ("causal-lm", "instruct")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
SQUAD_TASKS = ("squad", "squad_v1", "squad-v1", "squad_v2", "squad-v2")


def glue_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())  # "SST-2", "sst_2", "sst2" -> "sst2"


def is_squad(name: str) -> bool:
    return str(name).lower() in SQUAD_TASKS


def is_known_task(name: str, dataset: str | None = None, train_file: str | None = None) -> bool:
    """Whether some source serves ``name`` (a hub ``dataset`` or the user's ``train_file`` serve any)."""
    return bool(
        dataset or train_file or name == "files" or name in LM_FILE_TASKS or name in BUILTIN_LM_TASKS
        or name in BUILTIN_TASKS or glue_key(name) in GLUE_TASKS or is_squad(name)
    )


def unknown_task_error(name: str) -> ProgtuningError:
    return ProgtuningError(
        f"unknown task {name!r}: use a built-in task ({', '.join(BUILTIN_TASKS + BUILTIN_LM_TASKS)}), "
        f"a GLUE task ({', '.join(GLUE_TASKS)}), squad, squad_v2, 'files' with --train-file, "
        "causal-lm / instruct with --train-file, or a hub dataset with --dataset NAME"
    )


def check_task_name(name: str, dataset: str | None = None, train_file: str | None = None) -> None:
    if not is_known_task(name, dataset, train_file):
        raise unknown_task_error(name)
