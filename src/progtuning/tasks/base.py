"""The Task interface: everything ``progtuning train`` needs to know about one kind of task.

A *kind* of task (sequence classification, regression, extractive QA, ...) is one subclass of
:class:`Task`; a *source* (GLUE, SQuAD, the built-in offline tasks, the user's files) reads data
and describes it as an instance of one of those kinds. The runner (:mod:`progtuning.runs.train`)
only ever talks to this interface, in this order::

    task, data = load_task(config)                    # a source: Task + DatasetDict (tasks.registry)
    model = task.load_model(path, trust_remote_code=...)   # the kind's head and auto class
    model = apply_method(model, method, task_type=task.task_type)
    task.check_model(model, config)                   # settings that cannot work with this model
    features = task.preprocess(data, tokenizer, config)    # model inputs for train and eval splits
    trainer = Trainer(..., train_dataset=features.train, data_collator=task.collator(tokenizer),
                      compute_metrics=task.trainer_metrics())
    scores = {split: task.evaluate(trainer, features, split) for split in features.eval}
    # or task.evaluate_with_outputs(...): the same scores, plus each example's output (train uses it)

Adding a kind (say, causal language modelling) is one module with one subclass, plus a source
that returns it; nothing in the runner branches on the kind.

A saved run is used on new data through the same interface (``progtuning predict`` / ``evaluate``,
:mod:`progtuning.runs.predict`)::

    examples = task.examples_from_table(table, label_column, source)   # the user's file, checked
    features = task.features_for(examples, tokenizer, settings)       # one split: "test"
    rows = task.predictions(trainer, features, "test")                # or task.evaluate(...)

A kind that cannot do this yet says so in one line (the defaults below).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from progtuning.errors import ProgtuningError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from torch import nn


class Settings(Protocol):
    """The run settings a kind may read while preprocessing (a ``TrainConfig`` has them all)."""

    max_length: int  # tokens per example (QA: per window)
    doc_stride: int  # QA: overlap between the windows of a long context


@dataclass
class Features:
    """What :meth:`Task.preprocess` returns: the model's inputs, and what evaluation needs besides.

    ``train``: the tokenized training split (columns the model takes, plus ``labels``).
    ``eval``: the tokenized evaluation splits by name, in scoring order: the task's
    ``eval_splits`` (``validation`` first), then ``test`` if the data has it.
    ``examples``: the raw splits they came from (QA post-processing maps answers back to them).
    ``extra``: anything else a kind's :meth:`Task.evaluate` needs, by the kind's own keys.
    """

    train: Dataset
    eval: dict[str, Dataset]
    examples: DatasetDict
    extra: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """One kind of fine-tuning task. Subclasses are frozen dataclasses built by a source.

    Every task has a ``name`` (shown in results and tables), a ``main_metric`` (the key of
    :meth:`evaluate`'s result used for model selection and reports) and ``eval_splits`` (the splits
    scored during and after training, ``"validation"`` first; ``"test"`` is scored once, at the
    end, whenever the data has it, and never selects anything).
    """

    name: str
    main_metric: str
    eval_splits: tuple[str, ...]

    #: The kind, as results.json records it ("classification", "regression", "extractive_qa", ...).
    kind: ClassVar[str]
    #: The model's job as the fine-tuning methods name it ("seq_cls", "qa", "causal_lm"): peft
    #: picks its model wrapper by it (see :data:`progtuning.methods.peft.TASK_TYPES`).
    task_type: ClassVar[str]
    #: Whether the Trainer evaluates the validation split at every epoch end (through
    #: :meth:`trainer_metrics`). QA cannot: its scores need post-processing outside the Trainer.
    evaluates_each_epoch: ClassVar[bool] = True

    # -- data --------------------------------------------------------------------------------
    @abstractmethod
    def check(self, data: DatasetDict) -> None:
        """Raise a one-line :class:`~progtuning.errors.ProgtuningError` if ``data`` cannot train
        this task (a split or column missing, a split empty, a label out of range). Called by
        :func:`~progtuning.tasks.registry.load_task` before anything is written."""

    def check_splits(self, data: DatasetDict, columns: tuple[str, ...], fix: str,
                     required: tuple[str, ...] | None = None) -> None:
        """The checks every kind's :meth:`check` starts with: the ``required`` splits (default:
        ``train`` and :attr:`eval_splits`) present, no split empty, every split with ``columns``
        (``fix`` says what to set when one is missing)."""
        for split in ("train", *self.eval_splits) if required is None else required:
            if split not in data:
                raise ProgtuningError(f"task {self.name} has no {split!r} split (found: {', '.join(data)}); provide one")
        for split, dataset in data.items():
            if len(dataset) == 0:
                raise ProgtuningError(f"the {split} split of {self.name} is empty: check the file or the subsampling")
            missing = [c for c in columns if c not in dataset.column_names]
            if missing:
                raise ProgtuningError(
                    f"{split} split of {self.name} lacks column(s) {', '.join(missing)} "
                    f"(has: {', '.join(dataset.column_names)}): {fix}"
                )

    @abstractmethod
    def preprocess(self, data: DatasetDict, tokenizer: Any, settings: Settings) -> Features:
        """Tokenize ``data`` (the raw splits, ``train`` plus evaluation splits) into :class:`Features`."""

    @abstractmethod
    def collator(self, tokenizer: Any) -> Callable[[list[dict]], dict]:
        """The data collator that batches :meth:`preprocess`'s rows (padding as the kind needs)."""

    # -- model -------------------------------------------------------------------------------
    @abstractmethod
    def model_class(self) -> type:
        """The transformers auto class that puts this kind's head on a pretrained model."""

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` that shape the head (``num_labels``, ...)."""
        return {}

    def load_model(self, path: str, **kwargs: Any) -> nn.Module:
        """The pretrained model at ``path`` with this kind's (new) head."""
        return self.model_class().from_pretrained(path, **self.model_kwargs(), **kwargs)

    def check_model(self, model: nn.Module, settings: Any) -> None:
        """Raise a one-line :class:`~progtuning.errors.ProgtuningError` if ``model`` (the loaded
        model, method applied) cannot run this task with these run settings (a ``TrainConfig``):
        say, ``max_length`` beyond the model's positions. Called by the runner before anything is
        written. Most kinds need no such check."""

    # -- scores ------------------------------------------------------------------------------
    def trainer_metrics(self) -> Callable[[Any], dict[str, float]] | None:
        """``compute_metrics`` for the Trainer's own evaluation (None: loss only)."""
        return None

    @abstractmethod
    def evaluate(self, trainer: Any, features: Features, split: str) -> dict[str, float]:
        """Score the trained model on ``features.eval[split]``: predict, post-process, score.

        ``trainer`` is the ``transformers.Trainer`` that trained the model (its ``evaluate`` /
        ``predict`` run the model over a split). Returns ``{metric: value}`` with
        :attr:`main_metric` among the keys.
        """

    def evaluate_with_outputs(self, trainer: Any, features: Features, split: str) -> tuple[dict[str, float], dict | None]:
        """:meth:`evaluate`, plus each example's label and model output where the kind keeps them.

        The outputs (``{"labels": [...], "outputs": [...]}``, in the split's order) let a report
        rescore a resampled split with the task's metric (a bootstrap over examples). Kinds whose
        score needs post-processing (QA) return ``None``.
        """
        return self.evaluate(trainer, features, split), None

    # -- new data: progtuning predict / evaluate -------------------------------------------------
    def input_columns(self) -> tuple[str, ...]:
        """The columns a file needs for this task to predict it (labels aside)."""
        raise self._no_reuse()

    def examples_from_table(self, table: Any, label_column: str | None, source: str) -> Dataset:
        """A user's table (a pandas ``DataFrame``) as this task's raw rows, labels mapped as in training.

        ``label_column``: the table's label column (``None``: unlabelled, for prediction). A missing
        column, an empty cell or an unknown label is a one-line :class:`~progtuning.errors.ProgtuningError`
        naming ``source``."""
        raise self._no_reuse()

    def features_for(self, examples: Dataset, tokenizer: Any, settings: Settings) -> Features:
        """:class:`Features` whose one evaluation split, ``"test"``, holds ``examples``."""
        from datasets import DatasetDict

        # preprocess() always tokenizes a training split too: here it is empty
        return self.preprocess(DatasetDict({"train": examples.select([]), "test": examples}), tokenizer, settings)

    def predictions(self, trainer: Any, features: Features, split: str) -> list[dict[str, Any]]:
        """One dict per example of ``features.examples[split]``: the prediction and its scores."""
        raise self._no_reuse()

    def _no_reuse(self) -> Exception:
        return ProgtuningError(f"{self.kind} tasks cannot predict or evaluate a new file yet: "
                               "score them with progtuning train's test split")

    def summary(self, data: DatasetDict) -> dict[str, Any]:
        """The task as results.json records it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "main_metric": self.main_metric,
            "num_labels": getattr(self, "num_labels", None),  # 1 for regression; none without a class head
            "sizes": {split: len(dataset) for split, dataset in data.items()},
        }


def scored_splits(task: Task, data: DatasetDict) -> list[str]:
    """The evaluation splits present in ``data``, in scoring order (``test`` last)."""
    return [split for split in (*task.eval_splits, "test") if split in data]


def fingerprint(dataset: Dataset, tokenizer: Any, *settings: Any) -> str:
    """A cache fingerprint for ``dataset.map(new_fingerprint=...)`` over a tokenizer.

    Without it, datasets hashes the map function by pickling its closure with dill, which walks
    the tokenizer and every global it reaches: minutes on a small CPU for a one-second map.
    """
    key = repr((dataset._fingerprint, tokenizer.name_or_path, len(tokenizer), *settings))
    return hashlib.sha256(key.encode()).hexdigest()[:16]
