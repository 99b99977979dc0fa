"""Checkpoint integrity: a sha256 per file, sealed with the checkpoint, verified on --resume.

A flipped bit in a saved tensor (exponent or mantissa) is reported as corruption, not trained on:
the resume falls back to the checkpoint before it, says so in one line, and still ends
bit-identical to the uninterrupted run (tiny BERT with dropout, 3 epochs x 8 steps, checkpoints
16 and 24 kept).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_run import final_weights, make_tiny_setup, train_argv

from progtuning.runs.cli import main
from progtuning.runs.integrity import SUMS, read_checksums, verify_checksums, write_checksums


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    model_dir, data_dir = make_tiny_setup(root)
    out = root / "reference"
    assert main(train_argv(model_dir, data_dir, out)) == 0
    return model_dir, data_dir, out


def flip_bit(file: Path, tensor: str | None, bit: int) -> str:
    """Flip one bit of the first float32 element of a tensor in a safetensors file; return the tensor's name."""
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    name = tensor or next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + header_len + header[name]["data_offsets"][0]
    value = int.from_bytes(data[start : start + 4], "little") ^ (1 << bit)
    data[start : start + 4] = value.to_bytes(4, "little")
    file.write_bytes(bytes(data))
    return name


EXPONENT, MANTISSA = 30, 0  # float32: bit 30 is the exponent's highest bit, bit 0 the mantissa's lowest


def _errors(text: str) -> list[str]:
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]


def _warnings(text: str) -> list[str]:
    return [line[line.index("warning: "):] for line in text.splitlines() if "warning: " in line]


def test_every_file_of_a_checkpoint_has_its_sha256(setup):
    _, _, out = setup
    checkpoint = out / "checkpoints" / "checkpoint-24"
    sums = read_checksums(checkpoint)
    files = sorted(p.name for p in checkpoint.iterdir() if p.name != SUMS)
    assert sorted(sums) == files and "model.safetensors" in sums and "progtuning_config.json" in sums
    for name, digest in sums.items():  # the format sha256sum -c reads: "<hex>  <name>"
        assert digest == hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    assert verify_checksums(checkpoint) is None


@pytest.mark.parametrize(
    "file, bit",
    [("model.safetensors", EXPONENT), ("model.safetensors", MANTISSA), ("optimizer.safetensors", MANTISSA)],
    ids=["weight-exponent", "weight-mantissa", "optimizer-mantissa"],
)
def test_a_flipped_bit_is_corruption_and_resume_falls_back_to_the_previous_checkpoint(
    setup, tmp_path, capsys, file, bit
):
    model_dir, data_dir, reference = setup
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    damaged = out / "checkpoints" / "checkpoint-24"
    before = flip_bit(damaged / file, None, bit)
    assert verify_checksums(damaged) == f"{file} does not match its sha256 in {SUMS}"

    assert main(train_argv(model_dir, data_dir, out, "--resume")) == 0
    err = capsys.readouterr().err
    warnings = _warnings(err)
    assert len(warnings) == 1 and not _errors(err), err[-2000:]
    assert warnings[0].startswith("warning: resuming from checkpoint-16, the newest checkpoint that is intact "
                                  f"(checkpoint-24 is corrupt: {file} does not match its sha256")
    assert f"kept as {out / 'checkpoints' / 'corrupt-checkpoint-24'}" in warnings[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-16", "checkpoint-24", "corrupt-checkpoint-24"]
    ours, theirs = final_weights(out), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), before
    assert verify_checksums(out / "checkpoints" / "checkpoint-24") is None  # written again, intact


def test_when_every_checkpoint_is_corrupt_resume_refuses_in_one_line(setup, tmp_path, capsys):
    model_dir, data_dir, reference = setup
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    flip_bit(out / "checkpoints" / "checkpoint-24" / "model.safetensors", None, EXPONENT)
    (out / "checkpoints" / "checkpoint-16" / "scheduler.json").unlink()
    (out / "results.json").unlink()
    assert main(train_argv(model_dir, data_dir, out, "--resume")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: every checkpoint in {out / 'checkpoints'} is corrupt ("), err
    assert "checkpoint-24 is corrupt: model.safetensors does not match" in err[0]
    assert "checkpoint-16 is corrupt: scheduler.json is missing" in err[0]
    assert not (out / "results.json").exists()


def test_sums_catch_missing_files_and_ignore_nothing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.json").write_text("{}")
    write_checksums(tmp_path)
    assert sorted(read_checksums(tmp_path)) == ["a.bin", "sub/b.json"]
    assert verify_checksums(tmp_path) is None
    (tmp_path / "sub" / "b.json").unlink()
    assert verify_checksums(tmp_path) == "sub/b.json is missing"
    (tmp_path / SUMS).write_text("not a sum\n")
    assert "unreadable" in verify_checksums(tmp_path)
    (tmp_path / SUMS).unlink()
    assert verify_checksums(tmp_path) is None  # no sums (the plain Trainer's checkpoint): nothing to verify
