"""`progtuning train` end to end, in-process, on the real offline MiniLM-L6 and real data.

One real run (rotten-tomatoes, 2 epochs, T=2) is shared by the assertions on results.json; the
bad-input tests check the one-line error, exit code 2, and that nothing was written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from progtuning.tasks.builtin import load_builtin
from progtuning.runs.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "textfiles"
TINY = ["--max-train-examples", "16", "--max-eval-examples", "8", "--max-length", "16", "--epochs", "1"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "rt"
    code = main(
        [
            "train",
            "configs/rotten-tomatoes/minilm-l6.yaml",
            "--max-train-examples", "384",
            "--max-eval-examples", "200",
            "--max-length", "48",
            "--epochs", "2",
            "--learning-rate", "1e-4",
            "--batch-size", "32",
            "--logging-steps", "2",
            "--output-dir", str(out),
        ]
    )
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_results_json_has_every_field(real_run):
    out, results = real_run
    for key in (
        "config", "versions", "seed", "stages", "metrics", "updated_params", "baseline_updated_params",
        "reduction", "reduction_blocks_only", "wall_time_s", "train_time_s", "peak_rss_mb", "schedule",
    ):
        assert key in results, key
    assert results["config"]["model"] == "minilm-l6" and results["config"]["epochs"] == 2
    assert (out / "results.json").stat().st_mode & 0o777 == 0o644
    assert set(results["versions"]) >= {"torch", "transformers", "peft", "datasets", "accelerate"}
    assert set(results["metrics"]) == {"validation", "test"}
    for stage in results["stages"]:
        assert {"start_step", "end_step", "trainable_params", "wall_time_s", "mean_train_loss", "peak_rss_mb"} <= set(stage)
        assert stage["wall_time_s"] > 0 and stage["mean_train_loss"] > 0 and stage["peak_rss_mb"] > 0


@pytest.mark.slow
def test_results_json_follows_the_schema(real_run):
    from progtuning.runs.results import OPTIONAL_KEYS, RESULTS_KEYS, SCHEMA_VERSION

    _, results = real_run
    assert set(results) == set(RESULTS_KEYS) - set(OPTIONAL_KEYS) and results["schema"] == SCHEMA_VERSION
    # the demo config runs the default preset; the label names what differs from the paper's schedule
    assert results["mode"] == {"label": "prog-emb-never", "method": "full", "progtuning": True,
                               "schedule": "progressive", "embeddings": "never", "variant": None, "baseline": False,
                               "compared_with": "base"}
    assert results["task"]["kind"] == "classification"


@pytest.mark.slow
def test_stages_switched_where_planned(real_run):
    _, results = real_run
    steps_per_epoch = results["steps_per_epoch"]
    assert steps_per_epoch == 12  # 384 examples / batch 32
    assert [(s["stage"], s["start_step"], s["end_step"]) for s in results["stages"]] == [(0, 0, 12), (1, 12, 24)]
    assert results["planned_stage_starts"] == [0, 12]
    # MiniLM-L6, T=2, the default preset: stage 2 trains blocks 3-5 and the head; 3 blocks of 1,774,464
    # frozen, the embeddings (11,918,592) frozen throughout, while the baseline trains them.
    first, second = results["stages"]
    assert second["blocks"] == [3, 4, 5]
    assert first["trainable_params"] - second["trainable_params"] == 3 * 1_774_464
    expected_updated = first["trainable_params"] + second["trainable_params"]  # one epoch each
    assert results["updated_params"] == expected_updated
    assert results["baseline_updated_params"] == 2 * (first["trainable_params"] + 11_918_592)
    assert results["reduction_blocks_only"] == pytest.approx(0.25)
    # the default preset caches the frozen prefix from the second stage on
    assert [s["cache"] for s in results["prefix_cache"]["stages"]] == [False, True]
    logged = [entry["progtuning_stage"] for entry in results["log_history"] if "loss" in entry]
    assert logged[0] == 0 and logged[-1] == 1


@pytest.mark.slow
def test_accuracy_beats_the_majority_class(real_run):
    _, results = real_run
    _, data = load_builtin("rotten-tomatoes", max_eval_examples=200)
    labels = data["validation"]["label"]
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    assert results["metrics"]["validation"]["accuracy"] > majority + 0.05


@pytest.mark.slow
def test_model_and_tokenizer_saved_and_reload(real_run):
    out, results = real_run
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_labels == 2
    assert tokenizer("a fine film")["input_ids"][0] == tokenizer.cls_token_id


def test_files_task_end_to_end(tmp_path):
    out = tmp_path / "files"
    code = main(["train", "--task", "files", "--train-file", str(FIXTURES / "train.csv"),
                 "--validation-file", str(FIXTURES / "validation.csv"), "--output-dir", str(out),
                 "--no-save-model", "--no-save-checkpoints", *TINY])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["sizes"]["train"] == 16 and "accuracy" in results["metrics"]["validation"]


# -- bad input: one line, exit code 2, nothing written ----------------------------------------------
def _fails(capsys, tmp_path, *args):
    out = tmp_path / "out"
    code = main(["train", *args, "--output-dir", str(out), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out.exists()
    return err


def test_unknown_task(capsys, tmp_path):
    assert "unknown task 'imdb'" in _fails(capsys, tmp_path, "--task", "imdb")


def test_unknown_model(capsys, tmp_path):
    assert "no-such-model" in _fails(capsys, tmp_path, "--model", "no-such-model")


def test_unknown_config_key(capsys, tmp_path):
    assert "unknown key --learning-rat (did you mean --learning-rate?)" in _fails(capsys, tmp_path, "--learning-rat", "1")


def test_bad_value(capsys, tmp_path):
    assert "batch_size expects int" in _fails(capsys, tmp_path, "--batch-size", "big")


def test_missing_text_column(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--task", "files", "--train-file", str(FIXTURES / "train.csv"), "--text-column", "review")
    assert "review" in err


def test_label_out_of_range(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--task", "files", "--train-file", str(FIXTURES / "out_of_range.jsonl"), "--num-labels", "2")
    assert "label" in err


def test_empty_split(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--task", "files", "--train-file", str(FIXTURES / "header_only.csv"))
    assert "empty" in err or "no rows" in err


def test_unreadable_file(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--task", "files", "--train-file", str(tmp_path / "missing.csv"))
    assert "missing.csv" in err


def test_unreadable_config(capsys, tmp_path):
    code = main(["train", str(tmp_path / "nope.yaml")])
    assert code == 2 and "cannot read config" in capsys.readouterr().err


def test_existing_output_dir_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["train", "--output-dir", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("task, version", [("squad", "1.1"), ("squad_v2", "2.0")])
def test_squad_end_to_end_on_upstream_format_files(tmp_path, task, version):
    """The QA path: windows, a QA head, prediction, n-best post-processing and official EM/F1."""
    out = tmp_path / task
    code = main(["train", "--task", task, "--data-dir", str(Path(__file__).parent / "fixtures" / "squad"),
                 "--epochs", "2", "--max-length", "128", "--doc-stride", "32", "--batch-size", "4",
                 "--output-dir", str(out), "--no-save-checkpoints"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["name"] == f"squad-v{version}" and results["main_metric"] == "f1"
    validation = results["metrics"]["validation"]
    assert 0 <= validation["exact_match"] <= validation["f1"] <= 100
    assert [s["stage"] for s in results["stages"]] == [0, 1]
    if version == "2.0":
        assert validation["HasAns_total"] + validation["NoAns_total"] == validation["total"]
    from transformers import AutoModelForQuestionAnswering

    assert AutoModelForQuestionAnswering.from_pretrained(out / "model").config.model_type == "bert"
