"""Parameters that serve more than the place they live in, through freezing and counting.

* A tied output embedding (GPT-2 ``lm_head`` ↔ ``wte``, tied Llama/Qwen2 ``lm_head`` ↔
  ``embed_tokens``, T5 ``lm_head`` ↔ ``shared``) is the head, and the head trains in every stage:
  with ``embeddings: first_stage|never`` it keeps training and is counted once, as head. With
  ``tied_head="embeddings"`` it follows the embedding policy instead.
* T5's relative attention bias lives in block 0 of each stack and every block of that stack uses
  it: it trains while any of them trains, and is counted in those stages.

Each case runs a few AdamW steps per stage at a large learning rate (the peft-style invariant):
exactly the parameters the stage should train moved, every other one is bit-identical (no step
touched it), with no gradient and no optimizer state.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model
from transformers import TrainerState, TrainingArguments

from progtuning.core.blocks import EMBEDDINGS, HEAD, find_blocks
from progtuning.core.callback import ProgtuningCallback
from progtuning.core.counting import count_updates, plan_updates
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.core.schedule import Schedule, explicit, progressive

STEPS_PER_STAGE = 2
ENCODER_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
DECODER_BIAS = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def lm_batch(seq2seq: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY_VOCAB, (4, 8), generator=generator)
    labels = torch.randint(3, TINY_VOCAB, (4, 8), generator=generator) if seq2seq else ids
    return {"input_ids": ids, "labels": labels}


def run_stages(model, schedule: Schedule, batch: dict, tied_head: str = "head") -> dict[int, set[str]]:
    """Train every stage for a few steps; check the invariant; return the names that moved per stage."""
    freezer = ProgressiveFreezer(model, schedule, find_blocks(model, tied_head=tied_head))
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    moved = {}
    for stage in schedule.stages:
        freezer.apply(stage.index, optimizer)
        at_switch = {n: p.detach().clone() for n, p in params.items()}
        for _ in range(STEPS_PER_STAGE):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # zeros, not None: the freezer must drop frozen grads
        moved[stage.index] = {n for n, p in params.items() if not torch.equal(p, at_switch[n])}
        trainable = {n for n, p in params.items() if p.requires_grad}
        assert moved[stage.index] == trainable == freezer.stage_names(stage.index), f"stage {stage.index}"
        for name in set(params) - trainable:
            assert params[name].grad is None and params[name] not in optimizer.state, name
    freezer.close()
    return moved


# -- a tied output embedding is the head -------------------------------------------------------------
TIED = [
    ("gpt2", "transformer.wte.weight", {}),
    ("llama", "model.embed_tokens.weight", {"tie_word_embeddings": True}),
    ("qwen2", "model.embed_tokens.weight", {"tie_word_embeddings": True}),
]


@pytest.mark.parametrize("policy", ["first_stage", "never"])
@pytest.mark.parametrize("arch, table, overrides", TIED, ids=[arch for arch, _, _ in TIED])
def test_a_tied_lm_head_trains_in_every_stage(arch, table, overrides, policy):
    model = tiny_model(arch, num_layers=2, task="causal-lm", **overrides)
    assert model.lm_head.weight is model.get_parameter(table)
    moved = run_stages(model, progressive(2, 2, embeddings=policy), lm_batch())
    assert all(table in names for names in moved.values())  # stage 1 freezes the embeddings, not the head
    assert not any(n in moved[1] for n in find_blocks(model).names(EMBEDDINGS))


@pytest.mark.parametrize("arch, table, overrides", TIED, ids=[arch for arch, _, _ in TIED])
def test_a_tied_lm_head_follows_the_embeddings_when_asked(arch, table, overrides):
    model = tiny_model(arch, num_layers=2, task="causal-lm", **overrides)
    moved = run_stages(model, progressive(2, 2, embeddings="first_stage"), lm_batch(), tied_head="embeddings")
    assert table in moved[0] and table not in moved[1]
    model = tiny_model(arch, num_layers=2, task="causal-lm", **overrides)
    moved = run_stages(model, progressive(2, 2, embeddings="never"), lm_batch(), tied_head="embeddings")
    assert table not in moved[0] | moved[1]


def test_a_tied_head_is_counted_once_as_head():
    model = tiny_model("gpt2", num_layers=4, task="causal-lm")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    table, position = sizes["transformer.wte.weight"], sizes["transformer.wpe.weight"]
    assert table == TINY_VOCAB * 32
    freezer = ProgressiveFreezer(model, progressive(4, 2, embeddings="never"))
    accounting = plan_updates(freezer)
    final_norm = sizes["transformer.ln_f.weight"] + sizes["transformer.ln_f.bias"]
    assert accounting.head_params == table + final_norm  # the tied table once, as head
    assert accounting.total_params == sum(sizes.values()) == sum(p.numel() for p in model.parameters())
    blocks = [sum(s for n, s in sizes.items() if n.startswith(f"transformer.h.{i}.")) for i in range(4)]
    # embeddings never train: stage 0 is all blocks + head, stage 1 the top two blocks + head
    assert [s.trainable_params for s in accounting.stages] == [
        sum(blocks) + table + final_norm,
        blocks[2] + blocks[3] + table + final_norm,
    ]
    assert accounting.baseline_updated_params == 2 * (sum(blocks) + table + position + final_norm)
    # following the embeddings, it is counted with them: frozen in both stages
    freezer = ProgressiveFreezer(model, progressive(4, 2, embeddings="never"), find_blocks(model, tied_head="embeddings"))
    assert plan_updates(freezer).head_params == final_norm


def test_the_callback_passes_the_tied_head_choice_on(tmp_path):
    model = tiny_model("gpt2", num_layers=4, task="causal-lm")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_train_epochs=2)
    for choice, group in (("head", HEAD), ("embeddings", EMBEDDINGS)):
        callback = ProgtuningCallback(embeddings="never", tied_head=choice)
        callback.on_train_begin(args, TrainerState(max_steps=4), None, model=model)
        assert callback.freezer.layout.groups["transformer.wte.weight"] == group
        callback.freezer.restore()
        callback.freezer.close()


# -- T5: the relative attention bias serves its whole stack --------------------------------------------
def test_t5_relative_attention_bias_trains_while_any_block_of_its_stack_trains():
    model = tiny_model("t5", num_layers=2, task="seq2seq")  # blocks: encoder 0, 1; decoder 2, 3
    schedule = progressive(4, 4, embeddings="never")  # stage t trains blocks t..3
    moved = run_stages(model, schedule, lm_batch(seq2seq=True))
    # block 0 is frozen from stage 1 on, but block 1 still uses the encoder's bias in stage 1
    assert [ENCODER_BIAS in moved[t] for t in range(4)] == [True, True, False, False]
    assert [DECODER_BIAS in moved[t] for t in range(4)] == [True, True, True, True]
    assert all("encoder.block.0.layer.1.DenseReluDense.wi.weight" not in moved[t] for t in (1, 2, 3))
    assert all("shared.weight" in moved[t] for t in range(4))  # the tied LM head


def test_t5_relative_attention_bias_in_a_growing_schedule():
    model = tiny_model("t5", num_layers=2, task="seq2seq")
    moved = run_stages(model, explicit(4, [[3], [1, 3]], embeddings="never"), lm_batch(seq2seq=True))
    assert DECODER_BIAS in moved[0] and ENCODER_BIAS not in moved[0]  # only decoder block 1 (index 3) trains
    assert ENCODER_BIAS in moved[1]  # encoder block 1 trains, and it uses the bias block 0 holds


def test_t5_relative_attention_bias_is_counted_while_it_trains():
    model = tiny_model("t5", num_layers=2, task="seq2seq")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    freezer = ProgressiveFreezer(model, progressive(4, 4, embeddings="never"))
    layout = freezer.layout

    def block(i: int) -> int:
        return sum(sizes[n] for n in layout.names(i))

    bias = sizes[ENCODER_BIAS]
    assert sizes[DECODER_BIAS] == bias == 32 * 2  # 32 buckets x 2 heads
    assert block(0) > bias and block(2) > bias  # each bias is counted in (and with) its holder block
    accounting = count_updates(freezer, [1, 1, 1, 1])
    expected_blocks = [
        block(0) + block(1) + block(2) + block(3),
        bias + block(1) + block(2) + block(3),  # block 0 frozen, its table still serves block 1
        block(2) + block(3),  # the encoder is frozen; decoder block 0 (index 2) holds its table
        bias + block(3),  # decoder block 0 frozen, its table still serves decoder block 1
    ]
    assert [s.trainable_block_params for s in accounting.stages] == expected_blocks
    head = sum(sizes[n] for n in layout.names(HEAD))
    assert [s.trainable_params for s in accounting.stages] == [b + head for b in expected_blocks]
