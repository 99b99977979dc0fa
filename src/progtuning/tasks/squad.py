"""SQuAD v1.1 / v2.0 extractive question answering: data, features, answers and scores.

The pipeline mirrors transformers' ``run_qa.py`` / ``utils_qa.py``:

* :func:`load_squad` -- the Hub datasets, or the official JSON files, as flat rows
  (``id, title, context, question, answers={"text": [...], "answer_start": [...]}``);
* :func:`prepare_train_features` / :func:`prepare_eval_features` -- tokenise question + context
  into overlapping windows (``dataset.map(..., batched=True)``);
* :func:`postprocess_predictions` -- start/end logits of the windows back to one answer string
  per question;
* :func:`squad_metrics` -- exact match and F1 as the official evaluation scripts compute them.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from progtuning.errors import ProgtuningError

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import BatchEncoding, PreTrainedTokenizerBase

__all__ = [
    "load_squad",
    "prepare_train_features",
    "prepare_eval_features",
    "postprocess_predictions",
    "squad_metrics",
]

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


# ----------------------------------------------------------------------------- metrics
# Normalisation and scores as in the official evaluate-v1.1.py / evaluate-v2.0.py.


_PUNCTUATION = set(string.punctuation)


def _normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _exact(prediction: str, gold: str) -> float:
    return float(_normalize_answer(prediction) == _normalize_answer(gold))


def _f1(prediction: str, gold: str, version_2: bool) -> float:
    pred_tokens = _normalize_answer(prediction).split()
    gold_tokens = _normalize_answer(gold).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        # v2: "" against a no-answer gold is right; either side empty alone is wrong (v1 scores
        # an empty side 0 through the overlap check below)
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(answers: Any) -> list[str]:
    if isinstance(answers, Mapping):  # HF: {"text": [...], "answer_start": [...]}
        return list(answers["text"])
    return [a["text"] if isinstance(a, Mapping) else a for a in answers]  # official list, or strings


def squad_metrics(
    predictions: Mapping[str, str],
    references: Iterable[Mapping[str, Any]],
    version_2: bool = False,
) -> dict[str, float]:
    """Exact match and F1 (percent) of predicted answers against the gold answers.

    ``references``: rows with ``id`` and ``answers`` (a SQuAD ``Dataset`` split works). Each
    question scores its best match over its gold answers; a question without a prediction scores
    0. With ``version_2`` a question without gold answers expects ``""``, and the result adds
    ``HasAns_*`` / ``NoAns_*`` scores over the answerable / unanswerable questions.
    """
    if hasattr(references, "select_columns"):
        references = references.select_columns(["id", "answers"])
    exact: dict[str, list[float]] = {"HasAns": [], "NoAns": []}
    f1: dict[str, list[float]] = {"HasAns": [], "NoAns": []}
    for ref in references:
        golds = _gold_texts(ref["answers"])
        if version_2:
            golds = [g for g in golds if _normalize_answer(g)]
        kind = "HasAns" if golds else "NoAns"
        golds = golds or [""]
        prediction = predictions.get(ref["id"])
        exact[kind].append(0.0 if prediction is None else max(_exact(prediction, g) for g in golds))
        f1[kind].append(0.0 if prediction is None else max(_f1(prediction, g, version_2) for g in golds))

    every_exact, every_f1 = exact["HasAns"] + exact["NoAns"], f1["HasAns"] + f1["NoAns"]
    if not every_exact:
        raise ProgtuningError("squad_metrics got no reference questions; pass the rows that were predicted")
    result = {
        "exact_match": 100.0 * float(np.mean(every_exact)),
        "f1": 100.0 * float(np.mean(every_f1)),
    }
    if version_2:
        result["total"] = float(len(every_exact))
        for kind in ("HasAns", "NoAns"):
            if exact[kind]:
                result[f"{kind}_exact"] = 100.0 * float(np.mean(exact[kind]))
                result[f"{kind}_f1"] = 100.0 * float(np.mean(f1[kind]))
                result[f"{kind}_total"] = float(len(exact[kind]))
    return result
