"""Any TrainingArguments field through the config: parsing, checks, what progtuning sets, early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from progtuning.errors import ProgtuningError
from progtuning.runs.config import load_config, parse_overrides
from progtuning.runs.training_args import (
    build_training_arguments,
    check_training_args,
    early_stopping_callbacks,
    settings_table,
)
from progtuning.tasks.builtin import builtin_task
from progtuning.tasks.squad import squad_task

REPO = Path(__file__).resolve().parent.parent


def _args(tmp_path, task=None, evaluate=True, **config):
    return build_training_arguments(load_config(None, config), tmp_path, task or builtin_task("rotten-tomatoes"),
                                    evaluate_each_epoch=evaluate, keep_all_columns=False, checkpoints_dir="checkpoints")


def test_the_command_line_sets_fields_one_at_a_time_and_adds_them_to_the_yaml_mapping(tmp_path):
    tokens = ["--training-args.bf16", "--training-args.lr_scheduler_type", "cosine",
              "--training-args.warmup_steps=20", "--epochs", "2"]
    assert parse_overrides(tokens) == {
        "training_args": {"bf16": "true", "lr_scheduler_type": "cosine", "warmup_steps": "20"}, "epochs": "2"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"training_args": {"lr_scheduler_type": "linear", "save_total_limit": 1}}))
    config = load_config(path, parse_overrides(["--training-args.lr_scheduler_type", "cosine"]))
    assert config.training_args == {"lr_scheduler_type": "cosine", "save_total_limit": 1}


def test_a_pass_through_field_changes_the_training_arguments_built(tmp_path):
    plain = _args(tmp_path)
    assert str(plain.lr_scheduler_type.value) == "linear" and plain.eval_strategy == "epoch"
    changed = _args(tmp_path, training_args={"lr_scheduler_type": "cosine", "warmup_steps": "20",
                                             "eval_strategy": "steps", "eval_steps": "5", "save_strategy": "steps",
                                             "save_steps": "5", "save_total_limit": "1",
                                             "activation_checkpointing": "true"})
    assert str(changed.lr_scheduler_type.value) == "cosine"
    assert changed.warmup_steps == 20 and changed.eval_steps == 5 and changed.save_steps == 5
    assert changed.eval_strategy == "steps" and changed.save_strategy == "steps" and changed.save_total_limit == 1
    assert changed.activation_checkpointing is True
    assert changed.ddp_find_unused_parameters is True  # progtuning's own setting survives


def test_unknown_owned_and_refused_fields_are_one_line_each():
    with pytest.raises(ProgtuningError, match=r"training_args.fp61 is not a TrainingArguments field \(did you mean fp16\?\)"):
        check_training_args({"fp61": True})
    with pytest.raises(ProgtuningError, match="training_args.num_train_epochs is set by the config key epochs: use --epochs"):
        check_training_args({"num_train_epochs": 3})
    with pytest.raises(ProgtuningError, match="training_args.deepspeed is refused: DeepSpeed"):
        check_training_args({"deepspeed": "ds.json"})
    with pytest.raises(ProgtuningError, match="training_args.hub_token is refused: a token does not belong in a config"):
        check_training_args({"hub_token": "hf_x"})
    with pytest.raises(ProgtuningError, match="use_reentrant: true is refused"):
        check_training_args({"activation_checkpointing_kwargs": {"use_reentrant": True}})
    with pytest.raises(ProgtuningError, match="training_args.fp16 expects true or false"):
        check_training_args({"fp16": "maybe"})


def test_settings_the_trainer_refuses_are_one_line(tmp_path):
    # load_best_model_at_end needs checkpoints saved as often as evaluations run
    with pytest.raises(ProgtuningError, match="^the Trainer refuses these settings: "):
        _args(tmp_path, save_checkpoints=False, training_args={"load_best_model_at_end": True})
    with pytest.raises(ProgtuningError, match="give one of warmup_ratio and training_args.warmup_steps"):
        _args(tmp_path, warmup_ratio=0.1, training_args={"warmup_steps": 10})


def test_the_best_model_is_judged_by_the_task_metric_and_early_stopping_keeps_it(tmp_path):
    best = _args(tmp_path, training_args={"load_best_model_at_end": True})
    assert best.load_best_model_at_end and best.metric_for_best_model == "accuracy" and best.greater_is_better
    stopping = _args(tmp_path, task=builtin_task("rotten-tomatoes-rating"), early_stopping_patience=2)
    assert stopping.load_best_model_at_end and stopping.metric_for_best_model == "pearson"
    [callback] = early_stopping_callbacks(load_config(None, {"early_stopping_patience": 2}))
    assert type(callback).__name__ == "EarlyStoppingCallback" and callback.early_stopping_patience == 2
    assert early_stopping_callbacks(load_config(None, {})) == []


def test_what_cannot_evaluate_during_training_is_refused(tmp_path):
    with pytest.raises(ProgtuningError, match="early_stopping_patience needs an evaluation to watch"):
        _args(tmp_path, evaluate=False, early_stopping_patience=1)
    with pytest.raises(ProgtuningError, match="cannot work for extractive_qa tasks"):
        _args(tmp_path, task=squad_task("squad"), evaluate=False, training_args={"eval_strategy": "epoch"})
    with pytest.raises(ProgtuningError, match="needs a validation split"):
        _args(tmp_path, evaluate=False, training_args={"eval_strategy": "epoch"})


def test_docs_list_every_field_progtuning_sets_changes_or_refuses():
    assert settings_table() in (REPO / "docs" / "ecosystem.md").read_text()


@pytest.mark.slow
def test_a_run_passes_fields_through_and_stops_early(tmp_path):
    from tiny_run import make_tiny_setup, train_argv

    from progtuning.runs.cli import main

    model_dir, data_dir = make_tiny_setup(tmp_path)
    out = tmp_path / "run"
    # a learning rate too small to change a prediction: accuracy never improves after epoch 1
    argv = train_argv(model_dir, data_dir, out, "--learning-rate", "1e-9", "--early-stopping-patience", "1",
                      "--training-args.lr_scheduler_type", "constant", "--training-args.metric_for_best_model",
                      "accuracy")
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 16  # epoch 2 scored no better than epoch 1: stopped there, not after 3 epochs
    rates = {e["learning_rate"] for e in results["log_history"] if "learning_rate" in e}
    assert rates == {1e-9}  # constant, as passed through
    assert results["config"]["training_args"] == {"lr_scheduler_type": "constant", "metric_for_best_model": "accuracy"}
    assert [s["stage"] for s in results["stages"]] == [0, 1]  # the last stage never came
