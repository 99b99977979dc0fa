"""``progtuning train --schedule contribution`` end to end: results, exact resume, the cache, plan and report.

The tiny CLI setup (``tiny_run.py``: 4-block BERT with dropout, 3 epochs x 8 steps, a checkpoint per
epoch) decides every 10% of the steps (steps 2, 4, 7, 9, 12, 14, 16, 19, 21) with a target the
deadline has to enforce. A run interrupted at step 18 is resumed from checkpoint-8 (between
decisions) and from checkpoint-16 (a decision step, made again after the resume): both must end
bit-identical to the uninterrupted run, with the same decision log, signal values included.
The real offline MiniLM-L6 runs once with a tiny budget (slow).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_run import final_weights, make_tiny_setup, train_argv

from progtuning.core.callback import ProgtuningCallback
from progtuning.runs.cli import main
from progtuning.runs.report_plots import stage_timeline
from progtuning.runs.results import mode_of_legacy_run as run_mode

CONTRIBUTION = ("--schedule", "contribution", "--target-reduction", "0.3")


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("contribution-train")
    model_dir, data_dir = make_tiny_setup(root)
    return root, model_dir, data_dir


@pytest.fixture(scope="module")
def reference(setup):
    root, model_dir, data_dir = setup
    out = root / "reference"
    assert main(train_argv(model_dir, data_dir, out, *CONTRIBUTION)) == 0
    return out


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_results_hold_the_decisions_the_realised_stages_and_their_accounting(reference):
    results = _results(reference)
    summary = results["contribution"]
    assert summary["decision_steps"] == [2, 4, 7, 9, 12, 14, 16, 19, 21]
    assert [d["step"] for d in summary["decisions"]] == summary["decision_steps"]
    assert all(len(d["scores"]) == len(d["contribution"]) == len(d["grad_norm"]) == 4 for d in summary["decisions"])
    stages = summary["realised_stages"]
    assert stages[0]["start_step"] == 0 and stages[-1]["end_step"] == 24
    assert all(a["end_step"] == b["start_step"] and a["stage"] < b["stage"] for a, b in zip(stages, stages[1:]))
    froze = [d for d in summary["decisions"] if d["froze_blocks"]]
    assert [(d["step"], d["frozen_after"]) for d in froze] == [(s["start_step"], s["stage"]) for s in stages[1:]]
    # counted from the realised stages, and the target is met (at most one block above it)
    trainable = {s["index"]: s["trainable_params"] for s in results["accounting"]["stages"]}
    updated = sum((s["end_step"] - s["start_step"]) * trainable[s["stage"]] for s in stages) / 8  # 8 steps per epoch
    assert results["updated_params"] == pytest.approx(updated, abs=1)
    block = max(summary["block_params"]) / results["model"]["method_trainable_params"]
    assert 0.3 <= results["reduction"] <= 0.3 + block
    assert results["planned_stage_starts"] is None and results["schedule"]["name"] == "contribution"


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["checkpoint-8", "checkpoint-16"])
def test_an_interrupted_run_resumes_with_the_same_decisions_bit_for_bit(setup, reference, tmp_path, monkeypatch,
                                                                         checkpoint):
    _, model_dir, data_dir = setup
    out = tmp_path / "run"
    argv = train_argv(model_dir, data_dir, out, *CONTRIBUTION)
    original = ProgtuningCallback.on_step_begin

    def stop_at_18(self, args, state, control, **kwargs):
        if state.global_step == 18:
            raise Interrupted
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(ProgtuningCallback, "on_step_begin", stop_at_18)
    with pytest.raises(Interrupted):
        main(argv)
    monkeypatch.setattr(ProgtuningCallback, "on_step_begin", original)
    for other in {"checkpoint-8", "checkpoint-16"} - {checkpoint}:
        shutil.rmtree(out / "checkpoints" / other)

    assert main(argv + ["--resume"]) == 0
    resumed, expected = _results(out), _results(reference)
    assert resumed["contribution"]["decisions"] == expected["contribution"]["decisions"]
    assert resumed["contribution"]["realised_stages"] == expected["contribution"]["realised_stages"]
    for key in ("updated_params", "baseline_updated_params", "reduction"):
        assert resumed[key] == expected[key], key
    weights, reference_weights = final_weights(out), final_weights(reference)
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)


@pytest.mark.slow
def test_resuming_with_another_target_is_refused(setup, reference, tmp_path, capsys):
    _, model_dir, data_dir = setup
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    argv = train_argv(model_dir, data_dir, out, "--schedule", "contribution", "--target-reduction", "0.2", "--resume")
    assert main(argv) == 2
    # the up-front resume check compares the checkpoint's config before anything loads
    assert "target_reduction (0.3 -> 0.2)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_frozen_prefix_cache_follows_the_decisions(setup, tmp_path):
    _, model_dir, data_dir = setup
    out = tmp_path / "cached"
    argv = train_argv(model_dir, data_dir, out, *CONTRIBUTION, "--embeddings", "first_stage", "--cache-frozen",
                      "--no-save-checkpoints")
    assert main(argv) == 0
    results = _results(out)
    levels = [s["stage"] for s in results["contribution"]["realised_stages"]]
    cached = [r for r in results["prefix_cache"]["stages"] if r["cache"]]
    assert levels[0] == 0 and len(levels) >= 2
    assert [r["level"] for r in cached] == levels[1:]  # each frozen prefix is fed from the cache
    assert results["prefix_cache"]["hits"] > 0


def test_an_unreachable_target_stops_the_cli_before_anything_is_written(setup, tmp_path, capsys):
    _, model_dir, data_dir = setup
    out = tmp_path / "run"
    assert main(train_argv(model_dir, data_dir, out, "--schedule", "contribution", "--target-reduction", "0.9")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "target_reduction 0.9 is out of reach" in err[0]
    assert not out.exists()


def test_plan_prints_only_the_bounds(capsys):
    assert main(["plan", "--model", "minilm-l6", "--schedule", "contribution", "--target-reduction", "0.2", "--json",
                 "--preset", "paper"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["schedule"] == "contribution" and "cannot be planned in advance" in plan["note"]
    assert [r["frozen_blocks"] for r in plan["rungs"]] == [0, 1, 2, 3, 4, 5]
    assert plan["rungs"][1]["saved_per_step"] == 1_774_464  # one MiniLM-L6 block (docs: paper.md)
    assert (plan["reduction_low"], plan["reduction_high"]) == (0.0, 0.2)
    # all but the top block from 10% of the run: 5 blocks x 0.9 of the 22.7M the method trains
    assert plan["max_reduction"] == pytest.approx(5 * 1_774_464 * 0.9 / plan["method_trainable_params"])
    assert main(["plan", "--model", "minilm-l6", "--schedule", "contribution", "--target-reduction", "0.5",
                 "--preset", "paper"]) == 2


def test_report_names_the_mode_and_draws_the_realised_stages():
    assert run_mode("x/results.json", {"progtuning": True, "schedule": "contribution", "target_reduction": 0.25}) == \
        "prog-contribution-r0.25"
    assert run_mode("x/results.json", {"progtuning": True, "schedule": "contribution"}) == "prog-contribution"
    results = {
        "steps": 30,
        "stages": [{"stage": 2, "start_step": 20, "end_step": 30, "trainable_params": 5}],  # only after a resume
        "accounting": {"stages": [{"index": 0, "trainable_params": 9}, {"index": 1, "trainable_params": 7},
                                  {"index": 2, "trainable_params": 5}]},
        "contribution": {"realised_stages": [{"stage": 0, "start_step": 0, "end_step": 12},
                                             {"stage": 2, "start_step": 12, "end_step": 30}]},
    }
    assert stage_timeline(results) == ([0, 12, 12, 30], [9, 9, 5, 5])


@pytest.mark.slow
def test_real_minilm_trains_with_the_contribution_schedule_and_reports(tmp_path):
    out = tmp_path / "minilm"
    argv = ["train", "--task", "rotten-tomatoes", "--model", "minilm-l6", "--schedule", "contribution",
            "--embeddings", "always", "--target-reduction", "0.1", "--decision-interval", "0.2", "--max-train-examples", "64",
            "--max-eval-examples", "32", "--epochs", "2", "--batch-size", "16", "--max-length", "32",
            "--threads", "1", "--no-save-model", "--no-save-checkpoints", "--logging-steps", "2",
            "--output-dir", str(out)]
    assert main(argv) == 0
    results = _results(out)
    summary = results["contribution"]
    assert summary["decision_steps"] == [1, 3, 4, 6]  # 8 steps, every 20%
    assert summary["block_params"] == [1_774_464] * 6
    assert 0.1 <= results["reduction"] <= 0.1 + 1_774_464 / results["model"]["method_trainable_params"]
    assert all(d["contribution"][5] is not None for d in summary["decisions"])  # the top block is always measured
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert list((tmp_path / "report" / "timelines").glob("*.png"))


def test_a_sweep_runs_the_contribution_schedule_as_a_variant_beside_the_fixed_one(tmp_path):
    from progtuning.runs.sweep_grid import expand_sweep

    sweep = expand_sweep({
        "output_dir": str(tmp_path / "sweep"),
        "base": {"model": "minilm-l6", "epochs": 3},
        "grid": {"task": ["rotten-tomatoes"], "method": ["full", "lora"], "progtuning": [False, True], "seed": [0]},
        "variants": {"contribution": {"schedule": "contribution", "target_reduction": 0.156}},
    })
    names = [r.name for r in sweep.runs]
    assert names[:3] == ["rotten-tomatoes/full/base/seed0", "rotten-tomatoes/full/prog/seed0",
                         "rotten-tomatoes/full/prog-contribution/seed0"]
    variant = sweep.runs[2].config
    assert (variant["schedule"], variant["target_reduction"], variant["progtuning"]) == ("contribution", 0.156, True)
    assert sweep.runs[0].config.get("schedule", "fixed") == "fixed"  # the baseline has no schedule
