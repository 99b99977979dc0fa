"""lr_schedule: one warm-up/decay for the run, or restarted at every stage (one optimizer).

The pure factor is checked against hand-written curves; the real Trainer (tiny BERT, gradient
accumulation on, so stages switch on optimizer updates) must apply exactly that factor at every
update, and the CLI must follow it across a resume.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_dataset, tiny_model
from tiny_run import final_weights, make_tiny_setup, train_argv
from transformers import TrainerCallback, TrainingArguments

from progtuning.core.callback import ProgtuningCallback
from progtuning.core.lr_schedule import per_stage_factor, per_stage_lr_scheduler, stage_bounds
from progtuning.core.schedule import progressive
from progtuning.errors import ProgtuningError
from progtuning.runs.checkpoints import ProgtuningTrainer
from progtuning.runs.cli import main
from progtuning.runs.config import load_config


def test_stage_bounds_follow_the_schedule():
    schedule = progressive(4, 2)
    assert stage_bounds(schedule, steps_per_epoch=5, total_steps=10) == [(0, 5), (5, 10)]
    assert stage_bounds(schedule, steps_per_epoch=5, total_steps=3) == [(0, 3), (3, 3)]  # never reached
    assert stage_bounds(progressive(4, 2, unit="fraction"), steps_per_epoch=5, total_steps=12) == [(0, 6), (6, 12)]


def test_the_factor_restarts_at_every_stage():
    bounds = [(0, 4), (4, 8), (8, 12)]
    # no warm-up: linear decay from 1 over each stage's 4 steps
    assert [per_stage_factor(s, bounds, 0.0) for s in range(12)] == [1, 0.75, 0.5, 0.25] * 3
    # warm-up over a quarter of each stage (1 step), then decay to 0 at the stage's end
    assert [per_stage_factor(s, bounds, 0.25) for s in range(12)] == pytest.approx([0, 1, 2 / 3, 1 / 3] * 3)
    # an empty stage (never reached) is skipped: the curve of the stage before goes on
    assert [per_stage_factor(s, [(0, 3), (3, 3)], 0.0) for s in range(3)] == pytest.approx([1, 2 / 3, 1 / 3])


class LearningRates(TrainerCallback):
    """The learning rate each optimizer update runs with (read just before it)."""

    def __init__(self):
        self.by_step: dict[int, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.by_step[state.global_step] = optimizer.param_groups[0]["lr"]


def _train(tmp_path, lr_schedule: str, warmup_ratio: float):
    # 24 rows, batch 2, accumulation 2: 6 updates per epoch, 3 epochs = 3 stages of 6 updates
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, warmup_steps=warmup_ratio, save_strategy="no", report_to=[], use_cpu=True,
        logging_steps=1, disable_tqdm=True,
    )
    callback, rates = ProgtuningCallback(embeddings="always"), LearningRates()
    factory = None
    if lr_schedule == "per_stage":
        factory = lambda optimizer, steps: per_stage_lr_scheduler(optimizer, callback, warmup_ratio)  # noqa: E731
    trainer = ProgtuningTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset(24),
                                callbacks=[callback, rates], lr_scheduler_factory=factory)
    trainer.train()
    return callback, rates.by_step


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.5])
def test_the_trainer_rewarms_the_learning_rate_at_every_stage_switch(tmp_path, warmup_ratio):
    callback, rates = _train(tmp_path, "per_stage", warmup_ratio)
    assert [(r["start_step"], r["end_step"]) for r in callback.stage_records()] == [(0, 6), (6, 12), (12, 18)]
    bounds = [(0, 6), (6, 12), (12, 18)]
    # LambdaLR multiplies the base rate by the factor: the same float operation as here
    assert rates == {s: pytest.approx(1e-3 * per_stage_factor(s, bounds, warmup_ratio), rel=1e-12) for s in range(18)}
    peak = max(rates.values())
    for start in (6, 12):  # every stage begins its curve again, from the same start as the first
        assert rates[start] == rates[0]
        assert rates[start + (3 if warmup_ratio else 0)] == pytest.approx(peak)
        assert rates[start - 1] < peak


def test_the_default_schedule_runs_once_over_the_whole_run(tmp_path):
    _, rates = _train(tmp_path, "run", 0.0)
    # the Trainer's linear decay over 18 updates, untouched by the stage switches
    assert rates == {s: pytest.approx(1e-3 * (18 - s) / 18, rel=1e-12) for s in range(18)}


def test_an_unknown_lr_schedule_is_a_one_line_error():
    with pytest.raises(ProgtuningError, match="lr_schedule") as err:
        load_config(None, {"lr_schedule": "cosine"})
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_cli_follows_the_per_stage_curve_across_a_resume(tmp_path):
    model_dir, data_dir = make_tiny_setup(tmp_path)
    out = tmp_path / "run"
    argv = train_argv(model_dir, data_dir, out, "--lr-schedule", "per_stage", "--warmup-ratio", "0.25")
    assert main(argv) == 0  # 3 epochs x 8 updates, 3 stages
    logged = {e["step"]: e["learning_rate"] for e in json.loads((out / "results.json").read_text())["log_history"]
              if "learning_rate" in e}
    bounds = [(0, 8), (8, 16), (16, 24)]
    # a log line at step k gives the rate the update just done ran with: update k - 1 (0-based)
    assert logged == {k: pytest.approx(1e-3 * per_stage_factor(k - 1, bounds, 0.25), rel=1e-12) for k in range(1, 25)}

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-24")  # as if killed in the last stage
    (resumed / "results.json").unlink()
    assert main([a if a != str(out) else str(resumed) for a in argv] + ["--resume"]) == 0
    again = {e["step"]: e["learning_rate"] for e in json.loads((resumed / "results.json").read_text())["log_history"]
             if "learning_rate" in e}
    assert again == logged
    reference, weights = final_weights(out), final_weights(resumed)
    assert reference.keys() == weights.keys() and all(torch.equal(reference[k], weights[k]) for k in reference)
