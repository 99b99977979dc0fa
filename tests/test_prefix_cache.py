"""The frozen-prefix cache: same numbers as the uncached path, keyed by example, off when wrong."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import datasets
import pytest
import torch

from conftest import TINY_HIDDEN, tiny_config, tiny_model
from float_tolerance import (
    assert_close_to_rounding,
    max_difference,
    reordered_sum_tolerance,
    sgd_drift_tolerance,
)
from progtuning.core.blocks import find_blocks
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.cache.callback import PrefixCacheCallback
from progtuning.cache.data import INDEX_COLUMN, ExampleIndexCollator, add_example_index
from progtuning.cache.prefix import unsupported_reason
from progtuning.cache.prefix_cache import FrozenPrefixCache
from progtuning.core.schedule import progressive

PAD = {"roberta": 1, "xlm-roberta": 1}
FFN = 64  # the tiny configs' intermediate size: the longest sum in a block


def prefix_tolerance(values: torch.Tensor, depth: int) -> float:
    """The cache computes the prefix in other batches, padded to other lengths, than the uncached
    forward: the same math with sums in another order (another GEMM shape, more masked keys)."""
    return reordered_sum_tolerance(float(values.detach().abs().max()), terms=FFN, depth=depth)


def ragged_dataset(n: int = 12, seed: int = 1, pad_to: int | None = None) -> datasets.Dataset:
    """Examples of 3..11 tokens (optionally pre-padded on the right to ``pad_to``) with an index column."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        ids = torch.randint(5, 100, (length,), generator=generator).tolist()
        mask = [1] * length
        if pad_to:
            ids, mask = ids + [0] * (pad_to - length), mask + [0] * (pad_to - length)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": i % 2})
    return add_example_index(datasets.Dataset.from_list(rows))


