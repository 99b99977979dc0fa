"""Exact resume and crash safety of ``progtuning train`` (tiny BERT with dropout on, CPU, 1 thread).

A run is 3 epochs x 8 optimizer steps, 3 stages (switches at steps 8 and 16), a checkpoint per
epoch. The reference is one uninterrupted run; every interrupted-and-resumed run must end with
bit-identical weights — which needs the stage re-derived from the step, and the optimizer,
scheduler, RNG (dropout is on) and data order restored.

* SIGKILL at three points, chained in one run: mid-stage (step 12), while checkpoint-16 is being
  written, and right at the stage boundary (step 16, after the switch), resuming after each.
* SIGTERM: a checkpoint at the step it arrived, exit code 143, a message with the resume command.
* A NaN loss: one line naming the step and the stage; the last good checkpoint stays the newest.
* Atomic checkpoints, rotation, and one-line errors for corrupt and mismatched checkpoints.

Killed runs are subprocesses (``tests/crash_runner.py`` signals itself at the chosen point); the
rest runs the CLI in this process. Marked ``slow`` where subprocesses are started.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_dataset, tiny_model
from tiny_run import final_weights, make_tiny_setup, run_cli, train_argv
from transformers import TrainingArguments

from progtuning.core.callback import ProgtuningCallback
from progtuning.runs.checkpoints import (
    ProgtuningTrainer,
    clean_partial_checkpoints,
    last_checkpoint,
    rotate_checkpoints,
)
from progtuning.runs.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir, data_dir = make_tiny_setup(root)
    return root, model_dir, data_dir


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run (in this process), its output folder."""
    root, model_dir, data_dir = setup
    out = root / "reference"
    assert main(train_argv(model_dir, data_dir, out)) == 0
    return out


def _bit_identical(a: dict, b: dict) -> bool:
    # Exact by construction: every part of both runs executes on this machine with one thread
    # (--threads 1), so each step runs the same kernels on the same data; only a lost or wrongly
    # restored state (RNG, optimizer, scheduler, data order, stage) can change a bit.
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _errors(text: str) -> list[str]:
    """The ``error: ...`` lines of stderr (a progress bar may share the line: it ends in a carriage return)."""
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]


def _checkpoints(out: Path) -> list[str]:
    return sorted(os.listdir(out / "checkpoints"), key=lambda n: (n.startswith("."), n))


