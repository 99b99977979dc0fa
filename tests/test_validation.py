"""Every config value is checked up front, without torch: runs/validation.py and the overrides parser."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiny_run import subprocess_env

from progtuning.errors import ProgtuningError
from progtuning.runs.config import FIELDS, TrainConfig, load_config, parse_overrides
from progtuning.runs.validation import ADAPTER_TYPES, check_max_length, closest, usable_positions


def _refused(**overrides) -> str:
    with pytest.raises(ProgtuningError) as error:
        load_config(None, {k: str(v) if not isinstance(v, (list, bool)) else v for k, v in overrides.items()})
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"epochs": "nan"}, "epochs must be a finite number >= 0, got nan"),
        ({"epochs": "inf"}, "epochs must be a finite number >= 0, got inf"),
        ({"epochs": "-1"}, "epochs must be a finite number >= 0"),
        ({"epochs": "0"}, "epochs is 0 and max_steps is -1, so nothing would train"),
        ({"max_steps": "0"}, "max_steps must be -1 (use epochs) or at least 1"),
        ({"learning_rate": "nan"}, "learning_rate must be a finite number > 0, got nan"),
        ({"learning_rate": "0"}, "learning_rate must be a finite number > 0"),
        ({"seed": "-1"}, "seed must lie in 0..4294967295, got -1"),
        ({"seed": str(2**32)}, "seed must lie in 0..4294967295"),
        ({"logging_steps": "0"}, "logging_steps must be at least 1, got 0"),
        ({"threads": "-1"}, "threads must be at least 1, got -1"),
        ({"warmup_ratio": "5"}, "warmup_ratio must lie in [0, 1)"),
        ({"warmup_ratio": "-0.1"}, "warmup_ratio must lie in [0, 1)"),
        ({"weight_decay": "-1"}, "weight_decay must be a finite number >= 0, got -1.0"),
        ({"max_grad_norm": "nan"}, "max_grad_norm must be a finite number >= 0"),
        ({"lora_dropout": "1"}, "lora_dropout must lie in [0, 1)"),
        ({"eval_batch_size": "0"}, "eval_batch_size must be at least 1"),
        ({"gradient_accumulation_steps": "0"}, "gradient_accumulation_steps must be at least 1"),
        ({"max_length": "0"}, "max_length must be at least 1"),
        ({"stages": "0"}, "stages must be at least 1"),
        ({"max_train_examples": "0"}, "max_train_examples must be at least 1"),
        ({"num_labels": "1"}, "num_labels must be at least 2"),
        ({"lora_r": "0"}, "lora_r must be at least 1"),
        ({"cache_budget_mb": "-5"}, "cache_budget_mb must be at least 0"),
        ({"method": "lroa"}, "unknown method 'lroa' (did you mean lora?)"),
        ({"adapter_type": "pfeifer"}, "unknown adapter_type 'pfeifer' (did you mean pfeiffer?)"),
        ({"embeddings": "sometimes"}, "unknown embeddings policy 'sometimes'"),
        ({"task_type": "ranking"}, "unknown task_type 'ranking'"),
        ({"model": " "}, "model is empty"),
        ({"stage_blocks": "[[1], []]"}, "stage_blocks must be a list of non-empty lists of block indices"),
        ({"stage_blocks": "[[-1]]"}, "stage_blocks must be a list of non-empty lists"),
        ({"lora_target_modules": "[]"}, "lora_target_modules must be a non-empty list"),
        ({"label_names": "[a, a]"}, "label_names ['a', 'a'] must be at least two distinct names"),
        ({"label_names": "[a, b]", "num_labels": "3"}, "label_names has 2 names but num_labels is 3"),
        ({"task_type": "regression", "num_labels": "2"}, "label_names and num_labels are for classification"),
        ({"method": "peft"}, "method 'peft' needs --peft-config"),
        ({"peft_config_path": "x.json"}, "peft_config_path is only read by method 'peft'"),
        ({"overwrite": True, "resume": True}, "--resume continues the run in output_dir and --overwrite replaces it"),
        ({"task": "squad", "max_length": "64", "doc_stride": "64"}, "doc_stride (64) must be smaller than max_length"),
        ({"batch_size": "2.5"}, "batch_size expects int, got '2.5'"),
        ({"seed": "nan"}, "seed expects int"),
    ],
)
def test_each_bad_value_is_one_line(overrides, expected):
    assert expected in _refused(**overrides)


def test_yaml_booleans_are_not_numbers():
    with pytest.raises(ProgtuningError, match="epochs expects float, got True"):
        load_config(None, {"epochs": True})


def test_integer_spellings_are_accepted():
    config = load_config(None, {"batch_size": "16.0", "seed": "1e3", "max_steps": "-1"})
    assert (config.batch_size, config.seed, config.max_steps) == (16, 1000, -1)


def test_good_defaults_and_edge_values_pass():
    assert isinstance(load_config(None, {}), TrainConfig)
    load_config(None, {"epochs": "0", "max_steps": "5", "warmup_ratio": "0.99", "weight_decay": "0",
                       "max_grad_norm": "0", "seed": str(2**32 - 1), "cache_budget_mb": "0"})


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["--fp16", "--epochs", "1"], "unknown key --fp16 (a TrainingArguments field: pass it as --training-args.fp16)"),
        (["--learning-rat", "1"], "unknown key --learning-rat (did you mean --learning-rate?)"),
        (["--lr", "1e-3"], "unknown key --lr (did you mean --learning-rate?)"),
        (["--num-train-epochs", "3"], "unknown key --num-train-epochs (did you mean --epochs?)"),
        (["--no-overwrit"], "unknown key --no-overwrit (did you mean --no-overwrite?)"),
        (["--epochs", "3", "4"], "unexpected argument '4'"),
        (["--no-overwrite=1"], "--no-overwrite takes no value"),
        (["--epochs", "--seed", "1"], "--epochs needs a value"),
    ],
)
def test_unknown_or_malformed_overrides_name_the_problem(tokens, expected):
    with pytest.raises(ProgtuningError) as error:
        parse_overrides(tokens)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_negative_number_is_a_value_not_a_flag():
    assert parse_overrides(["--seed", "-1", "--weight-decay", "-0.5"]) == {"seed": "-1", "weight_decay": "-0.5"}


def test_closest_suggests_only_close_names():
    assert closest("minilm-l7", ["minilm-l6", "minilm-l3", "mpnet-base"]) in ("minilm-l6", "minilm-l3")
    assert closest("gpt2-xl", ["minilm-l6", "mpnet-base"]) is None


@pytest.mark.parametrize(
    "config, positions",
    [
        ({"model_type": "bert", "max_position_embeddings": 512}, 512),
        ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
        ({"model_type": "mpnet", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
        ({"model_type": "gpt2", "n_positions": 1024}, 1024),
        ({"model_type": "llama", "max_position_embeddings": 8192}, None),  # rotary: no table to run past
        ({"model_type": "t5"}, None),
        ({"model_type": "deberta-v2", "max_position_embeddings": 512, "position_biased_input": False}, None),
    ],
)
def test_usable_positions_per_architecture(config, positions):
    assert usable_positions(config) == positions


def test_max_length_beyond_the_position_table_is_refused():
    with pytest.raises(ProgtuningError, match=r"max_length 1024 is longer than model 'm' can embed \(512 positions\)"):
        check_max_length(1024, {"model_type": "bert", "max_position_embeddings": 512}, "m")
    check_max_length(512, {"model_type": "bert", "max_position_embeddings": 512}, "m")


def test_constants_agree_with_the_modules_that_own_them():
    from progtuning.methods.adapter import ADAPTER_TYPES as owned

    assert tuple(owned) == ADAPTER_TYPES
    assert "skip_bad_rows" in FIELDS


def test_checking_a_config_imports_neither_torch_nor_transformers(tmp_path):
    """What makes a mistake answer in well under a second: the CLI gets to its verdict without torch."""
    code = (
        "import sys\n"
        "from progtuning.runs.cli import main\n"
        "codes = [main(['train', '--epochs', '0']), main(['train', '--max-length', '1024']),\n"
        f"         main(['train', '--fp16', '--epochs', '1']), main(['train', '--output-dir', {str(tmp_path / 'f')!r} + '/x'])]\n"
        "print(codes, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    (tmp_path / "f").write_text("a file")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.stdout.strip() == "[2, 2, 2, 2] []", done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 4 and "Traceback" not in done.stderr
