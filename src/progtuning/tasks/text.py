"""What the sequence-level kinds share: one text (or a text pair) in, one label column out.

:class:`TextTask` tokenizes, pads and scores; its two kinds differ only in the head and the
labels: :class:`~progtuning.tasks.classification.ClassificationTask` (class ids 0..K-1) and
:class:`~progtuning.tasks.regression.RegressionTask` (one real-valued score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from progtuning.errors import ProgtuningError
from progtuning.tasks.base import Features, Settings, Task, fingerprint, scored_splits
from progtuning.tasks.metrics import MetricFn


@dataclass(frozen=True, kw_only=True)
class TextTask(Task):
    """A sequence task over one text column, or two for a pair, with labels in ``label_column``."""

    name: str
    text_columns: tuple[str, ...]  # one column, or two for a pair
    metric: MetricFn  # (logits or scores, labels) -> {name: value}
    main_metric: str  # the key of `metric`'s result used for model selection and tables
    label_column: str = "label"
    # splits scored during and after training; "validation" first. MNLI adds "validation_mismatched".
    eval_splits: tuple[str, ...] = ("validation",)
    description: str = ""
    extra: dict = field(default_factory=dict)

    task_type: ClassVar[str] = "seq_cls"
    is_regression: ClassVar[bool] = False

    def check(self, data) -> None:
        """Columns present, splits non-empty, labels in range — one line per problem."""
        self.check_splits(data, (*self.text_columns, self.label_column), "set text_column / label_column")
        for split, dataset in data.items():
            self.check_labels(split, np.asarray(dataset[self.label_column]))

    def check_labels(self, split: str, labels: np.ndarray) -> None:
        """Raise if a split's labels do not fit the head (classification: ids 0..K-1)."""

    def model_class(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def preprocess(self, data, tokenizer, settings: Settings) -> Features:
        """Tokenized train split and evaluation splits (validation first, test last)."""
        max_length = settings.max_length

        def encode(batch):
            texts = [batch[column] for column in self.text_columns]
            encoded = tokenizer(*texts, truncation=True, max_length=max_length)
            if self.label_column in batch:  # rows to predict have none
                encoded["labels"] = batch[self.label_column]
            return encoded

        def tokenized(dataset):
            return dataset.map(
                encode,
                batched=True,
                remove_columns=dataset.column_names,
                desc="tokenizing",
                new_fingerprint=fingerprint(dataset, tokenizer, max_length),
            )

        splits = scored_splits(self, data)
        return Features(tokenized(data["train"]), {s: tokenized(data[s]) for s in splits}, data)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)  # dynamic padding: each batch to its longest row

    def trainer_metrics(self):
        def compute(prediction) -> dict[str, float]:
            predictions = prediction.predictions
            if isinstance(predictions, tuple):
                predictions = predictions[0]
            return self.metric(np.asarray(predictions), np.asarray(prediction.label_ids))

        return compute

    def evaluate(self, trainer, features: Features, split: str) -> dict[str, float]:
        scores = trainer.evaluate(features.eval[split], metric_key_prefix=split)
        return {key.removeprefix(split + "_"): value for key, value in scores.items()}

    def evaluate_with_outputs(self, trainer, features: Features, split: str) -> tuple[dict[str, float], dict]:
        prediction = trainer.predict(features.eval[split], metric_key_prefix=split)
        scores = {key.removeprefix(split + "_"): value for key, value in prediction.metrics.items()}
        return scores, per_example_outputs(prediction)

    # -- new data ------------------------------------------------------------------------------
    def input_columns(self) -> tuple[str, ...]:
        return self.text_columns

    def examples_from_table(self, table, label_column: str | None, source: str):
        from datasets import Dataset

        wanted = [*self.text_columns, *([label_column] if label_column else [])]
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise ProgtuningError(
                f"{source} has no column(s) {', '.join(missing)} (it has: {', '.join(map(str, table.columns))}): "
                f"this run reads {', '.join(wanted)}"
            )
        rows = {}
        for column in wanted:
            empty = table[column].isna().to_numpy()
            if empty.any():
                raise ProgtuningError(f"{source} row {int(np.argmax(empty)) + 1} has an empty '{column}': fill it in "
                                      "or drop the row")
        for column in self.text_columns:
            rows[column] = [str(v) for v in table[column].tolist()]
        if label_column:
            rows[self.label_column] = self.label_values(table[label_column].tolist(), source)
        dataset = Dataset.from_dict(rows)
        if label_column and self.is_regression:  # float64 targets break MSELoss against fp32 outputs
            from datasets import Value

            dataset = dataset.cast_column(self.label_column, Value("float32"))
        return dataset

    def label_values(self, values: list, source: str) -> list:
        """A file's labels as the head's targets (class ids, or scores)."""
        raise NotImplementedError

    def predictions(self, trainer, features: Features, split: str) -> list[dict]:
        output = trainer.predict(features.eval[split])
        predictions = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        return self.prediction_rows(np.asarray(predictions))

    def prediction_rows(self, outputs: np.ndarray) -> list[dict]:
        """The head's outputs for a batch of examples as one dict each (label, probabilities; score)."""
        raise NotImplementedError


def per_example_outputs(prediction) -> dict:
    """Labels and model outputs of one scored split (logits per class; one score for regression),
    rounded to 5 decimals for a compact results.json; ``self.metric(outputs, labels)`` rescored."""
    outputs = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    return {"labels": np.asarray(prediction.label_ids).tolist(), "outputs": np.round(outputs, 5).tolist()}
