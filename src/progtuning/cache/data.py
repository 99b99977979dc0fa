"""The cache's data side: the example index a training set carries, and whether its inputs are cacheable.

The cache stores states per training example, keyed by the row number: :func:`add_example_index`
adds it as a column, :class:`ExampleIndexCollator` carries it through the collator as a tensor, and
:func:`input_reason` refuses inputs that change from epoch to epoch (random collators, on-the-fly
transforms, streamed datasets).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from progtuning.errors import ProgtuningError

INDEX_COLUMN = "example_index"

# Collators that draw random inputs every epoch: a cached prefix would freeze one draw.
RANDOM_COLLATORS = (
    "DataCollatorForLanguageModeling",
    "DataCollatorForWholeWordMask",
    "DataCollatorForPermutationLanguageModeling",
    "DataCollatorForSOP",
)


def add_example_index(dataset, column: str = INDEX_COLUMN):
    """Add the row number as ``column`` (a ``datasets.Dataset``): the key the cache looks up."""
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, list(range(len(dataset))))


class ExampleIndexCollator:
    """Wraps a collator so each batch carries its examples' index as a tensor under ``column``.

    Features without the column pass through unchanged (evaluation sets need none).
    """

    def __init__(self, collator: Callable[[list[dict]], dict] | None = None, column: str = INDEX_COLUMN) -> None:
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        self.collator = collator
        self.column = column

    def __call__(self, features: list[dict]) -> dict:
        if not features or self.column not in features[0]:
            return self.collator(features)
        index = [int(f[self.column]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[self.column] = torch.tensor(index, dtype=torch.long)
        return batch


def input_reason(dataset=None, collator=None) -> str | None:
    """Why the inputs can't be cached (random per epoch), or ``None`` if they can."""
    inner = collator
    while inner is not None:
        if type(inner).__name__ in RANDOM_COLLATORS:
            return f"the collator {type(inner).__name__} draws random inputs every epoch (data augmentation)"
        inner = getattr(inner, "collator", None) or getattr(inner, "data_collator", None)
    if dataset is not None:
        fmt = getattr(dataset, "format", None)
        if isinstance(fmt, dict) and fmt.get("type") == "custom":
            return "the training set has an on-the-fly transform (set_transform / with_transform), which may be random"
        if isinstance(dataset, torch.utils.data.IterableDataset) or type(dataset).__name__ == "IterableDataset":
            return "the training set is an iterable (streamed) dataset: its examples have no stable index"
    return None


def rows_of(dataset, ids: list[int]) -> dict[str, list]:
    """Columns of rows ``ids``: one batched read for a ``datasets.Dataset``, else row by row."""
    if hasattr(dataset, "column_names"):
        return dataset[ids]
    rows = [dataset[i] for i in ids]
    return {key: [row[key] for row in rows] for key in rows[0]}


def example_lengths(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the tokens that matter (the attention mask's leading ones if the row is
    right-padded, else all) and the row's width."""
    n = len(dataset)
    lengths = np.zeros(n, dtype=np.int64)
    widths = np.zeros(n, dtype=np.int64)
    chunk = 1000
    for start in range(0, n, chunk):
        ids = list(range(start, min(n, start + chunk)))
        rows = rows_of(dataset, ids)
        if "input_ids" not in rows:
            raise ProgtuningError("the frozen-prefix cache needs a tokenized training set with an input_ids column")
        masks = rows.get("attention_mask")
        for r, ids_row in enumerate(rows["input_ids"]):
            length = len(ids_row)
            if masks is not None:
                mask = list(masks[r])
                ones = int(sum(mask))
                if mask[:ones] == [1] * ones:  # right-padded (or not padded): trim the padding
                    length = ones
            lengths[start + r] = length
            widths[start + r] = len(ids_row)
    if n and lengths.min() < 1:
        raise ProgtuningError("the training set has an example with no tokens: drop empty examples first")
    return lengths, widths
