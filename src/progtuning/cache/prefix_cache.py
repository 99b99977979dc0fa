"""The frozen-prefix cache: compute the frozen bottom of the model once per example, reuse it.

In stage t of a progressive schedule with the embeddings frozen, the embeddings and blocks
0 … k−1 (k = the lowest block that trains) never change again. Run in eval mode they are a
deterministic function of the example, so their output — the hidden states entering block k —
can be computed once and fed straight into block k in every later step: the forward of the
prefix disappears (its backward already had: nothing below block k requires grad, so autograd
builds no graph there).

How it works
------------
* **What is stored**: per example, the *unpadded* hidden states after block k−1 (``[len, hidden]``,
  the model's dtype), in one flat array with offsets: in RAM while it fits ``budget_mb``, else in
  a ``numpy.memmap`` file in the folder you give (a temporary one otherwise).
* **Keyed by example**: the training set carries an ``example_index`` column (the row number,
  :func:`add_example_index`); :class:`ExampleIndexCollator` passes it through the collator as a
  tensor. The lookup happens at forward time, not in the collator (the Trainer fetches a batch
  before ``on_step_begin``, i.e. before a stage switch), and pads each batch on the right to its
  own length, so shuffling and dynamic padding stay right. (A left-padded batch runs uncached:
  the heads read position 0, which would then be a pad token.)
* **Injection**: :meth:`FrozenPrefixCache.attach` replaces the ``forward`` of the embeddings and of
  every block by a thin switch. In a training forward whose batch has an index while the cache is
  active, the embeddings return the cached states, blocks 0 … k−1 pass them through untouched and
  blocks k … L−1 run as usual; the model itself still builds the attention mask (and MPNet its
  relative position bias) from ``input_ids`` / ``attention_mask``, which the batch still carries.
  Absolute positions (BERT, RoBERTa) are already inside the cached states. Any other forward
  (evaluation, a batch without an index) runs the whole model normally.
* **Incremental build**: the cache for stage t+1 is part t run once, in eval mode under
  ``torch.no_grad``, over stage t's cache, in place, in length-sorted batches (little padding).
  A cache built from scratch runs the embeddings and blocks 0 … k−1.
* **Equivalence**: with the frozen prefix in eval mode, a cached training step computes the same
  loss as the uncached one. Positions past an example's length hold zeros instead of the
  prefix's output at pad tokens; they are masked as attention keys, so no real position sees
  them. Trainable blocks draw the same dropout masks in both paths: an eval-mode prefix draws
  none. The build pads each example to its row as the dataset holds it, so with rows of one
  length (``padding="max_length"``, SQuAD features) both paths see the same shapes and agree to
  the last bit (tested on MiniLM-L6). With dynamic padding the uncached prefix runs at the
  batch's padded length, whose attention sums round differently (float rounding in the states).

When it turns itself off (with the reason, see :meth:`PrefixCacheCallback.records`): the
embeddings train in the stage, no block is frozen yet, frozen blocks keep dropout on
(``eval_frozen_blocks=False``), a prefix unit the schedule trains but the method does not keeps
its dropout on (the embeddings under LoRA with ``embeddings="always"``), inputs are random (an
MLM collator, a ``set_transform`` dataset), several processes (DDP), or the batches carry no
example index. Supported models:
BERT-family encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, MPNet, DistilBERT), plain or
wrapped by peft; others are refused with a one-line :class:`ProgtuningError`.

Use it with the HF Trainer::

    train = add_example_index(train)
    cache = FrozenPrefixCache(model, train, budget_mb=2048, folder="runs/x/cache")
    progtuning = ProgtuningCallback(schedule)
    args = TrainingArguments(..., remove_unused_columns=False)   # keep example_index
    trainer = Trainer(model, args, train_dataset=train, data_collator=ExampleIndexCollator(collator),
                      callbacks=[progtuning, PrefixCacheCallback(progtuning, cache)])  # this order

The pieces: :mod:`~progtuning.cache.data` (the example index), :mod:`~progtuning.cache.prefix`
(which modules form the prefix), :mod:`~progtuning.cache.store` (RAM or memmap rows), this module
(building, lookup and the patched forwards) and :mod:`~progtuning.cache.callback` (the Trainer side).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from progtuning.cache.data import INDEX_COLUMN, example_lengths, rows_of
from progtuning.cache.prefix import locate
from progtuning.cache.store import StateStore
from progtuning.core.blocks import BlockLayout, find_blocks
from progtuning.errors import ProgtuningError

logger = logging.getLogger("progtuning")

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a build batch feeds the model


@dataclass
class _Run:
    """What the patched forwards do in the forward now running."""

    states: torch.Tensor | None  # fed as the embeddings' output (None: run the embeddings)
    lo: int  # blocks [lo, hi) run; the others pass their input through
    hi: int


class FrozenPrefixCache:
    """Hidden states after the frozen prefix (embeddings + blocks 0 … level−1), per training example.

    ``dataset`` is the tokenized training set (rows with ``input_ids``, optionally
    ``attention_mask`` / ``token_type_ids``) whose ``index_column`` holds the row number
    (:func:`add_example_index`). ``budget_mb``: largest in-RAM cache; beyond it the states go to a
    memory-mapped file in ``folder`` (``storage="memory"`` / ``"memmap"`` forces one).
    ``dtype``: storage dtype (default: what the prefix computes). Raises :class:`ProgtuningError`
    for a model it cannot drive (see :func:`unsupported_reason` to ask first).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset,
        *,
        layout: BlockLayout | None = None,
        index_column: str = INDEX_COLUMN,
        budget_mb: float = 1024,
        folder: str | None = None,
        storage: str = "auto",
        dtype: torch.dtype | None = None,
        build_batch_size: int = 64,
        pad_token_id: int | None = None,
    ) -> None:
        if storage not in ("auto", "memory", "memmap"):
            raise ProgtuningError(f"unknown cache storage {storage!r}: use auto, memory or memmap")
        self.model = model
        self.layout = layout or find_blocks(model)
        self.prefix = locate(model, self.layout)
        self.dataset = dataset
        self.index_column = index_column
        self.budget_mb = budget_mb
        self.folder = folder
        self.storage = storage
        self.dtype = dtype
        self.build_batch_size = max(1, int(build_batch_size))
        config = self.prefix.root.config
        self.pad_token_id = pad_token_id if pad_token_id is not None else (getattr(config, "pad_token_id", None) or 0)
        # lengths: the tokens stored per example; widths: the row as the dataset holds it (longer
        # when the dataset is padded already). Builds pad to the widths, as training batches do, so
        # pre-padded data sees the same shapes in both paths and the numbers agree to the last bit.
        self.lengths, self.widths = example_lengths(dataset)
        self._check_index(dataset)
        self.level: int | None = None  # states after block level-1 (0: the embeddings' output); None: empty
        self.active_level: int | None = None  # the level training forwards use now; None: cache off
        self.builds: list[dict] = []
        self.hits = 0  # training forwards that used the cache
        self.misses = 0  # training forwards with the cache active but no index in the batch
        self._store: StateStore | None = None
        self._run: _Run | None = None
        self._run_from_hook = False
        self._building = False
        self._warned: set[str] = set()
        self._handles: list = []
        self._patched: list[tuple[nn.Module, Callable | None]] = []

    # -- state -------------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return self._store.nbytes if self._store is not None else 0

    @property
    def storage_kind(self) -> str | None:
        return self._store.kind if self._store is not None else None

    @property
    def path(self) -> str | None:
        return self._store.path if self._store is not None else None

    def activate(self, level: int) -> None:
        """Feed cached states into block ``level`` in training forwards (build them first)."""
        if self.level != level:
            raise ProgtuningError(f"the cache holds level {self.level}, not {level}: call extend_to({level}) first")
        if not self._patched:
            self.attach()
        self.active_level = level

    def deactivate(self) -> None:
        self.active_level = None

    def invalidate(self) -> None:
        """Forget the stored states (something in the prefix trained again)."""
        self.deactivate()
        self.level = None

    # -- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Patch the embeddings' and blocks' forward and hook the model's forward (idempotent)."""
        if self._patched:
            return
        prefix = self.prefix
        self._patch(prefix.embeddings, self._embeddings_forward(prefix.embeddings))
        if prefix.project is not None:
            self._patch(prefix.project, self._projection_forward(prefix.project))
        for index, block in enumerate(prefix.blocks):
            self._patch(block, self._block_forward(block, index))
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, always_call=True))

    def detach(self) -> None:
        """Undo :meth:`attach`: the model runs exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, previous in reversed(self._patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched = []
        self._run = None
        self.active_level = None

    def close(self) -> None:
        """Detach and free the stored states (and delete the memmap file)."""
        self.detach()
        self.level = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "FrozenPrefixCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _patch(self, module: nn.Module, forward: Callable) -> None:
        # keep a forward someone else set on the instance, to put it back on detach
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def _embeddings_forward(self, module: nn.Module):
        original = module.forward

        def forward(*args, **kwargs):
            run = self._run
            if run is not None and run.states is not None:
                return run.states
            return original(*args, **kwargs)

        return forward

    def _projection_forward(self, module: nn.Module):
        # ELECTRA's projection: skipped whenever cached states replace the embeddings' output.
        original = module.forward

        def forward(*args, **kwargs):
            run = self._run
            if run is not None and run.states is not None:
                return args[0] if args else next(iter(kwargs.values()))
            return original(*args, **kwargs)

        return forward

    def _block_forward(self, module: nn.Module, index: int):
        original = module.forward
        tuple_output = self.prefix.tuple_output

        def forward(*args, **kwargs):
            run = self._run
            if run is None or run.lo <= index < run.hi:
                return original(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if tuple_output else hidden

        return forward

    def _before_forward(self, module, args, kwargs):
        index = kwargs.pop(self.index_column, None)
        if self.active_level is None or not module.training or self._run is not None:
            return args, kwargs
        if index is None:
            self.misses += 1
            if "index" not in self._warned:
                self._warned.add("index")
                logger.warning(
                    "progtuning: training batches carry no %r, so the frozen-prefix cache is not used; wrap the "
                    "collator in ExampleIndexCollator and keep the column (TrainingArguments(remove_unused_columns=False))",
                    self.index_column,
                )
            return args, kwargs
        mask = kwargs.get("attention_mask")
        if mask is not None and bool((mask[:, 0] == 0).any()):
            # Left padding: the heads read position 0, a pad token whose prefix output the cache does
            # not hold (and BERT-style positions would shift). Run the uncached forward instead.
            self.misses += 1
            if "left" not in self._warned:
                self._warned.add("left")
                logger.warning(
                    "progtuning: left-padded training batch: the frozen-prefix cache is not used for it "
                    "(BERT-family models pad on the right)"
                )
            return args, kwargs
        ids = kwargs.get("input_ids")
        reference = ids if ids is not None else mask
        if reference is None:
            raise ProgtuningError("the frozen-prefix cache needs input_ids or attention_mask in the batch")
        device = reference.device
        states = self.lookup(index.tolist(), reference.shape[1], device=device, dtype=self._compute_dtype())
        self._run = _Run(states=states, lo=self.active_level, hi=len(self.prefix.blocks))
        self._run_from_hook = True
        self.hits += 1
        return args, kwargs

    def _after_forward(self, module, args, output):
        # always_call=True: this also runs when the forward raised, so no states are left behind.
        if self._run_from_hook:
            self._run = None
            self._run_from_hook = False

    def _compute_dtype(self) -> torch.dtype:
        return next(self.prefix.embeddings.parameters()).dtype

    # -- lookup ------------------------------------------------------------------------------
    def lookup(
        self,
        indices: Sequence[int],
        seq_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The cached states of ``indices``, right-padded with zeros to ``[len(indices), seq_len, hidden]``.

        The zeros stand where the uncached forward has the prefix's output at pad tokens; pads are
        masked as attention keys, so no real position sees the difference.
        """
        if self._store is None or (self.level is None and not self._building):
            raise ProgtuningError("the frozen-prefix cache is empty: build it with extend_to(level) first")
        store = self._store
        out = torch.zeros(len(indices), seq_len, store.hidden, dtype=store.dtype)
        for row, i in enumerate(indices):
            if not 0 <= i < self.num_examples:
                raise ProgtuningError(
                    f"example index {i} is outside the cached training set (0..{self.num_examples - 1}): "
                    "the cache was built on another dataset"
                )
            n = int(self.lengths[i])
            if n > seq_len:
                raise ProgtuningError(
                    f"example {i} has {n} tokens but its batch only {seq_len}: the collator truncates, so the "
                    "cache cannot be used; tokenize with the final max_length"
                )
            out[row, :n] = store.row(i)
        dtype = dtype or store.dtype
        return out.to(device=device, dtype=dtype, non_blocking=True)

    # -- building ----------------------------------------------------------------------------
    def extend_to(self, level: int, *, autocast: torch.dtype | None = None) -> float:
        """Make the cache hold the states entering block ``level``; returns the seconds it took.

        From the current level j ≤ level only blocks j … level−1 run (over the stored states);
        from an empty cache (or a higher level) the embeddings and blocks 0 … level−1 run.
        The model runs in eval mode under ``torch.no_grad`` (and ``autocast`` if given).
        """
        num_blocks = len(self.prefix.blocks)
        if not 0 <= level <= num_blocks:
            raise ProgtuningError(f"cache level {level} is outside 0..{num_blocks}")
        if self.level == level:
            return 0.0
        start = self.level if self.level is not None and self.level <= level else None
        started = time.perf_counter()
        self.active_level = None
        self.level = None  # the states are rewritten in place: invalid until the build finishes
        if not self._patched:
            self.attach()
        model = self.model
        was_training = model.training
        device = next(model.parameters()).device
        target = self.prefix.blocks[level - 1] if level > 0 else (self.prefix.project or self.prefix.embeddings)
        captured: list[torch.Tensor] = []

        def capture(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = target.register_forward_hook(capture)
        model.eval()
        self._building = True
        amp = (
            torch.autocast(device_type=device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        )
        try:
            with torch.no_grad(), amp:
                for ids in self._build_batches():
                    inputs = self._collate(ids, device)
                    if start is None:
                        self._run = _Run(states=None, lo=0, hi=level)
                    else:
                        states = self.lookup(ids, inputs["input_ids"].shape[1], device=device, dtype=self._compute_dtype())
                        self._run = _Run(states=states, lo=start, hi=level)
                    captured.clear()
                    model(**inputs)
                    self._run = None
                    out = captured[-1]
                    if self._store is None:
                        self._store = StateStore(
                            self.lengths, out.shape[-1], self.dtype or out.dtype, self.budget_mb, self.folder, self.storage
                        )
                    for row, i in enumerate(ids):
                        self._store.write(i, out[row, : int(self.lengths[i])])
        finally:
            self._run = None
            self._building = False
            handle.remove()
            model.train(was_training)
        self._store.flush()
        self.level = level
        seconds = time.perf_counter() - started
        self.builds.append(
            {"from_level": start, "to_level": level, "seconds": round(seconds, 4), "storage": self._store.kind}
        )
        return seconds

    def _build_batches(self) -> list[list[int]]:
        order = np.lexsort((-self.lengths, -self.widths))  # longest rows first: least padding
        size = self.build_batch_size
        return [order[i : i + size].tolist() for i in range(0, len(order), size)]

    def _collate(self, ids: list[int], device) -> dict[str, torch.Tensor]:
        rows = rows_of(self.dataset, ids)
        width = max(int(self.widths[i]) for i in ids)
        batch: dict[str, torch.Tensor] = {}
        for key in MODEL_INPUTS:
            if key not in rows:
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            tensor = torch.full((len(ids), width), fill, dtype=torch.long)
            for r, values in enumerate(rows[key]):
                tensor[r, : len(values)] = torch.as_tensor(values, dtype=torch.long)
            batch[key] = tensor.to(device)
        if "attention_mask" not in batch:
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, i in enumerate(ids):
                mask[r, : int(self.lengths[i])] = 1
            batch["attention_mask"] = mask.to(device)
        return batch

    def _check_index(self, dataset) -> None:
        names = getattr(dataset, "column_names", None)
        if names is not None:
            if self.index_column not in names:
                raise ProgtuningError(
                    f"the training set has no {self.index_column!r} column: add it with add_example_index(dataset)"
                )
            values = np.asarray(dataset[self.index_column])
            if not np.array_equal(values, np.arange(len(values))):
                raise ProgtuningError(
                    f"the {self.index_column!r} column must be the row number 0..{len(values) - 1}: "
                    "add it with add_example_index(dataset) after the last filter/shuffle"
                )
