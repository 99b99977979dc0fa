"""`progtuning plan`: the paper's arithmetic from a config alone (no weights), through the CLI."""

from __future__ import annotations

import json

import pytest
from transformers import BertConfig

from progtuning.runs.cli import main


def _plan(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def bert_base_dir(tmp_path):
    BertConfig().save_pretrained(tmp_path)  # a folder holding only config.json
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    return str(tmp_path)


def test_bert_base_three_stages(capsys, bert_base_dir):
    plan = _plan(capsys, "--model", bert_base_dir, "--epochs", "3", "--preset", "paper")
    assert plan["num_blocks"] == 12
    assert plan["total_params"] == 109_483_778
    assert [s["blocks"] for s in plan["stages"]] == [list(range(12)), list(range(4, 12)), list(range(8, 12))]
    assert [s["trainable_params"] for s in plan["stages"]] == [109_483_778, 81_132_290, 52_780_802]
    assert plan["updated_params"] == 243_396_870
    assert plan["baseline_updated_params"] == 328_451_334
    assert round(plan["reduction"], 3) == 0.259
    assert plan["reduction_blocks_only"] == pytest.approx(1 / 3)


def test_bert_base_two_stages_blocks_only(capsys, bert_base_dir):
    plan = _plan(capsys, "--model", bert_base_dir, "--epochs", "2")
    assert plan["reduction_blocks_only"] == pytest.approx(0.25)


def test_minilm_l6(capsys):
    plan = _plan(capsys, "--model", "minilm-l6", "--epochs", "3", "--preset", "paper")
    assert plan["num_blocks"] == 6 and plan["parts"] == [[0, 1], [2, 3], [4, 5]]
    assert round(plan["reduction"], 3) == 0.156
    assert plan["updated_params"] == 57_495_174
    # the default preset keeps the embeddings frozen in every stage: 11,918,592 parameters
    # (words 30522 x 384, positions 512 x 384, token types 2 x 384, LayerNorm 2 x 384)
    embeddings = 30522 * 384 + 512 * 384 + 2 * 384 + 2 * 384
    default = _plan(capsys, "--model", "minilm-l6", "--epochs", "3")
    assert default["embeddings"] == "never"
    assert default["stages"][0]["trainable_params"] == default["total_params"] - embeddings
    assert default["updated_params"] == 57_495_174 - 3 * embeddings
    assert round(default["reduction"], 3) == 0.681


def test_lora_plan_counts_only_lora_and_the_classifier(capsys):
    plan = _plan(capsys, "--model", "minilm-l6", "--epochs", "3", "--method", "lora")
    # 6 blocks x (query, value) x (384*8 + 8*384) = 73,728 LoRA + 770 classifier (peft's convention)
    assert plan["method_head"] == "classifier"
    assert plan["method_trainable_params"] == 73_728 + 770
    assert plan["baseline_updated_params"] == 3 * (73_728 + 770)
    # stages train 6, 4, 2 blocks of LoRA (12,288 each) and the classifier
    assert plan["updated_params"] == 12 * 12_288 + 3 * 770
    assert round(plan["reduction"], 3) == 0.330
    assert plan["reduction_blocks_only"] == pytest.approx(1 / 3)


def test_lora_plan_with_the_whole_head_counts_the_pooler(capsys):
    plan = _plan(capsys, "--model", "minilm-l6", "--epochs", "3", "--method", "lora", "--method-head", "classifier+pooler")
    # + the pooler (384*384 + 384), trained in every stage: it deflates the reduction
    assert plan["method_trainable_params"] == 73_728 + 770 + 147_840
    assert round(plan["reduction"], 3) == 0.111


@pytest.mark.parametrize("method, reduction", [("adapter", 0.332), ("bitfit", 0.314)])
def test_peft_plans_on_minilm_l6(capsys, method, reduction):
    plan = _plan(capsys, "--model", "minilm-l6", "--epochs", "3", "--method", method, "--preset", "paper")
    assert round(plan["reduction"], 3) == reduction


def test_table_output(capsys, bert_base_dir):
    assert main(["plan", "--model", bert_base_dir, "--epochs", "3", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "25.9%" in out and "33.3%" in out and "243,396,870" in out


def test_too_many_stages_is_a_one_line_error(capsys):
    assert main(["plan", "--model", "minilm-l6", "--epochs", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 8 stages need at least 8 blocks") and "\n" not in err


def test_folder_without_config(capsys, tmp_path):
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "config" in capsys.readouterr().err
