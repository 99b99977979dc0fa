"""SQuAD v1.1 / v2.0 as a source of extractive question answering: names, files and rows.

* :data:`SQUAD_TASKS` -- the task names (``squad``, ``squad_v2``, ...) and their versions;
* :func:`squad_task` -- the :class:`~progtuning.tasks.qa.ExtractiveQATask` of a name;
* :func:`load_squad` -- the Hub datasets, or the official JSON files, as flat rows
  (``id, title, context, question, answers={"text": [...], "answer_start": [...]}``).

Windows, answers and scores are the kind's job (:mod:`progtuning.tasks.qa`,
:func:`progtuning.tasks.metrics.squad_metrics`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from progtuning.errors import ProgtuningError
from progtuning.tasks.names import is_squad
from progtuning.tasks.qa import ExtractiveQATask

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["SQUAD_TASKS", "is_squad", "load_squad", "squad_task"]

# task name -> SQuAD version
SQUAD_TASKS = {"squad": "1.1", "squad_v1": "1.1", "squad-v1": "1.1", "squad_v2": "2.0", "squad-v2": "2.0"}

_HUB_IDS = {"1.1": "rajpurkar/squad", "2.0": "rajpurkar/squad_v2"}


def _version(version: str | float) -> str:
    v = str(version).lower().strip().removeprefix("squad").strip("_- ").removeprefix("v")
    if v in ("", "1", "1.1"):
        return "1.1"
    if v in ("2", "2.0"):
        return "2.0"
    raise ProgtuningError(f"unknown SQuAD version {version!r}; use '1.1' (or 'v1') or '2.0' (or 'v2')")


# ----------------------------------------------------------------------------- loading


def _features():
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": {
                "text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32")),
            },
        }
    )


def _read_squad_json(path: Path, version: str) -> dict[str, list]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ProgtuningError(f"{path} is not valid JSON ({e}); pass an official SQuAD file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ProgtuningError(f"{path} has no top-level 'data' list; pass an official SQuAD JSON file")
    file_version = doc.get("version")
    if file_version is not None and _version(file_version) != version:
        raise ProgtuningError(
            f"{path} is SQuAD {file_version} but version={version!r} was asked for; "
            f"pass version={file_version!r}"
        )
    rows: dict[str, list] = {k: [] for k in ("id", "title", "context", "question", "answers")}
    try:
        for article in doc["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    # v2 impossible questions have "answers": [] (their "plausible_answers" are
                    # distractors, not gold), which is how the Hub's squad_v2 shows them too
                    answers = qa.get("answers", [])
                    rows["id"].append(qa["id"])
                    rows["title"].append(article.get("title", ""))
                    rows["context"].append(paragraph["context"])
                    rows["question"].append(qa["question"])
                    rows["answers"].append(
                        {
                            "text": [a["text"] for a in answers],
                            "answer_start": [a["answer_start"] for a in answers],
                        }
                    )
    except (KeyError, TypeError) as e:
        raise ProgtuningError(
            f"{path} is not in the SQuAD format (missing {e}); pass an official SQuAD file"
        ) from None
    return rows


def load_squad(
    version: str = "1.1", data_file_or_dir: str | Path | Mapping[str, str | Path] | None = None
) -> DatasetDict:
    """SQuAD as a ``DatasetDict`` with ``train`` and/or ``validation`` splits.

    ``version``: ``"1.1"``/``"v1"`` or ``"2.0"``/``"v2"``. ``data_file_or_dir``: ``None`` for the
    Hugging Face Hub; a folder holding ``train-v1.1.json``/``dev-v1.1.json`` (or the v2.0 pair);
    one official JSON file (its split is ``train`` if its name says so, else ``validation``); or
    a mapping ``{"train": path, "validation": path}``.
    """
    import datasets

    version = _version(version)
    if data_file_or_dir is None:
        try:
            return datasets.load_dataset(_HUB_IDS[version])
        except (ConnectionError, OSError) as e:
            raise ProgtuningError(
                f"could not load SQuAD {version} from the Hugging Face Hub ({e}); "
                f"pass data_file_or_dir= pointing at the official JSON files instead"
            ) from None

    if isinstance(data_file_or_dir, Mapping):
        files = {split: Path(p) for split, p in data_file_or_dir.items()}
    else:
        path = Path(data_file_or_dir)
        if path.is_dir():
            files = {
                split: path / f"{prefix}-v{version}.json"
                for split, prefix in (("train", "train"), ("validation", "dev"))
                if (path / f"{prefix}-v{version}.json").is_file()
            }
            if not files:
                raise ProgtuningError(
                    f"no train-v{version}.json or dev-v{version}.json in {path}; "
                    f"put the official SQuAD {version} files there or pass a file"
                )
        else:
            files = {("train" if "train" in path.name.lower() else "validation"): path}
    for p in files.values():
        if not p.is_file():
            raise ProgtuningError(f"SQuAD file {p} does not exist; check the path")
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(_read_squad_json(p, version), features=_features())
            for split, p in files.items()
        }
    )


def squad_task(name: str) -> ExtractiveQATask:
    """The task of a SQuAD name (``squad``: v1.1, ``squad_v2``: v2.0 with unanswerable questions)."""
    version = SQUAD_TASKS.get(name.lower()) or _version(name)
    return ExtractiveQATask(
        name=f"squad-v{version}",
        version_2=version == "2.0",
        description=f"SQuAD {version}: extractive question answering. Exact match and F1 (main).",
    )
