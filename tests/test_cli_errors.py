"""Bad inputs and faults end in one line, exit code 2, no traceback, and nothing half-written.

Each case runs the real CLI in this process on a tiny BERT folder and tiny CSV files
(``tiny_run.py``): data that must be refused, models that must not load (or must say what they
ignore), unknown flags of every subcommand, and I/O faults (a read-only folder, an output path
under a file, a full disk while a checkpoint, the model or results.json is written — simulated by
making the writer raise ``OSError(ENOSPC)``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_run import make_tiny_setup, train_argv

from progtuning.runs.cli import main
from progtuning.runs.integrity import verify_checksums


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("cli-errors"))


def one_error(capsys) -> str:
    """The single ``error:`` line on stderr (nothing else an error, no traceback)."""
    err = capsys.readouterr().err
    lines = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def fails(capsys, argv: list[str], out: Path) -> str:
    assert main(argv) == 2
    message = one_error(capsys)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # nothing written, no empty folder
    return message


def files_argv(model_dir: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "files", "--train-file", str(train), "--model", str(model_dir), "--epochs", "1",
            "--batch-size", "4", "--max-length", "16", "--threads", "1", "--output-dir", str(out), *extra]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ROWS = "".join(f"word{i} good film,{i % 2}\n" for i in range(12))


# -- config values: refused before anything loads -----------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--epochs", "nan", "epochs must be a finite number >= 0, got nan"),
        ("--epochs", "inf", "epochs must be a finite number >= 0, got inf"),
        ("--epochs", "0", "epochs is 0 and max_steps is -1, so nothing would train"),
        ("--learning-rate", "nan", "learning_rate must be a finite number > 0, got nan"),
        ("--seed", "-1", "seed must lie in 0..4294967295, got -1"),
        ("--logging-steps", "0", "logging_steps must be at least 1, got 0"),
        ("--threads", "-1", "threads must be at least 1, got -1"),
        ("--warmup-ratio", "5", "warmup_ratio must lie in [0, 1)"),
        ("--weight-decay", "-1", "weight_decay must be a finite number >= 0, got -1.0"),
        ("--max-length", "1024", "max_length 1024 is longer than model 'minilm-l6' can embed (512 positions)"),
    ],
)
def test_bad_values_are_one_line_and_write_nothing(tmp_path, capsys, option, value, expected):
    out = tmp_path / "out"
    config = Path(__file__).parent.parent / "configs" / "rotten-tomatoes" / "minilm-l6.yaml"
    message = fails(capsys, ["train", str(config), option, value, "--output-dir", str(out)], out)
    assert message.startswith(f"error: {expected}"), message


# -- data ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("single.csv", "text,label\n" + "".join(f"t{i},pos\n" for i in range(10)),
         "has a single label ('pos'): classification needs examples of at least two classes"),
        ("floats.csv", "text,label\na,1.5\nb,2.25\nc,0.5\nd,1.5\n",
         "label 1.5 is not a class: use task_type='regression' for numeric targets"),
        ("floats.tsv", "text\tlabel\na\t1.5\nb\t2.25\nc\t0.5\nd\t1.5\n",
         "label 1.5 is not a class: use task_type='regression' for numeric targets"),
        ("floats.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": 2.25}\n',
         "label 1.5 is not a class: use task_type='regression' for numeric targets"),
        ("mixed.csv", "text,label\na,pos\nb,0\nc,1\nd,neg\n", "labels mix numbers (0, 1) and names ('neg', 'pos')"),
        ("empty-text.csv", "text,label\n" + ROWS + ",1\n" + ROWS,
         "row 13 has an empty 'text' (1 such rows): fill them in or drop them, or pass --skip-bad-rows"),
        ("blank-label.csv", "text,label\n" + ROWS + "a film, \n",
         "row 13 has an empty 'label' (1 such rows)"),
    ],
    ids=["single-class", "float-labels-csv", "float-labels-tsv", "float-labels-jsonl", "mixed-labels", "empty-text",
         "blank-label"],
)
def test_data_that_must_be_refused(setup, tmp_path, capsys, name, text, expected):
    model_dir, _ = setup
    out = tmp_path / "out"
    message = fails(capsys, files_argv(model_dir, write(tmp_path / name, text), out), out)
    assert expected in message, message


def test_a_directory_given_as_a_file_is_named_as_one(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    out = tmp_path / "out"
    message = fails(capsys, files_argv(model_dir, data_dir, out), out)
    assert message == f"error: --train-file '{data_dir}' is a directory, not a file: give the file inside it"
    from progtuning.errors import ProgtuningError
    from progtuning.tasks.textfiles import load_text_files

    with pytest.raises(ProgtuningError, match="is a directory, not a file"):  # the library says it too
        folder = tmp_path / "looks.csv"
        folder.mkdir()
        load_text_files(folder)


def test_skip_bad_rows_skips_counts_and_reports(setup, tmp_path, capsys):
    model_dir, _ = setup
    train = write(tmp_path / "train.csv", "text,label\n" + ROWS + ",1\n  ,0\n" + ROWS)
    out = tmp_path / "out"
    assert main(files_argv(model_dir, train, out, "--skip-bad-rows", "--no-save-model")) == 0
    err = capsys.readouterr().err
    warnings = [line[line.index("warning: "):] for line in err.splitlines() if "warning: " in line]
    expected = "skipped 2 row(s) with an empty text or label (2 in the train file; --skip-bad-rows)"
    assert warnings == [f"warning: {expected}"], warnings
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["skipped_rows"] == {"train": 2}
    assert results["warnings"] == [expected]
    assert sum(results["task"]["sizes"].values()) == 24  # 26 rows, 2 skipped


# -- models ----------------------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pytorch_model_bin_is_one_line_without_weights_only_advice(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    evil = tmp_path / "evil-model"
    shutil.copytree(model_dir, evil)
    from safetensors.torch import load_file

    state = load_file(str(evil / "model.safetensors"))
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({**state, "extra": Payload(marker)}, evil / "pytorch_model.bin")
    out = tmp_path / "out"
    assert main(train_argv(evil, data_dir, out)) == 2
    err = capsys.readouterr().err
    lines = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: refused the weights of model '{evil}': a pickle (it would call ")
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert not marker.exists() and not out.exists()


def test_remote_code_that_is_ignored_is_said_in_one_line(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    shipped = tmp_path / "with-code"
    shutil.copytree(model_dir, shipped)
    marker = tmp_path / "RAN"
    (shipped / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((shipped / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "custom.FancyBert"}  # model_type stays "bert"
    (shipped / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(train_argv(shipped, data_dir, out, "--epochs", "1", "--no-save-model")) == 0
    err = capsys.readouterr().err
    warnings = [line[line.index("warning: "):] for line in err.splitlines() if "warning: " in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: model '{shipped}' ships its own code (AutoModelForSequenceClassification "
                                  "-> custom.FancyBert), which was ignored without --trust-remote-code")
    assert json.loads((out / "results.json").read_text())["warnings"] == [warnings[0][len("warning: "):]]
    assert not marker.exists()


def test_a_mistyped_alias_gets_the_closest_offline(tmp_path, capsys):
    out = tmp_path / "out"
    message = fails(capsys, ["train", "--model", "minilm-l7", "--output-dir", str(out)], out)
    assert message.startswith("error: unknown model 'minilm-l7' (did you mean minilm-l6?)")
    assert "offline (HF_HUB_OFFLINE) it is not in the Hugging Face cache" in message


def test_without_a_network_a_hub_id_fails_at_once(tmp_path, capsys, monkeypatch):
    import progtuning.runs.models as models

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "resolve_model", lambda name: pytest.fail("the hub must not be tried"))
    out = tmp_path / "out"
    message = fails(capsys, ["train", "--model", "minilm-l7", "--output-dir", str(out)], out)
    assert message.startswith("error: unknown model 'minilm-l7' (did you mean minilm-l6?): it is not an alias or a "
                              "local folder, and the Hugging Face hub cannot be reached")


def test_model_folders_that_cannot_be_models(setup, tmp_path, capsys):
    _, data_dir = setup
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = tmp_path / "out"
    assert "has no config.json" in fails(capsys, train_argv(empty, data_dir, out), out)
    assert "does not exist" in fails(capsys, train_argv(tmp_path / "nope" / "model", data_dir, out), out)


def test_max_length_beyond_the_models_positions(setup, tmp_path, capsys, monkeypatch):
    model_dir, data_dir = setup  # 32 positions
    out = tmp_path / "out"
    message = fails(capsys, train_argv(model_dir, data_dir, out, "--max-length", "64"), out)
    assert "max_length 64 is longer than model" in message and "(32 positions): use --max-length 32" in message
    # A model whose config.json is only known once loaded (a hub id): refused after loading, before training.
    import progtuning.runs.models as models

    monkeypatch.setattr(models, "local_model_config", lambda name: None)
    message = fails(capsys, train_argv(model_dir, data_dir, out, "--max-length", "64"), out)
    assert "(32 positions)" in message


# -- unknown flags, every subcommand ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--fp16", "--epochs", "1"], "error: unknown key --fp16 (a TrainingArguments field: pass it as --training-args.fp16)"),
        (["train", "--epoch", "1"], "error: unknown key --epoch (did you mean --epochs?)"),
        (["probe", "--blokcs", "1"], "error: unknown key --blokcs (did you mean --blocks?)"),
        (["plan", "--epohcs", "3"], "error: unknown key --epohcs (did you mean --epochs?): see `progtuning plan --help`"),
        (["sweep", "x.yaml", "--paralel", "2"], "error: unknown key --paralel (did you mean --parallel?)"),
        (["report", "runs", "--outt", "x"], "error: unknown key --outt (did you mean --out?)"),
        (["bench", "--hiden", "32"], "error: unknown key --hiden (did you mean --hidden?)"),
        (["models", "--all"], "error: unknown key --all"),
        (["trian"], "error: unknown choice 'trian' (did you mean train?)"),
    ],
)
def test_unknown_flags_are_one_line_with_the_closest_key(capsys, argv, expected):
    assert main(argv) == 2
    assert one_error(capsys).startswith(expected)


# -- I/O faults --------------------------------------------------------------------------------------------
def test_an_output_path_under_a_file(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    a_file = write(tmp_path / "a-file", "x")
    assert main(train_argv(model_dir, data_dir, a_file / "run")) == 2
    assert f"lies under {a_file}, which is a file" in one_error(capsys)
    assert main(train_argv(model_dir, data_dir, a_file)) == 2
    assert "is a file: choose a folder" in one_error(capsys)
    assert a_file.read_text() == "x"


def test_a_read_only_output_folder(setup, tmp_path, capsys, monkeypatch):
    model_dir, data_dir = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere, so the test user's permissions are simulated (the check is os.access).
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw))
    out = locked / "run"
    message = fails(capsys, train_argv(model_dir, data_dir, out), out)
    assert message == (f"error: output_dir {out} cannot be written ({locked} is read-only for this user): "
                       "choose another --output-dir or change its permissions")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_output_folder_for_real(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "cannot be written" in fails(capsys, train_argv(model_dir, data_dir, locked / "run"), locked / "run")
    finally:
        locked.chmod(0o755)


def test_permission_denied_while_creating_the_folder_is_one_line(setup, tmp_path, capsys, monkeypatch):
    model_dir, data_dir = setup
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "run"
    message = fails(capsys, train_argv(model_dir, data_dir, out, "--epochs", "1"), out)
    assert message == f"error: cannot prepare output_dir {out}: permission denied ({out}); choose another " \
                      "--output-dir or fix its permissions"


def _disk_full_at(monkeypatch, target: str, name_part: str):
    """Make the writer ``target`` (``module.function``) raise ENOSPC when what it writes mentions ``name_part``:
    a path argument, or (json.dump) a key of the document."""
    import importlib

    module_name, attribute = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attribute)

    def full(*args, **kwargs):
        mentioned = [str(a) for a in (*args, *kwargs.values()) if isinstance(a, (str, Path))]
        mentioned += [str(key) for a in args if isinstance(a, dict) for key in a]
        if any(name_part in text for text in mentioned):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attribute, full)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(setup, tmp_path, capsys, monkeypatch):
    model_dir, data_dir = setup
    out = tmp_path / "run"
    _disk_full_at(monkeypatch, "safetensors.torch.save_file", "checkpoint-16")  # the optimizer/RNG state writer
    assert main(train_argv(model_dir, data_dir, out)) == 2
    message = one_error(capsys)
    good = out / "checkpoints" / "checkpoint-8"
    assert message == (f"error: cannot write checkpoint-16 (training stopped at step 16): the disk is full; the last "
                       f"good checkpoint, {good}, is intact; free some space, then resume with --resume")
    assert os.listdir(out / "checkpoints") == ["checkpoint-8"]  # no half-written checkpoint-16
    assert verify_checksums(good) is None
    assert not (out / "results.json").exists() and not (out / "model").exists()
    monkeypatch.undo()
    assert main(train_argv(model_dir, data_dir, out, "--resume")) == 0  # space is back: the run finishes
    assert json.loads((out / "results.json").read_text())["steps"] == 24


def test_a_full_disk_at_the_first_checkpoint_leaves_no_folder(setup, tmp_path, capsys, monkeypatch):
    model_dir, data_dir = setup
    out = tmp_path / "a" / "b" / "run"
    _disk_full_at(monkeypatch, "safetensors.torch.save_file", "checkpoint-8")
    assert main(train_argv(model_dir, data_dir, out)) == 2
    assert "no checkpoint was written yet" in one_error(capsys)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "writer, part, left",
    # the model and its card (README.md) came first, whole
    [("json.dump", "log_history", ["README.md", "checkpoints", "model", "progtuning-files.json"]),
     ("transformers.modeling_utils.safe_save_file", ".partial-model", ["checkpoints", "progtuning-files.json"])],
    ids=["results.json", "model"],
)
def test_a_full_disk_at_the_end_leaves_no_half_file(setup, tmp_path, capsys, monkeypatch, writer, part, left):
    model_dir, data_dir = setup
    out = tmp_path / "run"
    _disk_full_at(monkeypatch, writer, part)
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1")) == 2
    message = one_error(capsys)
    assert message.startswith(f"error: cannot write the run's files in {out}: the disk is full; free some space, "
                              "then resume with --resume (the last good checkpoint is ")
    assert sorted(os.listdir(out)) == left  # no temporary or half-written file
    monkeypatch.undo()
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "1", "--resume")) == 0
    assert sorted(os.listdir(out)) == ["README.md", "checkpoints", "model", "progtuning-files.json", "results.json"]
