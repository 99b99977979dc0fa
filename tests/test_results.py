"""The run folder's file names and the results.json schema: the mode is written, and read back."""

from __future__ import annotations

import json

import pytest

from progtuning.errors import ProgtuningError
from progtuning.runs.config import TrainConfig, load_config
from progtuning.runs.report import load_runs
from progtuning.runs.results import (
    RESULTS_FILE,
    mode_label,
    read_results,
    run_mode,
    write_json_atomic,
)
from progtuning.runs.sweep_grid import expand_sweep


def test_mode_of_a_config():
    base = run_mode(TrainConfig(progtuning=False, method="lora").to_dict())
    assert base == {"label": "base", "method": "lora", "progtuning": False, "schedule": "none",
                    "embeddings": "never", "variant": None, "baseline": True, "compared_with": None}
    # labels name what differs from the paper's schedule, whatever the default preset of the day
    prog = run_mode(TrainConfig(preset="paper").to_dict())
    assert (prog["label"], prog["baseline"], prog["compared_with"]) == ("prog", False, "base")
    assert mode_label(TrainConfig().to_dict()) == "prog-emb-never"
    cheap = run_mode(TrainConfig(variant="frozen-emb", variant_baseline=True, stages=1, embeddings="never").to_dict())
    assert (cheap["label"], cheap["baseline"], cheap["compared_with"]) == ("base-frozen-emb", True, "base")
    arm = run_mode(TrainConfig(variant="emb-never", embeddings="never", compare_with="base-frozen-emb").to_dict())
    assert (arm["label"], arm["baseline"], arm["compared_with"]) == ("prog-emb-never", False, "base-frozen-emb")
    explicit = run_mode(TrainConfig(stage_blocks=[[5], [4, 5]], embeddings="never").to_dict())
    assert explicit["label"] == "prog-explicit-emb-never" and explicit["schedule"] == "explicit"
    assert mode_label(TrainConfig(variant="emb-first", embeddings="first_stage").to_dict()) == "prog-emb-first"


def test_a_sweep_names_each_variant_in_its_runs_config():
    sweep = expand_sweep({
        "output_dir": "runs/x", "base": {"epochs": 1, "embeddings": "always"},
        "grid": {"progtuning": [False, True]}, "variants": {"emb-first": {"embeddings": "first_stage"}},
    })
    labels = {spec.name.split("/")[2]: mode_label(spec.config) for spec in sweep.runs}
    assert labels == {"base": "base", "prog": "prog", "prog-emb-first": "prog-emb-first"}


def test_report_reads_the_mode_from_results_not_from_the_folder(tmp_path):
    # a run copied out of its sweep: the folder name says nothing, results.json says everything
    path = tmp_path / "copied" / "run7" / RESULTS_FILE
    path.parent.mkdir(parents=True)
    config = TrainConfig(variant="t4", stages=4).to_dict()
    write_json_atomic(path, {"mode": run_mode(config), "config": config, "test_score": 0.5, "main_metric": "accuracy"})
    assert path.stat().st_mode & 0o777 == 0o644
    (run,) = load_runs([tmp_path])
    assert run.mode == "prog-t4" and run.method == "full"


def test_old_results_get_their_mode_from_the_sweep_folder(tmp_path):
    path = tmp_path / "trec6" / "lora" / "prog-emb-first" / "seed0" / RESULTS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": {"method": "lora", "progtuning": True, "embeddings": "first_stage"}}))
    mode = read_results(path)["mode"]
    assert mode["label"] == "prog-emb-first" and mode["method"] == "lora" and mode["embeddings"] == "first_stage"


def test_a_mode_written_before_baseline_variants_gets_its_role_from_the_label(tmp_path):
    # the layout a running sweep writes: mode without "baseline" / "compared_with"
    for label, baseline, compared_with in (("base", True, None), ("prog-t4", False, "base"),
                                            ("base-frozen", True, "base")):
        path = tmp_path / label / RESULTS_FILE
        path.parent.mkdir()
        path.write_text(json.dumps({"mode": {"label": label, "method": "full"}, "config": {}}))
        mode = read_results(path)["mode"]
        assert (mode["baseline"], mode["compared_with"]) == (baseline, compared_with), label


def test_bad_baseline_settings_are_one_line_errors():
    for values, match in (({"variant_baseline": True}, "needs a variant"), ({"compare_with": "frozen"}, "names no baseline")):
        with pytest.raises(ProgtuningError, match=match) as err:
            load_config(None, values)
        assert "\n" not in str(err.value)