def pad_collate(pad_id: int = 0, side: str = "right"):
    def collate(features):
        width = max(len(f["input_ids"]) for f in features)

        def pad(values, fill):
            padding = [fill] * (width - len(values))
            return padding + list(values) if side == "left" else list(values) + padding

        return {
            "input_ids": torch.tensor([pad(f["input_ids"], pad_id) for f in features]),
            "attention_mask": torch.tensor([pad(f["attention_mask"], 0) for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    return collate


def batch_of(dataset, ids, pad_id=0, side="right"):
    collate = ExampleIndexCollator(pad_collate(pad_id, side))
    return collate([dataset[i] for i in ids])


# ---------------------------------------------------------------------------------------------
# equivalence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta", "electra", "mpnet", "distilbert"])
def test_cached_forward_equals_the_full_forward(arch):
    model = tiny_model(arch, num_layers=4, **({"embedding_size": 16} if arch == "electra" else {}))
    data = ragged_dataset()
    cache = FrozenPrefixCache(model, data, build_batch_size=5)
    cache.extend_to(2)
    batch = batch_of(data, [7, 2, 11, 0], PAD.get(arch, 0))  # shuffled order, padded to the longest
    index = batch.pop(INDEX_COLUMN)
    model.train()
    expected = model(**batch).logits
    cache.activate(2)
    got = model(**batch, **{INDEX_COLUMN: index}).logits
    assert cache.hits == 1
    # 4 blocks, the pooler and the classifier: 6 reductions between the cached states and the logits
    assert_close_to_rounding(got, expected, prefix_tolerance(expected, depth=6))
    cache.close()
    # the same forward on the same batch in this process: bit-identical, so the model is untouched
    assert torch.equal(model(**batch).logits, expected)


def test_pre_padded_examples_are_stored_unpadded():
    model = tiny_model("bert", num_layers=3)
    data = ragged_dataset(pad_to=12)  # as SQuAD features come: padded to max_length on the right
    cache = FrozenPrefixCache(model, data, build_batch_size=4)
    assert cache.lengths.max() < 12  # the right padding is trimmed
    cache.extend_to(1)
    batch = batch_of(data, [3, 9, 1])  # every row 12 long, padded in the dataset
    index = batch.pop(INDEX_COLUMN)
    model.train()
    expected = model(**batch).logits
    cache.activate(1)
    got = model(**batch, **{INDEX_COLUMN: index}).logits
    assert cache.hits == 1
    assert_close_to_rounding(got, expected, prefix_tolerance(expected, depth=5))  # 3 blocks, pooler, classifier
    cache.close()


def test_left_padded_batches_run_uncached(caplog):
    model = tiny_model("bert", num_layers=3)  # position 0 would be a pad token the cache does not hold
    data = ragged_dataset()
    cache = FrozenPrefixCache(model, data)
    cache.extend_to(1)
    cache.activate(1)
    batch = batch_of(data, [3, 9, 1], side="left")
    model.train()
    with caplog.at_level(logging.WARNING, logger="progtuning"):
        model(**batch)
    assert (cache.hits, cache.misses) == (0, 1) and "left-padded" in caplog.text
    cache.close()


def test_incremental_build_equals_a_build_from_scratch_and_lookup_is_keyed_by_example():
    model = tiny_model("bert", num_layers=4)
    data = ragged_dataset()
    step = FrozenPrefixCache(model, data, build_batch_size=3)
    for level in range(4):
        step.extend_to(level)
    scratch = FrozenPrefixCache(model, data, build_batch_size=7)
    scratch.extend_to(3)
    order = [5, 0, 11, 3]
    stepwise = step.lookup(order, 11)
    # built in batches of 3 and of 7 (other padded lengths): equal up to rounding over 3 blocks
    assert_close_to_rounding(stepwise, scratch.lookup(order, 11), prefix_tolerance(stepwise, depth=3))
    # keyed by example: the rows follow the requested order (the same stored values: bit-identical)
    reverse = step.lookup(order[::-1], 11)
    assert torch.equal(reverse, stepwise.flip(0))
    assert [b["from_level"] for b in step.builds] == [None, 0, 1, 2]
    step.close()
    scratch.close()


def test_memmap_storage_matches_memory_and_is_deleted(tmp_path):
    model = tiny_model("bert", num_layers=3)
    data = ragged_dataset()
    in_ram = FrozenPrefixCache(model, data, storage="memory")
    on_disk = FrozenPrefixCache(model, data, budget_mb=0, folder=str(tmp_path))  # over budget: memmap
    in_ram.extend_to(2)
    on_disk.extend_to(2)
    assert (in_ram.storage_kind, on_disk.storage_kind) == ("memory", "memmap")
    assert on_disk.path and os.path.exists(on_disk.path)
    assert on_disk.nbytes == int(in_ram.lengths.sum()) * TINY_HIDDEN * 4
    # built by the same kernels from the same batches; only where the values are kept differs
    assert torch.equal(in_ram.lookup(range(12), 11), on_disk.lookup(range(12), 11))
    path = on_disk.path
    on_disk.close()
    in_ram.close()
    assert not os.path.exists(path)


def _data_and_collator():
    data = ragged_dataset(n=16)
    return data, ExampleIndexCollator(pad_collate())


def _train(model, data, collator, callbacks, tmp_path, epochs=4, lr=1e-1, batch_size=4):
    """Train with plain SGD. The cached and the uncached run differ by rounding in the prefix, and
    Adam would blow that up: an attention key bias has a gradient that is zero by construction
    (softmax ignores a shift of a whole row), so what is computed is rounding noise, which Adam
    normalises into steps of up to lr (measured: 3e-5 apart after 16 steps with AVX2 kernels).
    SGD keeps rounding at rounding size, so the runs can be compared tightly."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
        optim="sgd", save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        remove_unused_columns=False, logging_strategy="no", disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks).train()
    return model


def test_trainer_run_with_the_cache_gives_the_same_weights(tmp_path):
    """Dropout on in the trainable blocks: the eval-mode prefix draws no random numbers, so the
    trainable blocks draw the same masks with and without the cache, and shuffling is keyed."""
    from progtuning.core.callback import ProgtuningCallback

    results = []
    for use_cache in (False, True):
        model = tiny_model("bert", num_layers=4, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        data, collator = _data_and_collator()
        progtuning = ProgtuningCallback(progressive(4, 4, "never"))
        cache = FrozenPrefixCache(model, data, build_batch_size=5) if use_cache else None
        callback = PrefixCacheCallback(progtuning, cache)
        _train(model, data, collator, [progtuning, callback], tmp_path / str(use_cache))
        results.append((model.state_dict(), callback, cache))
    (plain, _, _), (cached, callback, cache) = results
    assert [r["cache"] for r in callback.records] == [False, True, True, True]
    assert [r["level"] for r in callback.records] == [None, 1, 2, 3]
    assert cache.hits == 12 and cache.misses == 0  # stages 2-4, 4 steps each
    assert [b["from_level"] for b in cache.builds] == [None, 1, 2]  # incremental after the first
    # Cached states come from other batches padded to other lengths: the same math in another order.
    # Bit-identical with AVX-512 kernels, 4e-9 apart with AVX2 ones; a wrong example or dropout mask
    # would move the weights by ~lr·|g|, like the run itself does.
    drift, moved = max_difference(plain, cached), max_difference(plain, initial)
    assert drift <= sgd_drift_tolerance(16, plain) < moved / 100
    assert cache.level is None  # closed at train end


# ---------------------------------------------------------------------------------------------
# off when it would be wrong
# ---------------------------------------------------------------------------------------------
def _switch(model, policy="never", eval_frozen=True, stage=1, collator=None, args=None, data=None):
    data = data or ragged_dataset()
    freezer = ProgressiveFreezer(model, progressive(4, 4, policy), eval_frozen_blocks=eval_frozen)
    cache = FrozenPrefixCache(model, data)
    callback = PrefixCacheCallback(SimpleNamespace(freezer=freezer), cache, collator=collator)
    args = args or SimpleNamespace(world_size=1, remove_unused_columns=False)
    callback.on_train_begin(args, None, None, model=model)
    freezer.apply(stage)
    callback.on_step_begin(args, None, None)
    record = callback.records[-1]
    cache.close()
    return record


def test_off_while_the_embeddings_train(caplog):
    record = _switch(tiny_model("bert"), policy="always")
    assert record["cache"] is False and "embeddings train in stage 1" in record["reason"]


def test_off_while_a_head_tied_to_the_word_embeddings_trains():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config("bert"))  # its decoder is the word-embedding table
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    record = _switch(model, policy="never")  # the head (and so the table) trains in every stage
    assert record["cache"] is False and "embeddings train in stage 1" in record["reason"]


def test_off_when_frozen_blocks_keep_dropout_on():
    model = tiny_model("bert", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    record = _switch(model, eval_frozen=False)
    assert record["cache"] is False and "dropout" in record["reason"] and "eval_frozen_blocks" in record["reason"]
    # without any dropout the train-mode prefix is deterministic: the cache is fine
    assert _switch(tiny_model("bert"), eval_frozen=False)["cache"] is True


def test_off_where_untrained_embeddings_keep_their_dropout_on():
    """LoRA-style: the method freezes the embeddings. With `embeddings: always` the schedule still
    counts them as training, so the freezer leaves them in train mode, dropout on; states cached in
    eval mode would train another model than the uncached run."""

    def method_frozen_embeddings():
        model = tiny_model("bert", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        model.bert.embeddings.requires_grad_(False)
        return model

    record = _switch(method_frozen_embeddings(), policy="always")
    assert record["cache"] is False and "no parameter there" in record["reason"]
    assert _switch(method_frozen_embeddings(), policy="never")["cache"] is True  # frozen in eval mode
    # without dropout the embeddings' train mode is deterministic: nothing to refuse
    plain = tiny_model("bert")
    plain.bert.embeddings.requires_grad_(False)
    assert _switch(plain, policy="always")["cache"] is True


def test_off_with_random_inputs_or_dropped_index(caplog):
    from transformers import DataCollatorForLanguageModeling

    mlm = DataCollatorForLanguageModeling(tokenizer=None, mlm=False)
    with caplog.at_level(logging.WARNING, logger="progtuning"):
        record = _switch(tiny_model("bert"), collator=ExampleIndexCollator(mlm))
    assert "DataCollatorForLanguageModeling draws random inputs" in record["reason"]
    assert "frozen-prefix cache off in stage 1" in caplog.text
    args = SimpleNamespace(world_size=1, remove_unused_columns=True)
    train_dataloader = object()  # only checked for presence

    model = tiny_model("bert")
    data = ragged_dataset()
    freezer = ProgressiveFreezer(model, progressive(4, 4, "never"))
    callback = PrefixCacheCallback(SimpleNamespace(freezer=freezer), FrozenPrefixCache(model, data))
    callback.on_train_begin(args, None, None, model=model, train_dataloader=train_dataloader)
    freezer.apply(2)
    callback.on_step_begin(args, None, None)
    assert "remove_unused_columns=False" in callback.records[-1]["reason"]
    assert _switch(tiny_model("bert"), args=SimpleNamespace(world_size=2, remove_unused_columns=False))[
        "reason"
    ].startswith("several training processes")


def test_a_prefix_that_trains_again_is_rebuilt_from_scratch():
    from progtuning.core.schedule import explicit

    model = tiny_model("bert")
    freezer = ProgressiveFreezer(model, explicit(4, [[2, 3], [1, 2, 3], [3]], "never"))
    cache = FrozenPrefixCache(model, ragged_dataset())
    callback = PrefixCacheCallback(SimpleNamespace(freezer=freezer), cache)
    args = SimpleNamespace(world_size=1, remove_unused_columns=False)
    callback.on_train_begin(args, None, None, model=model)
    for stage in range(3):
        freezer.apply(stage)
        callback.on_step_begin(args, None, None)
    assert [r["level"] for r in callback.records] == [2, 1, 3]
    # growing to block 1: the stored level-2 states are dropped and rebuilt; then extended 1 -> 3
    assert [(b["from_level"], b["to_level"]) for b in cache.builds] == [(None, 2), (None, 1), (1, 3)]
    cache.close()


def test_set_transform_dataset_is_refused():
    data = ragged_dataset()
    data.set_transform(lambda batch: batch)
    assert "on-the-fly transform" in _switch(tiny_model("bert"), data=data)["reason"]


def test_batches_without_an_index_fall_back_to_the_full_forward(caplog):
    model = tiny_model("bert", num_layers=3)
    data = ragged_dataset()
    cache = FrozenPrefixCache(model, data)
    cache.extend_to(2)
    cache.activate(2)
    batch = batch_of(data, [1, 2])
    batch.pop(INDEX_COLUMN)
    model.train()
    with caplog.at_level(logging.WARNING, logger="progtuning"):
        model(**batch)
    assert cache.misses == 1 and cache.hits == 0 and "ExampleIndexCollator" in caplog.text
    model.eval()
    batch = batch_of(data, [1, 2])  # evaluation never uses the cache, the index is dropped
    model(**batch)
    assert cache.hits == 0
    cache.close()


def test_unsupported_models_and_bad_indices_are_refused():
    gpt2 = tiny_model("gpt2")
    reason = unsupported_reason(gpt2)
    assert reason and "BERT-family" in reason and "\n" not in reason
    with pytest.raises(ProgtuningError, match="BERT-family"):
        FrozenPrefixCache(gpt2, ragged_dataset())
    data = ragged_dataset().remove_columns(INDEX_COLUMN)
    with pytest.raises(ProgtuningError, match="add_example_index"):
        FrozenPrefixCache(tiny_model("bert"), data)
    shuffled = ragged_dataset().shuffle(seed=0).flatten_indices()
    with pytest.raises(ProgtuningError, match="row number"):
        FrozenPrefixCache(tiny_model("bert"), shuffled)
    cache = FrozenPrefixCache(tiny_model("bert"), ragged_dataset())
    cache.extend_to(1)
    with pytest.raises(ProgtuningError, match="outside the cached training set"):
        cache.lookup([99], 12)
    cache.close()


# ---------------------------------------------------------------------------------------------
# no graph below the lowest trainable block
# ---------------------------------------------------------------------------------------------
def _graph(model, batch):
    """Saved tensors of one forward and the parameters backward reaches."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(**batch).loss
    reached, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            reached.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(saved), reached


def test_no_autograd_graph_below_the_lowest_trainable_block():
    model = tiny_model("bert", num_layers=4)
    data = ragged_dataset()
    layout = find_blocks(model)
    batch = batch_of(data, [0, 1, 2])
    index = batch.pop(INDEX_COLUMN)
    model.train()
    counts = {}
    for policy in ("always", "never"):
        freezer = ProgressiveFreezer(model, progressive(4, 2, policy), layout)
        freezer.apply(1)  # blocks 0-1 frozen
        counts[policy], reached = _graph(model, batch)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {layout.groups[names[i]] for i in reached}
        if policy == "never":
            assert groups == {2, 3, "head"}  # nothing below block 2 is in the graph
        else:
            assert "embeddings" in groups and not {0, 1} & groups
        freezer.restore()
        freezer.close()
    # the cached forward runs nothing below block 2, and saves exactly as much as the frozen one
    freezer = ProgressiveFreezer(model, progressive(4, 2, "never"), layout)
    freezer.apply(1)
    cache = FrozenPrefixCache(model, data)
    cache.extend_to(2)
    cache.activate(2)
    cached_count, _ = _graph(model, dict(batch, **{INDEX_COLUMN: index}))
    assert cached_count == counts["never"] < counts["always"]
    cache.close()


# ---------------------------------------------------------------------------------------------
# a real model on a real built-in task
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_task_naive_no_grad_and_cached_prefix_train_identically(tmp_path):
    """MiniLM-L6 on rotten-tomatoes (32 examples, T=3, embeddings never trained, dropout 0.1 in the
    trainable blocks), three runs on one seed: naive (autograd forced through the frozen prefix),
    no-grad prefix (what PyTorch does by itself once nothing below block k requires grad), and the
    frozen-prefix cache.

    Naive and no-grad run the same kernels on the same batches: bit-identical weights. The cache
    computes the prefix in other batches (16 at a time, in dataset order), which is the same math
    per example but not necessarily the same rounding on every CPU, so it is held to SGD's rounding
    drift (see ``_train``). Examples are padded to one length (as SQuAD features are); with dynamic
    padding a prefix run over 16 masked pad keys instead of 3 also sums its attention in another
    order (~1e-6 in the states)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

    from progtuning.tasks.builtin import load_builtin
    from progtuning.core.callback import ProgtuningCallback
    from progtuning.runs.models import resolve_model

    path = resolve_model("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, data = load_builtin("rotten-tomatoes", max_train_examples=32, seed=0)
    train = data["train"].map(
        lambda b: {**tokenizer(b["text"], truncation=True, max_length=32, padding="max_length"), "labels": b["label"]},
        batched=True, remove_columns=["text", "label"],
    )
    train = add_example_index(train)
    collator = ExampleIndexCollator(DataCollatorWithPadding(tokenizer))
    finals, caches = {}, {}
    for mode in ("naive", "no-grad", "cached"):
        set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        assert model.config.hidden_dropout_prob > 0
        if mode == "naive":  # make the graph reach down to the embeddings although nothing there trains
            model.bert.embeddings.register_forward_hook(
                lambda m, args, out: out if out.requires_grad else out.detach().requires_grad_()
            )
        progtuning = ProgtuningCallback(progressive(6, 3, "never"))
        cache = FrozenPrefixCache(model, train, build_batch_size=16) if mode == "cached" else None
        callback = PrefixCacheCallback(progtuning, cache, close_at_end=False)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        _train(model, train, collator, [progtuning, callback], tmp_path / mode, epochs=3, lr=1e-1, batch_size=8)
        finals[mode] = {k: v.clone() for k, v in model.state_dict().items()}
        caches[mode] = cache
    assert caches["cached"].hits == 8 and caches["cached"].misses == 0  # stages 2 and 3, 4 steps each
    caches["cached"].close()
    naive = finals["naive"]
    mismatched = [k for k in naive if not torch.equal(naive[k], finals["no-grad"][k])]
    assert mismatched == [], f"no-grad differs from the naive run in {mismatched[:3]}"
    drift, moved = max_difference(naive, finals["cached"]), max_difference(naive, initial)
    assert drift <= sgd_drift_tolerance(12, naive) < moved / 100, (drift, moved)
