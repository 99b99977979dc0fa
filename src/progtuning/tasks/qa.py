"""Extractive question answering: question + context → the answer span (SQuAD v1.1 / v2.0).

The pipeline mirrors transformers' ``run_qa.py`` / ``utils_qa.py``:

* :func:`prepare_train_features` / :func:`prepare_eval_features` -- tokenise question + context
  into overlapping windows (``dataset.map(..., batched=True)``);
* :func:`postprocess_predictions` -- start/end logits of the windows back to one answer string
  per question;
* :class:`ExtractiveQATask` -- the task kind: a span head (``AutoModelForQuestionAnswering``),
  windows, and scores from :func:`~progtuning.tasks.metrics.squad_metrics` after training (the
  Trainer only predicts logits; post-processing happens outside it).

Rows have ``id, context, question, answers={"text": [...], "answer_start": [...]}``
(:func:`progtuning.tasks.squad.load_squad` reads them).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from progtuning.errors import ProgtuningError
from progtuning.tasks.base import Features, Settings, Task, fingerprint
from progtuning.tasks.metrics import squad_metrics

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase

__all__ = ["ExtractiveQATask", "prepare_train_features", "prepare_eval_features", "postprocess_predictions"]

COLUMNS = ("id", "context", "question", "answers")

# ----------------------------------------------------------------------------- features


def _tokenize(
    examples: Mapping[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    doc_stride: int,
    pad_to_max_length: bool,
) -> tuple[BatchEncoding, int]:
    if not getattr(tokenizer, "is_fast", False):
        raise ProgtuningError(
            f"{type(tokenizer).__name__} is a slow tokenizer without offset mappings; "
            f"load a fast one (use_fast=True)"
        )
    if doc_stride >= max_length:
        raise ProgtuningError(f"doc_stride ({doc_stride}) must be smaller than max_length ({max_length})")
    if pad_to_max_length and tokenizer.pad_token is None:
        raise ProgtuningError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos_token)")
    # a left-padding tokenizer (XLNet-style) puts the context first, so the truncated part is
    # still the one next to the padding
    pad_on_right = tokenizer.padding_side == "right"
    # leading whitespace in some questions wastes tokens that the context windows need
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    encoded = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    return encoded, (1 if pad_on_right else 0)


def prepare_train_features(
    examples: Mapping[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 384,
    doc_stride: int = 128,
    pad_to_max_length: bool = True,
) -> BatchEncoding:
    """Tokenise a batch of SQuAD rows into windows labelled with ``start_positions``/``end_positions``.

    A long context gives several windows that overlap by ``doc_stride`` tokens. A window that does
    not contain the whole answer, and every window of an unanswerable (v2) question, points both
    positions at the CLS token. Use with ``dataset.map(..., batched=True, remove_columns=...)``.
    """
    encoded, context_id = _tokenize(examples, tokenizer, max_length, doc_stride, pad_to_max_length)
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    offset_mapping = encoded.pop("offset_mapping")
    encoded["start_positions"] = []
    encoded["end_positions"] = []

    for i, offsets in enumerate(offset_mapping):
        input_ids = encoded["input_ids"][i]
        if tokenizer.cls_token_id is not None and tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id is not None and tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = encoded.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            encoded["start_positions"].append(cls_index)
            encoded["end_positions"].append(cls_index)
            continue

        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        # first and last context token of this window
        token_start = sequence_ids.index(context_id)
        token_end = len(sequence_ids) - 1 - sequence_ids[::-1].index(context_id)
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            encoded["start_positions"].append(cls_index)
            encoded["end_positions"].append(cls_index)
            continue
        # walk in from both ends to the tokens that hold the answer's first and last characters
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        encoded["start_positions"].append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        encoded["end_positions"].append(token_end + 1)
    return encoded


def prepare_eval_features(
    examples: Mapping[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 384,
    doc_stride: int = 128,
    pad_to_max_length: bool = True,
) -> BatchEncoding:
    """Tokenise a batch of SQuAD rows into windows for prediction.

    Each window keeps ``example_id`` (the row's ``id``) and ``offset_mapping``, with ``None`` for
    every token outside the context, so :func:`postprocess_predictions` can map logits back to
    character spans. Drop both columns before feeding the model.
    """
    encoded, context_id = _tokenize(examples, tokenizer, max_length, doc_stride, pad_to_max_length)
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    encoded["example_id"] = []
    for i in range(len(encoded["input_ids"])):
        sequence_ids = encoded.sequence_ids(i)
        encoded["example_id"].append(examples["id"][sample_mapping[i]])
        encoded["offset_mapping"][i] = [
            (o if sequence_ids[k] == context_id else None) for k, o in enumerate(encoded["offset_mapping"][i])
        ]
    return encoded


# ----------------------------------------------------------------------------- answers


def _rows(data: Any) -> list[dict]:
    if isinstance(data, Mapping):  # a batch: {"id": [...], "context": [...]}
        keys = list(data)
        return [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
    return list(data)


def postprocess_predictions(
    examples: Any,
    features: Any,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """Turn per-window start/end logits into one answer string per question id.

    ``examples`` are the SQuAD rows (``id``, ``context``); ``features`` the windows from
    :func:`prepare_eval_features` (``example_id``, ``offset_mapping``), in the same order as the
    logit rows. A span is scored start logit + end logit over the ``n_best_size`` best starts
    and ends of every window. With ``version_2`` the null answer scores CLS start + CLS end
    (token 0, taking the minimum over windows) and the answer is ``""`` when that null score
    beats the best span's score by more than ``null_score_diff_threshold``.
    """
    # with Datasets, skip decoding the columns not needed here (input_ids, answers, ...)
    if hasattr(features, "select_columns"):
        features = features.select_columns(["example_id", "offset_mapping"])
    if hasattr(examples, "select_columns"):
        examples = examples.select_columns(["id", "context"])
    features = _rows(features)
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ProgtuningError(
            f"{len(features)} features but {len(start_logits)} start / {len(end_logits)} end logit rows; "
            f"pass the logits of exactly the features given, in order"
        )
    features_per_example: dict[Any, list[int]] = collections.defaultdict(list)
    for i, feature in enumerate(features):
        features_per_example[feature["example_id"]].append(i)

    answers: dict[str, str] = {}
    for example in _rows(examples):
        context = example["context"]
        null_score = None
        best_score, best_text = -np.inf, None
        for fi in features_per_example.get(example["id"], []):
            starts, ends, offsets = start_logits[fi], end_logits[fi], features[fi]["offset_mapping"]
            feature_null = float(starts[0] + ends[0])
            # the window most sure that an answer exists sets the null score
            null_score = feature_null if null_score is None else min(null_score, feature_null)
            best_ends = np.argsort(ends)[::-1][:n_best_size]
            for s in np.argsort(starts)[::-1][:n_best_size]:
                for e in best_ends:
                    # a span must lie inside the context, in order, and not be too long
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(starts[s] + ends[e])
                    if score > best_score:
                        best_score, best_text = score, context[offsets[s][0] : offsets[e][1]]
        if best_text is None:  # no window or no valid span: nothing to answer with
            answers[example["id"]] = ""
        elif version_2 and null_score is not None and null_score - best_score > null_score_diff_threshold:
            answers[example["id"]] = ""
        else:
            answers[example["id"]] = best_text
    return answers


# ----------------------------------------------------------------------------- the task kind


@dataclass(frozen=True, kw_only=True)
class ExtractiveQATask(Task):
    """Answer spans in a context; ``version_2``: some questions have no answer (SQuAD v2.0)."""

    name: str
    version_2: bool = False
    main_metric: str = "f1"
    eval_splits: tuple[str, ...] = ("validation",)
    description: str = ""

    kind: ClassVar[str] = "extractive_qa"
    task_type: ClassVar[str] = "qa"
    evaluates_each_epoch: ClassVar[bool] = False  # scores need post-processing (evaluate)

    def check(self, data) -> None:
        self.check_splits(data, COLUMNS, "use SQuAD-format data", required=("train",))

    def model_class(self) -> type:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def preprocess(self, data, tokenizer, settings: Settings) -> Features:
        """Train windows with answer positions; eval windows plus what post-processing needs."""
        window = dict(tokenizer=tokenizer, max_length=settings.max_length, doc_stride=settings.doc_stride)
        train = data["train"].map(
            lambda batch: prepare_train_features(batch, **window),
            batched=True,
            remove_columns=data["train"].column_names,
            desc="windows (train)",
            new_fingerprint=fingerprint(data["train"], tokenizer, settings.max_length, settings.doc_stride, "train"),
        )
        eval_sets, windows = {}, {}
        for split in [s for s in data if s != "train"]:
            features = data[split].map(
                lambda batch: prepare_eval_features(batch, **window),
                batched=True,
                remove_columns=data[split].column_names,
                desc=f"windows ({split})",
                new_fingerprint=fingerprint(data[split], tokenizer, settings.max_length, settings.doc_stride, "eval"),
            )
            windows[split] = features
            # The model sees only its inputs; example ids and offsets stay behind for post-processing.
            eval_sets[split] = features.remove_columns(["example_id", "offset_mapping"])
        return Features(train, eval_sets, data, extra={"windows": windows})

    def collator(self, tokenizer):
        from transformers import default_data_collator

        return default_data_collator  # windows are padded to max_length already

    def evaluate(self, trainer, features: Features, split: str) -> dict[str, float]:
        """Predict start/end logits, turn them into answer strings, and score them (EM/F1)."""
        output = trainer.predict(features.eval[split])
        start_logits, end_logits = output.predictions[:2]
        examples, windows = features.examples[split], features.extra["windows"][split]
        answers = postprocess_predictions(examples, windows, start_logits, end_logits, version_2=self.version_2)
        return squad_metrics(answers, examples, version_2=self.version_2)

    # -- new data ------------------------------------------------------------------------------
    def input_columns(self) -> tuple[str, ...]:
        return ("question", "context")

    def examples_from_table(self, table, label_column: str | None, source: str):
        """Rows with ``question``, ``context`` (and ``id``, else the row number); labelled rows also
        ``answers`` as SQuAD has them (``{"text": [...], "answer_start": [...]}``; JSONL, or JSON text in a cell)."""
        from datasets import Dataset

        wanted = [*self.input_columns(), *([label_column] if label_column else [])]
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise ProgtuningError(
                f"{source} has no column(s) {', '.join(missing)} (it has: {', '.join(map(str, table.columns))}): "
                f"this run reads {', '.join(wanted)}"
            )
        rows = {
            "id": [str(v) for v in table["id"].tolist()] if "id" in table.columns else [str(i) for i in range(len(table))],
            "question": [str(v) for v in table["question"].tolist()],
            "context": [str(v) for v in table["context"].tolist()],
        }
        if label_column:
            rows["answers"] = [_answers(value, number, source) for number, value in enumerate(table[label_column], 1)]
        return Dataset.from_dict(rows)

    def predictions(self, trainer, features: Features, split: str) -> list[dict]:
        output = trainer.predict(features.eval[split])
        start_logits, end_logits = output.predictions[:2]
        examples, windows = features.examples[split], features.extra["windows"][split]
        answers = postprocess_predictions(examples, windows, start_logits, end_logits, version_2=self.version_2)
        return [{"answer": answers[example_id]} for example_id in examples["id"]]


def _answers(value: Any, row: int, source: str) -> dict:
    """A cell as SQuAD's ``answers`` mapping, or a one-line error."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("text"), list)
        or not isinstance(value.get("answer_start"), list)
        or len(value["text"]) != len(value["answer_start"])
    ):
        raise ProgtuningError(
            f"{source} row {row}: answers must look like {{\"text\": [...], \"answer_start\": [...]}} as in SQuAD"
        )
    return {"text": [str(t) for t in value["text"]], "answer_start": [int(a) for a in value["answer_start"]]}
