"""results.json keeps each example's output and the validation curve (tiny BERT, the real CLI in-process).

``per_example`` must rescore to exactly the reported metrics with the task's own metric function
(the same outputs, rounded to 5 decimals: argmax of well-separated logits does not change), and
``validation_curve`` must have one point per epoch, its clock running without the evaluations,
and it must survive a resume: the points of the first part come back from the checkpoint.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from tiny_run import make_tiny_setup, train_argv

from progtuning.runs.cli import main
from progtuning.tasks.metrics import classification_metric


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    model_dir, data_dir = make_tiny_setup(root)
    shutil.copyfile(data_dir / "validation.csv", data_dir / "test.csv")
    out = root / "run"
    argv = train_argv(model_dir, data_dir, out, "--test-file", str(data_dir / "test.csv"))
    assert main(argv) == 0
    return argv, out, json.loads((out / "results.json").read_text()), data_dir


@pytest.mark.slow
def test_per_example_outputs_rescore_to_the_reported_metrics(finished):
    _, _, results, data_dir = finished
    assert set(results["per_example"]) == {"validation", "test"}
    with open(data_dir / "validation.csv") as f:
        labels = [int(row["label"]) for row in csv.DictReader(f)]
    metric = classification_metric(2)
    for split, kept in results["per_example"].items():
        assert kept["labels"] == labels  # the split's order, as the file has it
        outputs = np.asarray(kept["outputs"])
        assert outputs.shape == (len(labels), 2)  # one logit per class
        rescored = metric(outputs, np.asarray(kept["labels"]))
        for name, value in rescored.items():
            assert value == pytest.approx(results["metrics"][split][name], abs=1e-12), (split, name)


@pytest.mark.slow
def test_the_validation_curve_has_a_point_per_epoch_and_excludes_evaluation_time(finished):
    _, _, results, _ = finished
    curve = results["validation_curve"]
    assert [p["epoch"] for p in curve] == [1.0, 2.0, 3.0]
    assert [p["step"] for p in curve] == [8, 16, 24]
    times = [p["train_time_s"] for p in curve]
    assert 0 < times[0] < times[1] < times[2] <= results["train_time_s"]
    # the last evaluation saw the final model: the same score as the validation split scored after training
    assert curve[-1]["score"] == results["validation_score"]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_points_of_its_first_part(finished, tmp_path):
    argv, out, results, _ = finished
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    # as if killed during epoch 3: the newest checkpoint is the one at the end of epoch 2
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-24")
    (resumed / "results.json").unlink()
    argv = [a if a != str(out) else str(resumed) for a in argv]
    assert main([*argv, "--resume"]) == 0
    again = json.loads((resumed / "results.json").read_text())
    curve = again["validation_curve"]
    assert curve[:2] == results["validation_curve"][:2]  # restored from checkpoint-16, not re-measured
    assert [p["step"] for p in curve] == [8, 16, 24]
    assert curve[2]["train_time_s"] > curve[1]["train_time_s"]  # the clock continues
    assert curve[2]["score"] == again["validation_score"]
