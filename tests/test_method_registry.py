"""The method registry and the one MethodConfig: every method is one module, every setting one field.

The settings are declared once (MethodSettings) and reach YAML, the CLI and the saved
progtuning_method.json from there; a full fine-tuning run saves what load_method needs.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_run import make_tiny_setup, train_argv

from progtuning.errors import ProgtuningError
from progtuning.methods.api import apply_method, load_method
from progtuning.methods.base import Method
from progtuning.methods.config import MethodConfig, MethodSettings
from progtuning.methods.registry import METHODS, get_method
from progtuning.runs.cli import main
from progtuning.runs.config import FIELDS, TrainConfig, load_config, parse_overrides


def test_every_registered_method_is_one_module_with_its_method():
    assert list(METHODS) == ["full", "lora", "adapter", "bitfit", "peft"]
    for name, module in METHODS.items():
        method = get_method(name)
        assert isinstance(method, Method) and method.name == name
        assert type(method).__module__ == module
    with pytest.raises(ProgtuningError, match="unknown fine-tuning method 'prefix'.*full, lora"):
        get_method("prefix")


def test_train_config_takes_every_method_setting_from_method_settings():
    settings = {f.name: f for f in dataclasses.fields(MethodSettings)}
    for name, field in settings.items():
        assert FIELDS[name].default == field.default and FIELDS[name].metadata["help"] == field.metadata["help"]
    # the method settings come right after `method` in configs and in --help
    names = list(FIELDS)
    at = names.index("method")
    assert names[at + 1 : at + 1 + len(settings)] == list(settings)
    config = TrainConfig(method="lora", lora_r=4, lora_target_modules=["query"])
    assert config.method_config() == MethodConfig(name="lora", lora_r=4, lora_target_modules=["query"])


def test_adapter_activation_is_settable_from_yaml_and_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: adapter\nadapter_activation: relu\n")
    assert load_config(path).method_config().adapter_activation == "relu"
    config = load_config(None, parse_overrides(["--method", "adapter", "--adapter-activation", "relu"]))
    from conftest import tiny_model

    model = apply_method(tiny_model("bert"), config.method_config())
    activations = {type(m.act) for n, m in model.named_modules() if n.endswith(".adapter")}
    assert activations == {torch.nn.ReLU}
    with pytest.raises(ProgtuningError, match="unknown adapter activation 'tanh'"):
        load_config(None, {"method": "adapter", "adapter_activation": "tanh"})


def test_train_help_lists_every_method_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for field in dataclasses.fields(MethodSettings):
        assert "--" + field.name.replace("_", "-") in out


def test_the_old_peft_config_key_names_its_new_name():
    with pytest.raises(ProgtuningError, match="config key peft_config is now called peft_config_path"):
        load_config(None, {"peft_config": "x.json"})


def test_a_full_fine_tuning_run_reloads_with_load_method(tmp_path):
    model_dir, data_dir = make_tiny_setup(tmp_path, num_layers=2, train_rows=8)
    out = tmp_path / "run"
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1", "--no-save-checkpoints")) == 0
    saved = out / "model"
    assert json.loads((saved / "progtuning_method.json").read_text())["name"] == "full"
    reloaded = load_method(model_dir, saved)
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(saved)
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 3]])}
    reloaded.eval(), plain.eval()
    # the same weights through the same kernels in one process: identical logits
    assert torch.equal(reloaded(**inputs).logits, plain(**inputs).logits)
    original = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert not torch.equal(original(**inputs).logits, plain(**inputs).logits)  # it did train
