"""The run folder: --overwrite deletes only what progtuning wrote, and a failed run leaves no folder behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_run import make_tiny_setup, train_argv

from progtuning.errors import ProgtuningError
from progtuning.runs.cli import main
from progtuning.runs.output_dir import MANIFEST, OWNED, check_output_dir, claim, is_owned, release_if_unused


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("outdir")
    return make_tiny_setup(root)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A finished one-epoch run."""
    model_dir, data_dir = setup
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1")) == 0
    return out


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_run_records_what_it_owns(finished):
    manifest = json.loads((finished / MANIFEST).read_text())
    assert manifest["owned"] == list(OWNED)
    # README.md: the model card beside the saved model
    assert sorted(os.listdir(finished)) == ["README.md", "checkpoints", "model", MANIFEST, "results.json"]
    assert all(is_owned(name) for name in os.listdir(finished))


def test_overwrite_replaces_a_previous_run(setup, finished, tmp_path):
    import shutil

    model_dir, data_dir = setup
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "prefix_cache").mkdir()  # an owned name from another run's options: goes too
    (out / "results.json").write_text('{"old": true}')
    (out / "README.md").write_text("the old run's card")
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1", "--overwrite", "--no-save-model")) == 0
    # the old card and model went with the old run; this run saves neither
    assert sorted(os.listdir(out)) == ["checkpoints", MANIFEST, "results.json"]
    assert "config" in json.loads((out / "results.json").read_text())  # the new run's
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-8"]


@pytest.mark.parametrize("foreign", ["my.csv", "notes/", ".hidden"])
def test_overwrite_refuses_a_folder_holding_the_users_files(setup, finished, tmp_path, capsys, foreign):
    import shutil

    model_dir, data_dir = setup
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if foreign.endswith("/"):
        (out / foreign).mkdir()
        (out / foreign / "keep.txt").write_text("mine")
    else:
        (out / foreign).write_text("mine")
    before = _tree(out)
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1", "--overwrite")) == 2
    err = _one_error(capsys)
    assert f"--overwrite refused: {out} holds '{foreign.rstrip('/')}', which progtuning did not write" in err
    assert _tree(out) == before  # the previous run and the user's file, untouched


def test_overwrite_refuses_a_folder_progtuning_never_claimed(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    out = tmp_path / "looks-like-a-run"
    (out / "model").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    before = _tree(out)
    assert main(train_argv(model_dir, data_dir, out, "--overwrite")) == 2
    assert f"{out} is not a progtuning run folder (no {MANIFEST}" in _one_error(capsys)
    assert _tree(out) == before


def test_overwrite_of_the_current_folder_never_empties_it(setup, tmp_path, capsys, monkeypatch):
    model_dir, data_dir = setup
    here = tmp_path / "project"
    here.mkdir()
    (here / "train.py").write_text("print('my code')")
    (here / "data").mkdir()
    before = _tree(here)
    monkeypatch.chdir(here)
    assert main(train_argv(model_dir, data_dir, Path("."), "--overwrite")) == 2
    assert "--overwrite refused: . is not a progtuning run folder" in _one_error(capsys)
    assert _tree(here) == before


def test_without_overwrite_a_non_empty_folder_is_refused(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(train_argv(model_dir, data_dir, out)) == 2
    assert "exists and is not empty: pass --overwrite" in _one_error(capsys)
    assert os.listdir(out) == ["keep.txt"]


def test_claim_deletes_only_owned_names_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    run = tmp_path / "run"
    claim(run)
    (run / "model").symlink_to(outside, target_is_directory=True)  # an owned name that is a link
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / ".results.json.abc.tmp").write_text("{")  # what a crash mid-write leaves
    claim(run, overwrite=True)
    assert os.listdir(run) == [MANIFEST]
    assert (outside / "precious.txt").read_text() == "keep"


def test_check_output_dir_messages(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ProgtuningError, match="is a file: choose a folder"):
        check_output_dir(a_file)
    with pytest.raises(ProgtuningError, match=f"lies under {a_file}, which is a file"):
        check_output_dir(a_file / "deeper" / "run")
    check_output_dir(tmp_path / "new" / "run")  # nothing there yet: fine, and nothing is created
    assert not (tmp_path / "new").exists()


def test_a_failure_before_the_first_checkpoint_takes_back_the_folders_it_created(tmp_path):
    claimed = claim(tmp_path / "a" / "b" / "run")
    (claimed.folder / "checkpoints" / ".partial-checkpoint-8").mkdir(parents=True)
    assert release_if_unused(claimed)
    assert os.listdir(tmp_path) == []


def test_a_failure_after_a_checkpoint_keeps_the_run(tmp_path):
    claimed = claim(tmp_path / "run")
    (claimed.folder / "checkpoints" / "checkpoint-8").mkdir(parents=True)
    assert not release_if_unused(claimed)
    assert (claimed.folder / "checkpoints" / "checkpoint-8").is_dir()


def test_release_leaves_a_folder_that_held_something_else(tmp_path):
    (tmp_path / "existing").mkdir()
    claimed = claim(tmp_path / "existing")
    (claimed.folder / "theirs.txt").write_text("appeared meanwhile")
    assert not release_if_unused(claimed)
    assert sorted(os.listdir(claimed.folder)) == [MANIFEST, "theirs.txt"]


def test_a_sweeps_files_beside_a_run_are_owned():
    assert is_owned("config.yaml") and is_owned("train.log") and not is_owned("notes.txt")
