"""Nothing runs that the user did not ask for.

* A checkpoint holding a malicious pickle (``os.system`` through ``__reduce__``, writing a marker
  file) in ``optimizer.pt``, ``scheduler.pt`` or ``rng_state.pth`` is refused with one line, and the
  marker never appears; one in ``training_args.bin`` is never read at all. The Trainer's own loader
  (``torch.load(weights_only=True)``) refuses it too, if anyone bypasses the check.
* A YAML config with a Python object tag is refused (``yaml.safe_load``).
* A model folder that ships its own code is not imported unless ``trust_remote_code`` is passed.
* Models and checkpoints hold safetensors and JSON (no pickled ``training_args.bin``), and a run
  writes nothing outside its output folder (HOME, TMPDIR and the working directory stay empty).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import TESTS, make_tiny_setup, subprocess_env, train_argv

from progtuning.runs.checkpoints import check_checkpoint
from progtuning.runs.cli import main
from progtuning.runs.config import load_config
from progtuning.errors import ProgtuningError


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model_dir, data_dir = make_tiny_setup(root)
    out = root / "run"
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1")) == 0
    return model_dir, data_dir, out


def _errors(text: str) -> list[str]:
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]


def _copy_run(finished_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint lacks SHA256SUMS (as the plain Trainer's would): the pickle check is what runs."""
    out = tmp_path / "run"
    shutil.copytree(finished_run[2], out)
    (out / "checkpoints" / "checkpoint-8" / "SHA256SUMS").unlink()
    return out, out / "checkpoints" / "checkpoint-8"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_checkpoint_with_a_malicious_pickle_is_refused_not_executed(finished_run, tmp_path, capsys, name, writer):
    model_dir, data_dir, _ = finished_run
    out, checkpoint = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "PWNED"
    stem = name.split(".")[0]
    (checkpoint / f"{stem}.json").unlink()  # a checkpoint of the plain Trainer: the pickle is the state to load
    (checkpoint / f"{stem}.safetensors").unlink()
    if writer == "torch.save":
        torch.save({"state": Payload(marker)}, checkpoint / name)
    else:
        (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1", "--resume")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and f"refused {checkpoint / name}" in err[0] and "weights_only=True" in err[0], err
    assert not marker.exists()


def test_a_malicious_training_args_bin_is_never_read(finished_run, tmp_path, capsys):
    model_dir, data_dir, _ = finished_run
    out, checkpoint = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), checkpoint / "training_args.bin")
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1", "--resume")) == 0  # nothing left to train: evaluates, saves
    assert not marker.exists()


def test_the_trainers_own_loader_refuses_a_malicious_pickle_too(finished_run, tmp_path):
    """Defence in depth: without progtuning's check, transformers loads with weights_only=True and refuses."""
    from transformers import Trainer, TrainingArguments

    _, checkpoint = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"python": Payload(marker)}, checkpoint / "rng_state.pth")
    for stale in ("rng_state.json", "rng_state.safetensors"):
        (checkpoint / stale).unlink()
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(str(tmp_path / "t"), use_cpu=True, report_to=[]))
    with pytest.raises(pickle.UnpicklingError):
        trainer._load_rng_state(str(checkpoint))
    with pytest.raises(ProgtuningError, match="refused"):
        check_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_yaml_config_with_a_python_tag_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"# progtuning train evil.yaml\ntask: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ProgtuningError, match="not valid \\(safe\\) YAML"):
        load_config(config)
    assert main(["train", str(config)]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "Python tags are refused" in err[0]
    assert not marker.exists()


def test_model_code_shipped_in_a_folder_is_not_run_without_trust_remote_code(finished_run, tmp_path, capsys):
    model_dir, data_dir, _ = finished_run
    evil = tmp_path / "evil-model"
    shutil.copytree(model_dir, evil)
    marker = tmp_path / "PWNED"
    (evil / "evil_model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertConfig as EvilConfig, BertForSequenceClassification as EvilModel\n"
    )
    config = json.loads((evil / "config.json").read_text())
    config.update(model_type="evil-bert", auto_map={"AutoConfig": "evil_model.EvilConfig",
                                                    "AutoModelForSequenceClassification": "evil_model.EvilModel"})
    (evil / "config.json").write_text(json.dumps(config))
    assert main(train_argv(evil, data_dir, tmp_path / "run")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "custom code" in err[0]
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_models_and_checkpoints_are_safetensors_and_json_only(finished_run):
    out = finished_run[2]
    model_files = set(os.listdir(out / "model"))
    assert "model.safetensors" in model_files
    assert {f for f in model_files if not f.endswith((".safetensors", ".json"))} == set()
    checkpoints = list((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint-8"]
    files = set(os.listdir(checkpoints[0]))
    assert {"optimizer.safetensors", "scheduler.json", "rng_state.json", "trainer_state.json"} <= files
    assert {f for f in files if not f.endswith((".safetensors", ".json"))} == {"SHA256SUMS"}  # no pickle anywhere


@pytest.mark.slow
def test_a_run_writes_only_inside_its_output_folder(tmp_path):
    model_dir, data_dir = make_tiny_setup(tmp_path / "inputs")
    home, tmp, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for folder in (home, tmp, cwd):
        folder.mkdir()
    env = subprocess_env(HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"),
                         PROGTUNING_CACHE=str(home / ".cache" / "progtuning"))
    for key in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, str(TESTS / "crash_runner.py"), "--", *train_argv(model_dir, data_dir, cwd / "run", "--epochs", "1")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.listdir(cwd) == ["run"]
    assert list(home.rglob("*")) == [] and list(tmp.rglob("*")) == []
    # README.md: the model card
    assert sorted(os.listdir(cwd / "run")) == ["README.md", "checkpoints", "model", "progtuning-files.json",
                                               "results.json"]