# -- SIGKILL at three points -------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_stage_during_a_checkpoint_write_and_at_a_boundary_then_resume_is_bit_identical(
    setup, reference, tmp_path
):
    _, model_dir, data_dir = setup
    out = tmp_path / "run"
    argv = train_argv(model_dir, data_dir, out)

    killed = run_cli(argv, crash="step:12:KILL")  # mid-stage 1
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _checkpoints(out) == ["checkpoint-8"]

    killed = run_cli(argv + ["--resume"], crash="save:16:KILL")  # model + optimizer of checkpoint-16 written, not the rest
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _checkpoints(out) == ["checkpoint-8", ".partial-checkpoint-16"]
    assert last_checkpoint(out / "checkpoints").endswith("checkpoint-8")  # the half-written one is never picked

    killed = run_cli(argv + ["--resume"], crash="step:16:KILL")  # right after the switch to stage 2
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _checkpoints(out) == ["checkpoint-16", "checkpoint-8"]  # the partial folder was cleaned up

    assert main(argv + ["--resume"]) == 0
    assert _checkpoints(out) == ["checkpoint-16", "checkpoint-24"]
    assert _bit_identical(final_weights(out), final_weights(reference))
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 24 and results["resumed_from_step"] == 16
    # The stage table, the accounting and the loss cover the whole run, not only the part after the last resume.
    assert [(s["stage"], s["start_step"], s["end_step"]) for s in results["stages"]] == [(0, 0, 8), (1, 8, 16), (2, 16, 24)]
    expected = json.loads((reference / "results.json").read_text())
    for key in ("updated_params", "baseline_updated_params", "reduction"):
        assert results[key] == expected[key], key
    # The same per-step losses summed in another order (per log window, then per session): float64 rounding.
    assert results["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-9)


# -- SIGTERM: a clean stop ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_resumes_exactly(setup, reference, tmp_path, capsys):
    _, model_dir, data_dir = setup
    out = tmp_path / "run"
    argv = train_argv(model_dir, data_dir, out)
    stopped = run_cli(argv, crash="step:10:TERM")  # mid-epoch: the step finishes, then checkpoint-11
    assert stopped.returncode == 143
    message = [line for line in stopped.stderr.splitlines() if "stopped by" in line]
    assert len(message) == 1 and "Traceback" not in stopped.stderr
    assert "stopped by SIGTERM at step 11 (stage 1), checkpoint" in message[0]
    assert message[0].endswith(f"--output-dir {out} --resume")
    assert _checkpoints(out) == ["checkpoint-11", "checkpoint-8"]
    assert not (out / "results.json").exists()

    assert main(argv + ["--resume"]) == 0
    assert _bit_identical(final_weights(out), final_weights(reference))


# -- NaN loss ----------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_step_and_stage_and_keeps_the_last_good_checkpoint(setup, tmp_path, capsys, monkeypatch):
    _, model_dir, data_dir = setup
    out = tmp_path / "run"
    original = ProgtuningCallback.on_step_begin

    def poison(self, args, state, control, model=None, **kwargs):
        result = original(self, args, state, control, model=model, **kwargs)
        if state.global_step == 13:  # a weight blows up: the loss of this step is NaN
            with torch.no_grad():
                model.classifier.weight.fill_(float("nan"))
        return result

    monkeypatch.setattr(ProgtuningCallback, "on_step_begin", poison)
    assert main(train_argv(model_dir, data_dir, out)) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1
    assert "the training loss is nan at step 14 (stage 1)" in err[0]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'checkpoint-8'}" in err[0]
    assert _checkpoints(out) == ["checkpoint-8"]
    assert not (out / "results.json").exists()


