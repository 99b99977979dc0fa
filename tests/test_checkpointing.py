"""Gradient checkpointing per stage: the trainable blocks recompute, with the same gradients and fewer saved activations."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_model
from progtuning.core.blocks import find_blocks
from progtuning.core.checkpointing import StageCheckpointing, trainable_blocks
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.core.schedule import progressive
from progtuning.errors import ProgtuningError

NUM_BLOCKS = 4


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _staged(tie: bool, embeddings: str, stage: int, checkpointing: bool):
    model = tiny_model("llama", num_layers=NUM_BLOCKS, task="causal-lm", tie_word_embeddings=tie)
    freezer = ProgressiveFreezer(model, progressive(NUM_BLOCKS, 3, embeddings))
    freezer.apply(stage)
    callback = StageCheckpointing(SimpleNamespace(freezer=freezer))
    if checkpointing:
        callback.on_train_begin(None, None, None, model=model)
    model.train()
    return model, callback


@pytest.mark.parametrize(
    "tie, embeddings, stage, trained",
    [
        (False, "never", 0, [0, 1, 2, 3]),
        (False, "never", 1, [1, 2, 3]),
        (False, "never", 2, [2, 3]),
        (True, "always", 2, [2, 3]),  # backward runs through blocks 0-1 too, but they keep their activations
    ],
)
def test_the_trainable_blocks_are_checkpointed(tie, embeddings, stage, trained):
    model, callback = _staged(tie, embeddings, stage, checkpointing=True)
    assert trainable_blocks(model, find_blocks(model)) == trained
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [i in trained for i in range(NUM_BLOCKS)]
    assert callback.checkpointed == trained
    callback.on_train_end(None, None, None, model=model)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def _saved_tensors(model) -> tuple[int, dict[str, torch.Tensor]]:
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**_batch()).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return count, grads


@pytest.mark.parametrize("embeddings", ["never", "always"])
def test_same_gradients_fewer_saved_activations(embeddings):
    plain, _ = _staged(False, embeddings, 1, checkpointing=False)
    checkpointed, _ = _staged(False, embeddings, 1, checkpointing=True)
    saved_plain, grads_plain = _saved_tensors(plain)
    saved_checkpointed, grads_checkpointed = _saved_tensors(checkpointed)
    assert saved_checkpointed < saved_plain
    assert grads_plain.keys() == grads_checkpointed.keys() and grads_plain
    for name, grad in grads_plain.items():
        # the recomputed forward runs the same kernels on the same inputs in this process
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_blocks_without_the_switch_are_refused():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    model = Plain()
    freezer = ProgressiveFreezer(model, progressive(2, 2))
    with pytest.raises(ProgtuningError, match="do not support gradient checkpointing"):
        StageCheckpointing(SimpleNamespace(freezer=freezer)).on_train_begin(None, None, None, model=model)


@pytest.mark.slow
def test_a_checkpointed_run_trains_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from progtuning.runs.cli import main
    from tiny_lm import make_tiny_lm, write_instructions

    checkpointed_per_step = []
    apply = StageCheckpointing._apply

    def spy(self, model):
        apply(self, model)
        checkpointed_per_step.append(tuple(self.checkpointed))

    monkeypatch.setattr(StageCheckpointing, "_apply", spy)

    model = make_tiny_lm(tmp_path, "llama", tie=False, chat=True)
    train = write_instructions(tmp_path / "train.jsonl", 16)
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        out = tmp_path / name
        code = main(["train", "--task", "instruct", "--train-file", str(train), "--model", str(model),
                     "--output-dir", str(out), "--epochs", "2", "--batch-size", "4", "--max-length", "32",
                     "--learning-rate", "1e-2", "--embeddings", "never", "--threads", "1", "--generate-examples", "0",
                     "--no-save-checkpoints", *extra])
        assert code == 0
        runs[name] = load_file(str(out / "model" / "model.safetensors"))
        assert json.loads((out / "results.json").read_text())["steps"] == 8
    # embeddings frozen, 4 blocks, T=2: stage 1 trains blocks 0-3, stage 2 blocks 2-3 (4 steps each)
    assert checkpointed_per_step == [(0, 1, 2, 3)] * 5 + [(2, 3)] * 4  # train begin, then every step
    for key, weight in runs["plain"].items():
        # same data order and kernels; only the backward's recompute differs: float32 rounding at most
        torch.testing.assert_close(runs["checkpointed"][key], weight, rtol=1e-5, atol=1e-6, msg=key)
