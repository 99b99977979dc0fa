"""A user's own language-model data: plain-text files (task ``causal-lm``) and instruction JSONL (task ``instruct``).

This module owns :func:`load_lm_files`, which reads one to three files (train, and optionally
validation and test) into a :class:`~progtuning.tasks.lm.CausalLMTask` and a ``datasets.DatasetDict``.

``causal-lm`` (format ``text``), by file extension:

* ``.txt``: one example per line (a line break ends an example; blank lines are skipped);
* ``.jsonl`` (one JSON object per line) or ``.json`` (the same, or one array of objects): the
  example is the object's ``text_column`` field (default ``text``).

``instruct`` (format ``instruction``), ``.jsonl`` or ``.json``, one conversation per object:

* ``{"prompt": ..., "response": ...}``, optionally with ``"system"``; or
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``, ending with the
  assistant's turn (every assistant turn is trained on; the last one is the generation reference).

Files are UTF-8 (a byte-order mark is fine). Without a validation file, 10% of train is split off
(``random_state=0``). Every mistake (an unknown extension, a missing or empty field, a line that is
not JSON, a conversation without a response) raises
:class:`~progtuning.errors.ProgtuningError` with one line naming the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from progtuning.errors import ProgtuningError
from progtuning.tasks.lm import CausalLMTask, as_messages, conversation_problem

LM_FILE_TASKS = {"causal-lm": "text", "instruct": "instruction"}
VALIDATION_FRACTION = 0.1
SPLIT_SEED = 0


def _records(path: Path, split: str) -> list[tuple[int, Any]]:
    """(line number, JSON value) for every object of a .jsonl / .json file."""
    text = _read_text(path, split)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as error:
            raise ProgtuningError(f"{split} file '{path}' is not valid JSON ({error.msg}, line {error.lineno})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ProgtuningError(f"{split} file '{path}' line {number} is not valid JSON ({error.msg})") from None
    return records


def _read_text(path: Path, split: str) -> str:
    if not path.is_file():
        raise ProgtuningError(f"{split} file '{path}' does not exist: check the path")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ProgtuningError(f"{split} file '{path}' is not UTF-8: save it as UTF-8") from None


def _texts(path: Path, split: str, text_column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line for line in _read_text(path, split).splitlines() if line.strip()]
    if suffix not in (".jsonl", ".json"):
        raise ProgtuningError(f"cannot tell the format of {split} file '{path}': name it .txt, .jsonl or .json")
    texts = []
    for number, record in _records(path, split):
        if not isinstance(record, dict) or text_column not in record:
            raise ProgtuningError(
                f"{split} file '{path}' line {number} has no '{text_column}' field: set text_column or fix the line"
            )
        value = record[text_column]
        if not isinstance(value, str) or not value.strip():
            raise ProgtuningError(f"{split} file '{path}' line {number} has an empty '{text_column}': fill it in or drop the line")
        texts.append(value)
    return texts


def _conversations(path: Path, split: str) -> list[list[dict]]:
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ProgtuningError(
            f"instruction data must be JSONL ({split} file '{path}'): one {{\"prompt\", \"response\"}} "
            "or {\"messages\": [...]} object per line"
        )
    conversations = []
    for number, record in _records(path, split):
        where = f"{split} file '{path}' line {number}"
        if not isinstance(record, dict):
            raise ProgtuningError(f"{where} is not a JSON object: write one object per line")
        if "messages" in record:
            messages = record["messages"]
        elif "prompt" in record and "response" in record:
            fields = {key: record[key] for key in ("prompt", "response", "system") if key in record}
            for key, value in fields.items():
                if not isinstance(value, str):
                    raise ProgtuningError(f"{where} has a non-text '{key}': make it a string")
            if not fields["response"].strip():
                raise ProgtuningError(f"{where} has an empty 'response': fill it in or drop the line")
            if not fields["prompt"].strip():
                raise ProgtuningError(f"{where} has an empty 'prompt': fill it in or drop the line")
            messages = as_messages(fields["prompt"], fields["response"], fields.get("system"))
        else:
            present = ", ".join(sorted(record)) or "none"
            raise ProgtuningError(
                f"{where} has neither 'prompt' and 'response' nor 'messages' (fields: {present}): add them"
            )
        problem = conversation_problem(messages)
        if problem:
            raise ProgtuningError(f"{where}: {problem}; fix or drop the line")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations


def load_lm_files(
    task: str,
    train: str | Path,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    *,
    text_column: str = "text",
    packing: bool | None = None,
    max_new_tokens: int = 32,
    generate_examples: int = 100,
    name: str | None = None,
) -> tuple[CausalLMTask, datasets.DatasetDict]:
    """Load the user's files for task ``causal-lm`` or ``instruct`` (see the module docstring).

    ``packing`` (plain text only) defaults to on. The returned splits have a ``text`` column
    (``causal-lm``) or a ``messages`` column (``instruct``).
    """
    if task not in LM_FILE_TASKS:
        raise ProgtuningError(f"unknown language-model file task {task!r}: use {' or '.join(LM_FILE_TASKS)}")
    fmt = LM_FILE_TASKS[task]
    paths = {s: Path(p).expanduser() for s, p in (("train", train), ("validation", validation), ("test", test)) if p}
    column = "text" if fmt == "text" else "messages"
    rows = {
        split: (_texts(path, split, text_column) if fmt == "text" else _conversations(path, split))
        for split, path in paths.items()
    }
    for split, values in rows.items():
        if not values:
            raise ProgtuningError(f"{split} file '{paths[split]}' has no examples: give it at least one")
    if "validation" not in rows:
        if len(rows["train"]) < 2:
            raise ProgtuningError(f"train file '{train}' has too few examples to split off validation: give a validation file")
        keep, held = train_test_split(np.arange(len(rows["train"])), test_size=VALIDATION_FRACTION, random_state=SPLIT_SEED)
        whole = rows.pop("train")
        rows["train"] = [whole[i] for i in sorted(keep)]
        rows["validation"] = [whole[i] for i in sorted(held)]
    splits = [s for s in ("train", "validation", "test") if s in rows]
    data = datasets.DatasetDict({s: datasets.Dataset.from_dict({column: rows[s]}) for s in splits})
    lm_task = CausalLMTask(
        name=name or Path(train).stem,
        format=fmt,
        packing=(True if packing is None else packing) if fmt == "text" else bool(packing),
        eval_splits=("validation",),  # test, when given, is scored once at the end
        max_new_tokens=max_new_tokens,
        generate_examples=generate_examples,
        description=f"{task} files: {', '.join(f'{s}={p}' for s, p in paths.items())}",
        extra={"files": {s: str(p) for s, p in paths.items()}},
    )
    return lm_task, data
