"""--resume keeps the run: a changed config is refused by key, harmless keys pass, results cover the whole run.

Tiny BERT with dropout, 3 epochs x 8 steps, 3 stages; the reference keeps checkpoints 16 and 24.
A resume from checkpoint-16 (checkpoint-24 removed) must end bit-identical to the reference and
report the whole run: all three stages, the same updated-parameter accounting and train_loss.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_run import final_weights, make_tiny_setup, train_argv

from progtuning.runs.cli import main
from progtuning.runs.resume import HARMLESS, RUN_CONFIG


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-config")
    model_dir, data_dir = make_tiny_setup(root)
    out = root / "reference"
    assert main(train_argv(model_dir, data_dir, out)) == 0
    return model_dir, data_dir, out


def _from_checkpoint_16(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-24")
    shutil.rmtree(out / "model")
    (out / "results.json").unlink()
    return out


def _one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(lines) == 1, lines
    return lines[0][lines[0].index("error: "):]


@pytest.mark.parametrize(
    "change, named",
    [
        (["--batch-size", "8"], "batch_size (4 -> 8)"),
        (["--learning-rate", "1"], "learning_rate (0.001 -> 1.0)"),
        (["--epochs", "4"], "epochs (3.0 -> 4.0)"),
        (["--seed", "1"], "seed (0 -> 1)"),
        (["--max-length", "12"], "max_length (16 -> 12)"),
        (["--gradient-accumulation-steps", "2"], "gradient_accumulation_steps (1 -> 2)"),
        (["--method", "lora"], "method (full -> lora)"),
        (["--embeddings", "always"], "embeddings (never -> always)"),
        (["--no-progtuning"], "progtuning (true -> false)"),
        (["--warmup-ratio", "0.1"], "warmup_ratio (0.0 -> 0.1)"),
    ],
)
def test_a_change_that_alters_the_run_is_refused_naming_the_key(setup, tmp_path, capsys, change, named):
    model_dir, data_dir, reference = setup
    out = _from_checkpoint_16(reference, tmp_path)
    assert main(train_argv(model_dir, data_dir, out, "--resume", *change)) == 2
    err = _one_error(capsys)
    assert err.startswith(f"error: --resume refused: {named} differ from checkpoint-16's config"), err
    assert not (out / "results.json").exists() and not (out / "model").exists()


def test_every_changed_key_is_named_at_once(setup, tmp_path, capsys):
    model_dir, data_dir, reference = setup
    out = _from_checkpoint_16(reference, tmp_path)
    assert main(train_argv(model_dir, data_dir, out, "--resume", "--batch-size", "8", "--learning-rate", "1")) == 2
    assert "learning_rate (0.001 -> 1.0), batch_size (4 -> 8) differ" in _one_error(capsys)


def test_edited_data_is_refused_and_moved_data_is_not(setup, tmp_path, capsys):
    model_dir, data_dir, reference = setup
    out = _from_checkpoint_16(reference, tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    argv = train_argv(model_dir, moved, out, "--resume")
    edited = moved / "train.csv"
    edited.write_text(edited.read_text().replace(",1\n", ",0\n", 1))
    assert main(argv) == 2
    assert "train_file (its content then -> other content) differ" in _one_error(capsys)
    shutil.copyfile(data_dir / "train.csv", edited)  # same content, another path: the same run
    assert main(argv) == 0


def test_harmless_changes_pass_and_the_results_cover_the_whole_run(setup, tmp_path):
    model_dir, data_dir, reference = setup
    out = _from_checkpoint_16(reference, tmp_path)
    harmless = ["--eval-batch-size", "3", "--logging-steps", "2", "--no-save-model"]
    assert main(train_argv(model_dir, data_dir, out, "--resume", *harmless)) == 0
    results = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert results["resumed_from_step"] == 16 and expected["resumed_from_step"] is None
    assert [(s["stage"], s["start_step"], s["end_step"], s["trainable_params"], s["blocks"]) for s in results["stages"]] \
        == [(s["stage"], s["start_step"], s["end_step"], s["trainable_params"], s["blocks"]) for s in expected["stages"]]
    # Stages before the resume come back from the checkpoint as recorded there (their wall time up to the
    # save; the uninterrupted run's also counts the evaluation and save that end the epoch).
    def recorded(stage):
        return {k: v for k, v in stage.items() if k != "wall_time_s"}

    assert [recorded(s) for s in results["stages"][:2]] == [recorded(s) for s in expected["stages"][:2]]
    for key in ("updated_params", "baseline_updated_params", "reduction", "reduction_blocks_only", "steps"):
        assert results[key] == expected[key], key
    # The same steps' losses, summed in another order (per log window, then per session): float64 rounding.
    assert results["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-9)
    # Logging and evaluation batch size changed nothing that was computed: the weights of checkpoint-24 match.
    from safetensors.torch import load_file

    ours = load_file(str(out / "checkpoints" / "checkpoint-24" / "model.safetensors"))
    theirs = load_file(str(reference / "checkpoints" / "checkpoint-24" / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_checkpoint_without_a_recorded_config_resumes_as_before(setup, tmp_path):
    """Checkpoints of the plain Trainer or an older progtuning: nothing to compare, the run goes on."""
    model_dir, data_dir, reference = setup
    out = _from_checkpoint_16(reference, tmp_path)
    checkpoint = out / "checkpoints" / "checkpoint-16"
    (checkpoint / RUN_CONFIG).unlink()
    (checkpoint / "SHA256SUMS").unlink()
    assert main(train_argv(model_dir, data_dir, out, "--resume")) == 0
    ours, theirs = final_weights(out), final_weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_harmless_keys_are_documented():
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "resume.md").read_text()
    for key in HARMLESS:
        assert f"`{key}`" in docs, key
