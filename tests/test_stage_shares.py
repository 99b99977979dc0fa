"""Stages that differ in number from the epochs share the run equally, or the run is refused.

6 epochs in 3 stages are 2 + 2 + 2 epochs (not 1 + 1 + 4); 2 epochs in 3 stages are a third of the
optimizer steps each (not 1 + 1 + an empty stage). A run with fewer optimizer steps than stages
(or a hand-made schedule whose stage starts lie past the end of the run) is refused in one line
when training starts, before anything is trained. Through the schedule, the HF Trainer callback,
``progtuning train``'s schedule and ``progtuning plan``.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_dataset, tiny_model
from transformers import BertConfig, Trainer, TrainingArguments

from progtuning.core.callback import ProgtuningCallback
from progtuning.core.schedule import equal_shares, explicit, progressive
from progtuning.errors import ProgtuningError
from progtuning.runs.cli import main
from progtuning.runs.config import TrainConfig
from progtuning.runs.train import build_schedule


# -- the schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stages, epochs, unit, starts",
    [
        (3, None, "epoch", [0, 1, 2]),  # no run length given: one stage per epoch (the paper)
        (3, 3, "epoch", [0, 1, 2]),
        (3, 6, "epoch", [0, 2, 4]),  # 2 epochs each
        (2, 6.0, "epoch", [0, 3]),
        (3, 2, "fraction", [0, 1 / 3, 2 / 3]),  # fewer epochs than stages: shares of the steps
        (3, 4, "fraction", [0, 1 / 3, 2 / 3]),  # 4/3 epochs each: shares of the steps
        (3, 2.5, "fraction", [0, 1 / 3, 2 / 3]),
        (1, 2.5, "fraction", [0]),
    ],
)
def test_equal_shares(stages, epochs, unit, starts):
    assert equal_shares(stages, "epoch", epochs) == (unit, pytest.approx(starts))
    assert equal_shares(stages, "fraction", epochs) == ("fraction", pytest.approx([i / stages for i in range(stages)]))


def test_six_epochs_in_three_stages_are_two_epochs_each():
    schedule = progressive(12, 3, epochs=6)
    assert schedule.unit == "epoch" and [s.start for s in schedule.stages] == [0, 2, 4]
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=60) == [20, 20, 20]
    assert progressive(12, 3).stage_lengths(steps_per_epoch=10, total_steps=60) == [10, 10, 40]  # the old split


def test_two_epochs_in_three_stages_share_the_optimizer_steps():
    schedule = progressive(12, 3, epochs=2)
    assert schedule.unit == "fraction"
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=20) == [6, 7, 7]
    assert all(schedule.stage_lengths(steps_per_epoch=10, total_steps=20))
    grow = explicit(4, [[3], [2, 3], [0, 1, 2, 3]], epochs=2)
    assert grow.unit == "fraction" and grow.stage_lengths(steps_per_epoch=4, total_steps=8) == [2, 3, 3]


def test_given_starts_are_kept():
    schedule = progressive(8, 2, starts=[0, 3], epochs=4)
    assert schedule.unit == "epoch" and [s.start for s in schedule.stages] == [0, 3]


@pytest.mark.parametrize("epochs", [0, -1, float("nan"), float("inf")])
def test_a_run_length_must_be_positive_and_finite(epochs):
    with pytest.raises(ProgtuningError, match="positive, finite number of epochs"):
        progressive(12, 3, epochs=epochs)


def test_a_run_too_short_for_its_stages_is_refused_in_one_line():
    progressive(12, 3, epochs=2).check_every_stage_runs(steps_per_epoch=2, total_steps=3)  # 1 step each: fine
    with pytest.raises(ProgtuningError, match=r"stage 0 of 3 would get no optimizer step: the run has only 2") as info:
        progressive(12, 3, epochs=2).check_every_stage_runs(steps_per_epoch=1, total_steps=2)
    assert "\n" not in str(info.value) and "use at most 2 stages" in str(info.value)
    # a hand-made epoch schedule whose last stage starts where a 1.5-epoch run ends
    with pytest.raises(ProgtuningError, match=r"stage 2 starts at epoch 2, but the run ends after 1.5 epoch"):
        progressive(12, 3).check_every_stage_runs(steps_per_epoch=10, total_steps=15)
    progressive(12, 3).check_every_stage_runs(steps_per_epoch=10, total_steps=21)  # stage 2 gets one step


# -- the Trainer callback ---------------------------------------------------------------------------------
def _train(tmp_path, callback, rows: int, epochs: float, **overrides) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4, num_train_epochs=epochs,
        learning_rate=1e-3, save_strategy="no", logging_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
        **overrides,
    )
    trainer = Trainer(model=tiny_model("bert", num_layers=4), args=args, train_dataset=tiny_dataset(rows),
                      callbacks=[callback])
    trainer.train()
    return trainer


def _stages(callback) -> list[tuple[int, int, int]]:
    return [(r["stage"], r["start_step"], r["end_step"]) for r in callback.stage_records()]


def test_callback_six_epochs_three_stages(tmp_path):
    callback = ProgtuningCallback(num_stages=3, embeddings="always")
    _train(tmp_path, callback, rows=8, epochs=6)  # 2 updates per epoch, 12 in all
    assert callback.schedule == progressive(4, 3, epochs=6)
    assert _stages(callback) == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]


def test_callback_two_epochs_three_stages(tmp_path):
    callback = ProgtuningCallback(num_stages=3, embeddings="always")
    _train(tmp_path, callback, rows=16, epochs=2)  # 4 updates per epoch, 8 in all
    assert callback.schedule.unit == "fraction"
    assert _stages(callback) == [(0, 0, 2), (1, 2, 5), (2, 5, 8)]


def test_callback_refuses_a_run_with_fewer_steps_than_stages(tmp_path):
    callback = ProgtuningCallback(num_stages=3, embeddings="always")
    with pytest.raises(ProgtuningError, match="stage 0 of 3 would get no optimizer step") as info:
        _train(tmp_path, callback, rows=8, epochs=1)  # 2 updates
    assert "\n" not in str(info.value)
    assert callback.freezer is None  # refused before anything was frozen or trained


def test_callback_refuses_a_given_schedule_the_run_never_reaches(tmp_path):
    with pytest.raises(ProgtuningError, match="stage 2 starts at epoch 2, but the run ends after 1.5 epoch"):
        _train(tmp_path, ProgtuningCallback(progressive(4, 3)), rows=16, epochs=3, max_steps=6)
    allowed = ProgtuningCallback(progressive(4, 3), allow_empty_stages=True)  # on purpose (progtuning bench)
    _train(tmp_path, allowed, rows=16, epochs=3, max_steps=6)
    assert _stages(allowed) == [(0, 0, 4), (1, 4, 6)]


# -- progtuning train and progtuning plan -------------------------------------------------------------------
def test_train_config_stages_share_the_epochs():
    # the default preset keeps the embeddings frozen
    assert build_schedule(TrainConfig(epochs=6, stages=3), 6) == progressive(6, 3, "never", epochs=6)
    assert [s.start for s in build_schedule(TrainConfig(epochs=6, stages=3), 6).stages] == [0, 2, 4]
    assert build_schedule(TrainConfig(epochs=2, stages=3), 6).unit == "fraction"
    assert build_schedule(TrainConfig(epochs=3), 6) == progressive(6, 3, "never")  # the paper's T = epochs
    assert build_schedule(TrainConfig(epochs=3, preset="paper"), 6) == progressive(6, 3)
    grow = build_schedule(TrainConfig(epochs=4, stage_blocks=[[5], [3, 4, 5]]), 6)
    assert [s.start for s in grow.stages] == [0, 2]
    # a max_steps run is counted in steps: one stage per epoch, checked against the run at train start
    assert build_schedule(TrainConfig(epochs=6, stages=3, max_steps=10), 6) == progressive(6, 3, "never")


def test_plan_shares_the_epochs_between_the_stages(capsys, tmp_path):
    BertConfig(num_hidden_layers=6).save_pretrained(tmp_path)
    for epochs, unit, stage_epochs in (("6", "epoch", [2, 2, 2]), ("2", "fraction", [2 / 3] * 3)):
        assert main(["plan", "--model", str(tmp_path), "--epochs", epochs, "--stages", "3", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["unit"] == unit
        assert [s["epochs"] for s in plan["stages"]] == pytest.approx(stage_epochs)
        # the blocks-only reduction of T=3 equal shares: blocks train 3/3, 2/3, 1/3 of the time
        assert plan["reduction_blocks_only"] == pytest.approx(1 / 3)
