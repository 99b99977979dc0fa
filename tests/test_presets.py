"""Presets: the settings the paper leaves open, chosen as one name, under every explicit setting.

``progtuning train`` and ``ProgtuningCallback()`` start from the default preset; ``preset: paper``
is the paper's reading. The behaviour is checked in a real Trainer run: which parameters the
embeddings policy lets train in the last stage, and whether a frozen block runs in training mode.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_dataset, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from progtuning.core.callback import ProgtuningCallback
from progtuning.core.presets import DEFAULT_PRESET, PRESETS, get_preset
from progtuning.errors import ProgtuningError
from progtuning.runs.config import TrainConfig, load_config


def test_the_config_defaults_are_the_default_preset():
    config, preset = load_config(None, {}), get_preset(None)
    assert preset.name == DEFAULT_PRESET == "fast" and config.preset is None
    # the cache stays None: "where it can run", never a refusal (an explicit True may be refused)
    assert (config.embeddings, config.eval_frozen_blocks, config.cache_frozen) == ("never", True, None)


def test_a_named_preset_sets_its_keys_and_explicit_keys_win(tmp_path):
    paper = load_config(None, {"preset": "paper"})
    assert (paper.embeddings, paper.eval_frozen_blocks, paper.cache_frozen) == ("always", False, False)
    mixed = load_config(None, {"preset": "paper", "embeddings": "first_stage"})
    assert (mixed.embeddings, mixed.eval_frozen_blocks) == ("first_stage", False)
    # a YAML key is as explicit as a flag, and a flag's preset does not undo it
    path = tmp_path / "c.yaml"
    path.write_text("preset: fast\neval_frozen_blocks: false\n")
    from_file = load_config(path, {"preset": "paper"})
    assert (from_file.preset, from_file.embeddings, from_file.eval_frozen_blocks) == ("paper", "always", False)
    assert set(PRESETS) == {"paper", "fast"}
    # the dataclass itself resolves the preset too (the Python API), and keeps what it was given
    direct = TrainConfig(preset="paper", cache_frozen=True)
    assert (direct.embeddings, direct.eval_frozen_blocks, direct.cache_frozen) == ("always", False, True)


def test_an_unknown_preset_is_one_line_naming_the_choices():
    with pytest.raises(ProgtuningError, match=r"^unknown preset 'papr': use one of paper, fast$"):
        load_config(None, {"preset": "papr"})
    with pytest.raises(ProgtuningError, match="unknown preset"):
        ProgtuningCallback(preset="quick")


class Watch(TrainerCallback):
    """At the last step: block 0's training mode (frozen by then) and a copy of every parameter."""

    def __init__(self):
        self.block0_training = None
        self.before = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == state.max_steps - 1:
            self.block0_training = model.bert.encoder.layer[0].training
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(tmp_path, callback):
    model = tiny_model("bert", num_layers=4)
    watch = Watch()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             num_train_epochs=2, learning_rate=1e-3, save_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=tiny_dataset(16), callbacks=[callback, watch]).train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), watch.before[n])}
    return watch.block0_training, moved


@pytest.mark.parametrize("preset, embeddings_move, frozen_block_training", [
    (None, False, False),   # the default: embeddings frozen throughout, frozen blocks in eval mode
    ("paper", True, True),  # the paper: embeddings train in every stage, frozen blocks keep training mode
])
def test_the_callback_runs_the_preset(tmp_path, preset, embeddings_move, frozen_block_training):
    block0_training, moved = _run(tmp_path, ProgtuningCallback(preset=preset))
    assert block0_training is frozen_block_training
    assert any(n.startswith("bert.embeddings.") for n in moved) is embeddings_move
    assert not any(n.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.1.")) for n in moved)
    assert any(n.startswith("bert.encoder.layer.3.") for n in moved) and any(n.startswith("classifier") for n in moved)


def test_explicit_callback_arguments_win_over_the_preset():
    callback = ProgtuningCallback(preset="paper", embeddings="never", eval_frozen_blocks=True)
    assert (callback.embeddings, callback.eval_frozen_blocks) == ("never", True)
    default = ProgtuningCallback()
    assert (default.embeddings, default.eval_frozen_blocks) == ("never", True)


def test_train_runs_the_default_preset_with_its_cache_and_the_paper_preset_without(tmp_path):
    """The CLI end to end on a tiny BERT: the default caches the frozen prefix and never trains the
    embeddings; ``--preset paper`` trains them in every stage and runs no cache."""
    import json

    from tiny_run import make_tiny_setup, train_argv

    from progtuning.runs.cli import main

    model_dir, data_dir = make_tiny_setup(tmp_path)
    found = {}
    for name, extra in (("default", ()), ("paper", ("--preset", "paper"))):
        out = tmp_path / name
        assert main(train_argv(model_dir, data_dir, out, "--no-save-checkpoints", "--no-save-model", *extra)) == 0
        found[name] = json.loads((out / "results.json").read_text())
    default, paper = found["default"], found["paper"]
    assert default["config"]["embeddings"] == "never" and default["config"]["cache_frozen"] is None
    assert [s["cache"] for s in default["prefix_cache"]["stages"]] == [False, True, True]
    assert not any(s["train_embeddings"] for s in default["accounting"]["stages"])
    assert paper["config"]["eval_frozen_blocks"] is False and paper["config"]["cache_frozen"] is False
    assert not any(s["cache"] for s in paper["prefix_cache"]["stages"]) and paper["prefix_cache"]["hits"] == 0
    assert all(s["train_embeddings"] for s in paper["accounting"]["stages"])


def test_the_preset_leaves_the_cache_off_on_a_gpu_and_an_explicit_one_is_still_tried(monkeypatch, caplog, tmp_path):
    """On a GPU the cache measured no faster, so the default preset's "where it can" skips it there;
    --cache-frozen still asks for it, and --training-args.use_cpu trains on the CPU, where it pays."""
    from progtuning.runs import train

    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    preset = load_config(None, {})
    assert preset.cache_frozen is None and train._trains_on_gpu(preset)
    with caplog.at_level("INFO", logger=train.logger.name):
        # the GPU reason comes before any model check, so no model is needed to reach it
        assert train._prefix_cache(preset, None, None, None, None, tmp_path) is None
    assert "the frozen-prefix cache is off: on a GPU" in caplog.text
    assert not train._trains_on_gpu(load_config(None, {"training_args": {"use_cpu": True}}))
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    assert not train._trains_on_gpu(preset)