# -- atomic checkpoints -----------------------------------------------------------------------------------
def _args(out, **overrides):
    kwargs = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=4, num_train_epochs=2,
                  learning_rate=1e-3, save_strategy="steps", save_steps=2, seed=0, disable_tqdm=True,
                  logging_steps=1)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_a_checkpoint_appears_only_complete_and_old_ones_rotate_out(tmp_path, monkeypatch):
    trainer = ProgtuningTrainer(model=tiny_model("bert"), args=_args(tmp_path, save_total_limit=2),
                                train_dataset=tiny_dataset(16), callbacks=[ProgtuningCallback(num_stages=2, embeddings="always")])
    original = ProgtuningTrainer._save_rng_state

    def fail_at_six(self, output_dir):
        if self.state.global_step == 6:
            raise OSError("disk full")  # the write of checkpoint-6 dies half-way
        return original(self, output_dir)

    monkeypatch.setattr(ProgtuningTrainer, "_save_rng_state", fail_at_six)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == [".partial-checkpoint-6", "checkpoint-2", "checkpoint-4"]
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    complete = set(os.listdir(tmp_path / "checkpoint-4"))
    assert complete == {"model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json",
                        "scheduler.safetensors", "scheduler.json", "rng_state.safetensors", "rng_state.json",
                        "trainer_state.json", "training_args.json", "SHA256SUMS"}  # no pickle at all
    assert clean_partial_checkpoints(tmp_path) == [str(tmp_path / ".partial-checkpoint-6")]

    monkeypatch.setattr(ProgtuningTrainer, "_save_rng_state", original)
    trainer = ProgtuningTrainer(model=tiny_model("bert"), args=_args(tmp_path, save_total_limit=2),
                                train_dataset=tiny_dataset(16), callbacks=[ProgtuningCallback(num_stages=2, embeddings="always")])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: left alone
    removed = rotate_checkpoints(str(tmp_path), 2, best=str(tmp_path / "checkpoint-4"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-4", "checkpoint-x"]
    assert [Path(p).name for p in removed] == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert rotate_checkpoints(str(tmp_path), None) == []


# -- corrupt and mismatched checkpoints: one line, exit code 2 -------------------------------------------------
# These check what check_checkpoint finds in the files themselves, as in a checkpoint of the plain Trainer:
# without SHA256SUMS and progtuning_config.json (test_integrity.py and test_cli_errors.py check those).
def _copy(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for checkpoint in (out / "checkpoints").iterdir():
        for name in ("SHA256SUMS", "progtuning_config.json"):
            (checkpoint / name).unlink()
    return out, out / "checkpoints" / "checkpoint-24"


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda ck: _truncate(ck / "model.safetensors"), "model.safetensors is corrupt"),
        (lambda ck: _truncate(ck / "optimizer.safetensors"), "optimizer.json/.safetensors is corrupt"),
        (lambda ck: (ck / "rng_state.json").write_text("[]"), "rng_state.json/.safetensors is corrupt"),
        (lambda ck: (ck / "trainer_state.json").write_text("{garbage"), "is corrupt (trainer_state.json"),
        (lambda ck: (ck / "scheduler.json").unlink(), "lacks scheduler.json"),
        (lambda ck: (ck / "trainer_state.json").unlink(), "has no trainer_state.json"),
    ],
    ids=["truncated-weights", "truncated-optimizer", "garbage-rng", "garbage-state", "missing-scheduler",
         "missing-state"],
)
def test_a_corrupt_checkpoint_is_one_line(setup, reference, tmp_path, capsys, damage, expected):
    _, model_dir, data_dir = setup
    out, checkpoint = _copy(reference, tmp_path)
    damage(checkpoint)
    assert main(train_argv(model_dir, data_dir, out, "--resume")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and expected in err[0], err
    assert "Traceback" not in err[0] and f"delete {checkpoint}" in err[0]


def test_a_checkpoint_of_another_model_or_schedule_is_one_line(setup, reference, tmp_path, capsys):
    root, model_dir, data_dir = setup
    out, _ = _copy(reference, tmp_path)
    # the same architecture, wider: every tensor's shape differs
    import transformers

    wider = tmp_path / "wider"
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.hidden_size, config.intermediate_size = 48, 96
    transformers.BertForSequenceClassification(config).save_pretrained(wider)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(wider)
    assert main(train_argv(wider, data_dir, out, "--resume")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "was made with another model" in err[0] and "[32]" in err[0], err

    # fewer blocks
    shallow = tmp_path / "shallow"
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = 3
    transformers.BertForSequenceClassification(config).save_pretrained(shallow)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(shallow)
    assert main(train_argv(shallow, data_dir, out, "--resume")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "another model (4 blocks, this one has 3)" in err[0], err

    # the same model, another schedule
    assert main(train_argv(model_dir, data_dir, out, "--resume", "--stages", "2")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "was made with another schedule (progressive, 3 stages; this run: progressive, 2)" in err[0]


def test_resume_without_a_checkpoint_is_one_line(setup, tmp_path, capsys):
    _, model_dir, data_dir = setup
    assert main(train_argv(model_dir, data_dir, tmp_path / "nothing", "--resume")) == 2
    assert "--resume found no checkpoint" in capsys.readouterr().err


def test_state_files_round_trip_exactly_without_pickle(tmp_path):
    import numpy as np

    from progtuning.runs.checkpoints import load_state, save_state

    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3).to(torch.bfloat16)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "foreach": None, "nan": float("nan")}],
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0),
        "python": (3, tuple(range(4)), None),
    }
    save_state(state, tmp_path, "thing")
    assert sorted(os.listdir(tmp_path)) == ["thing.json", "thing.safetensors"]
    back = load_state(tmp_path, "thing")
    assert list(back["state"]) == [0] and back["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["foreach"] is None
    assert back["python"] == state["python"] and back["numpy"][1].dtype == np.uint32
    assert (back["numpy"][1] == state["numpy"][1]).all()
    with pytest.raises(TypeError, match="without pickle"):
        save_state({"f": print}, tmp_path, "other")
    assert not (tmp_path / "other.json").exists()
