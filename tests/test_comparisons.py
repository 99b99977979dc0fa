"""Each arm against its own baseline, and the goal check, from hand-built results.json files.

A small study tree (model "tiny", task trec6: 6 classes, a shared test set of 60 examples) with
one-hot outputs, so every number is arithmetic:

* ``base`` (seeds 0–2): wrong on the first 12 / 15 / 18 test examples → accuracy 0.80 / 0.75 / 0.70;
  900 updated parameters; train time 100 / 120 / 110 s; validation curve ending at 0.80 after 90 s.
* ``prog`` (vs base): right everywhere → Δ 0.20 / 0.25 / 0.30, median 0.25; 600 updated parameters
  → reduction 1/3; train time 60 / 90 / 55 s → paired ratios 0.6 / 0.75 / 0.5, median 0.6 (the ratio
  of the medians would be 60/110); reaches 0.80 on validation after 40 s → 40/90.
* ``base-frozen-emb`` (a cheap baseline, vs base): the baseline's outputs → Δ 0; 750 parameters.
* ``prog-emb-never`` (vs base-frozen-emb): wrong on 12 more examples → Δ −0.20 in every seed;
  600 parameters → reduction 1 − 600/750 = 20% against *its* baseline; never reaches 0.80. Its second
  row, against the plain baseline: the same Δ (base-frozen-emb has base's outputs), reduction 1/3.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from progtuning.runs.cli import main
from progtuning.runs.comparisons import compare_runs, time_to_reach_ratio
from progtuning.runs.goal import goal_check, missed_criteria
from progtuning.runs.report import build_report, load_runs
from progtuning.runs.results import write_json_atomic

N, CLASSES = 60, 6
LABELS = np.arange(N) % CLASSES


def outputs(wrong: int) -> list:
    """One-hot logits, wrong (the next class) on the first ``wrong`` examples."""
    predicted = np.where(np.arange(N) < wrong, (LABELS + 1) % CLASSES, LABELS)
    return np.eye(CLASSES)[predicted].tolist()


def write_run(root, label, seed, wrong, updated, train_time, curve, compared_with="base", task="trec6", gpu_mb=None):
    path = root / task / "full" / label / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    baseline = label.startswith("base")
    accuracy = 1 - wrong / N
    write_json_atomic(path, {
        "mode": {"label": label, "method": "full", "progtuning": label != "base", "baseline": baseline,
                 "compared_with": None if label == "base" else compared_with},
        "seed": seed, "config": {"method": "full", "seed": seed, "epochs": 3},
        "task": {"name": task, "kind": "classification", "main_metric": "accuracy", "num_labels": CLASSES},
        "model": {"name": "tiny"}, "main_metric": "accuracy",
        "test_score": accuracy, "validation_score": curve[-1][1],
        "per_example": {"test": {"labels": LABELS.tolist(), "outputs": outputs(wrong)}},
        "validation_curve": [{"epoch": i + 1, "step": 10 * (i + 1), "train_time_s": t, "score": s}
                             for i, (t, s) in enumerate(curve)],
        "updated_params": updated, "train_time_s": train_time, "peak_rss_mb": 1000 - 100 * (label != "base"),
        "stages": [{"stage": i, "peak_gpu_mb": mb} for i, mb in enumerate(gpu_mb or [None])],
    })


@pytest.fixture
def study(tmp_path):
    base_curve = [(30, 0.6), (60, 0.7), (90, 0.8)]
    for seed, (wrong, time) in enumerate([(12, 100), (15, 120), (18, 110)]):
        write_run(tmp_path, "base", seed, wrong, 900, time, base_curve)
        write_run(tmp_path, "prog", seed, 0, 600, [60, 90, 55][seed], [(20, 0.7), (40, 0.8), (60, 0.85)])
        write_run(tmp_path, "base-frozen-emb", seed, wrong, 750, time, base_curve)
        write_run(tmp_path, "prog-emb-never", seed, wrong + 12, 600, time, [(30, 0.5), (60, 0.6), (90, 0.7)],
                  compared_with="base-frozen-emb")
    return tmp_path


def test_each_arm_against_its_own_baseline(study):
    all_rows = compare_runs(load_runs([study]), resamples=300)
    rows = {r["arm"]: r for r in all_rows if r["primary"]}
    assert set(rows) == {"prog", "base-frozen-emb", "prog-emb-never"}
    # an arm with a cheap baseline is also shown against the plain one, and only that arm
    secondary = [r for r in all_rows if not r["primary"]]
    assert [(r["arm"], r["baseline"]) for r in secondary] == [("prog-emb-never", "base")]
    assert secondary[0]["reduction"] == pytest.approx(1 - 600 / 900)
    assert secondary[0]["delta"] == pytest.approx(-0.2, abs=1e-12)

    prog = rows["prog"]
    assert (prog["baseline"], prog["seeds"], prog["examples"]) == ("base", 3, N)
    assert prog["delta"] == pytest.approx(0.25, abs=1e-12)
    assert prog["verdict"] == "better" and 0 < prog["delta_low"] <= 0.25 <= prog["delta_high"]
    assert prog["reduction"] == pytest.approx(1 / 3)
    assert prog["time_ratio"] == pytest.approx(0.6)  # the median of the paired ratios
    assert prog["time_to_reach_ratio"] == pytest.approx(40 / 90) and prog["reached"] == "3/3"
    assert (prog["base_peak_rss_mb"], prog["arm_peak_rss_mb"]) == (1000, 900)
    assert prog["points_per_unit"] == 100.0

    frozen = rows["base-frozen-emb"]
    assert frozen["arm_is_baseline"] and frozen["baseline"] == "base"
    assert (frozen["delta"], frozen["delta_low"], frozen["delta_high"]) == (0.0, 0.0, 0.0)
    assert frozen["verdict"] == "no difference"

    never = rows["prog-emb-never"]
    assert never["baseline"] == "base-frozen-emb"
    assert never["delta"] == pytest.approx(-0.2, abs=1e-12) and never["verdict"] == "worse"
    assert never["reduction"] == pytest.approx(0.2)  # against the frozen-embeddings baseline's 750, not 900
    assert math.isinf(never["time_to_reach_ratio"]) and never["reached"] == "0/3"


def test_gpu_runs_report_the_peak_and_the_last_stage_gpu_memory(tmp_path):
    curve = [(30, 0.6), (60, 0.7), (90, 0.8)]
    for seed in range(2):
        write_run(tmp_path, "base", seed, 10, 900, 100, curve, gpu_mb=[3000 + 2 * seed])
        write_run(tmp_path, "prog", seed, 10, 600, 80, curve, gpu_mb=[3000 + 2 * seed, 2200, 1400 + 10 * seed])
    (row,) = compare_runs(load_runs([tmp_path]), resamples=0)
    assert (row["base_peak_gpu_mb"], row["arm_peak_gpu_mb"], row["arm_last_stage_gpu_mb"]) == (3001, 3001, 1405)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--out", str(out), "--no-plots", "--bootstrap", "0"]) == 0
    markdown = (out / "results.md").read_text()
    assert "peak GPU MiB (base / arm / arm's last stage)" in markdown and "| 3,001 / 3,001 / 1,405 |" in markdown


def test_cpu_runs_have_no_gpu_memory_column(study, tmp_path):
    rows = compare_runs(load_runs([study]), resamples=0)
    assert all(r["arm_peak_gpu_mb"] is None and r["arm_last_stage_gpu_mb"] is None for r in rows)
    out = tmp_path / "report"
    assert main(["report", str(study), "--out", str(out), "--no-plots", "--bootstrap", "0"]) == 0
    assert "GPU MiB" not in (out / "results.md").read_text()


def test_runs_without_per_example_outputs_get_delta_from_their_scores_and_no_interval(study):
    for path in study.rglob("results.json"):
        results = json.loads(path.read_text())
        del results["per_example"]
        path.write_text(json.dumps(results))
    rows = {r["arm"]: r for r in compare_runs(load_runs([study]), resamples=300)}
    assert rows["prog"]["delta"] == pytest.approx(0.25)
    assert rows["prog"]["delta_low"] is None and rows["prog"]["verdict"] is None


def test_time_to_reach():
    base = [{"train_time_s": 50, "score": 0.7}, {"train_time_s": 100, "score": 0.8}]
    assert time_to_reach_ratio(base, [{"train_time_s": 30, "score": 0.81}]) == 0.3
    assert time_to_reach_ratio(base, [{"train_time_s": 30, "score": 0.5}, {"train_time_s": 80, "score": 0.8}]) == 0.8
    assert math.isinf(time_to_reach_ratio(base, [{"train_time_s": 30, "score": 0.79}]))
    assert time_to_reach_ratio(base, []) is None and time_to_reach_ratio(None, base) is None


def _row(task, arm, delta_points, reduction, time_ratio, arm_is_baseline=False, primary=True):
    return {"model": "m", "method": "full", "task": task, "arm": arm, "baseline": "base", "primary": primary,
            "arm_is_baseline": arm_is_baseline, "delta": delta_points / 100, "points_per_unit": 100.0,
            "reduction": reduction, "time_ratio": time_ratio}


def test_goal_check_needs_all_three_on_four_of_five_tasks():
    tasks = ["a", "b", "c", "d", "e"]
    rows = [_row(t, "prog-good", -0.4, 0.25, 0.65) for t in tasks[:4]] + [_row("e", "prog-good", -2.0, 0.25, 0.65)]
    rows += [_row(t, "prog-slow", 0.0, 0.3, 0.75 if t in "ab" else 0.6) for t in tasks]
    rows += [_row(t, "base-frozen", 0.0, 0.5, 0.5, arm_is_baseline=True) for t in tasks]
    # a head-to-head row of two presets is no verdict (here it would make "e" pass)
    head_to_head = _row("e", "prog-good", 0.0, 0.5, 0.5, primary=False)
    rows += [{**head_to_head, "baseline": "prog-slow"}]
    results = {r.arm: r for r in goal_check(rows)}
    assert set(results) == {"prog-good", "prog-slow"}  # a baseline arm is no preset
    assert results["prog-good"].met and results["prog-good"].passing == ["a", "b", "c", "d"]
    assert results["prog-good"].failing == {"e": ["Δ -2.00 pt"]}
    assert not results["prog-slow"].met and len(results["prog-slow"].passing) == 3
    assert results["prog-slow"].failing["a"] == ["time 0.75×"]
    # the thresholds themselves
    assert missed_criteria(_row("x", "p", -0.5, 0.20, 0.70)) == []
    assert missed_criteria(_row("x", "p", -0.51, 0.19, 0.71)) == ["Δ -0.51 pt", "reduction 19%", "time 0.71×"]
    # four tasks measured are not enough, five of six are needed where six are measured
    assert not goal_check([_row(t, "p", 0, 0.3, 0.5) for t in tasks[:3]])[0].met
    six = [_row(t, "p", 0, 0.3, 0.5) for t in "abcd"] + [_row(t, "p", -3, 0.3, 0.5) for t in "ef"]
    assert not goal_check(six)[0].met
    # a preset with a cheap baseline gets a second verdict against the plain one
    cheap = [{**_row(t, "p", -1.0, 0.3, 0.75), "baseline": "base-frozen"} for t in tasks]
    plain = [_row(t, "p", 0.0, 0.6, 0.5, primary=False) for t in tasks]
    verdicts = {r.baseline: r.met for r in goal_check(cheap + plain)}
    assert verdicts == {"base-frozen": False, "base": True}


def test_the_report_writes_the_study_tables_and_prints_the_goal_check(study, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(study), "--out", str(out), "--no-plots", "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "The goal:" in printed and "tiny full prog (vs base): 1 of 1 tasks -> not met" in printed  # one task: too few
    assert "No preset reaches the goal" in printed
    with open(out / "comparisons.csv") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f) if r["primary"] == "True"}
    assert rows["prog-emb-never"]["baseline"] == "base-frozen-emb" and rows["prog-emb-never"]["verdict"] == "worse"
    markdown = (out / "results.md").read_text()
    assert "### Each arm against its own baseline" in markdown and "### Goal check" in markdown
    assert "| tiny | trec6 | full | prog | base | accuracy | 0.7500 | 1.0000 | +25.00 |" in markdown
    assert "not reached (0/3)" in markdown and "base-frozen-emb †" in markdown
    assert "| tiny | trec6 | full | prog-emb-never | *base* | accuracy |" in markdown
    assert (out / "goal.csv").is_file()
    written = build_report([study], tmp_path / "again", plots=False, bootstrap=0)
    assert all(r["delta_low"] is None for r in written["comparisons"])  # --bootstrap 0: no intervals


def test_two_arms_head_to_head(study, capsys):
    rows = compare_runs(load_runs([study]), resamples=200, extra_pairs=[("prog-emb-never", "prog"), ("prog", "absent")])
    head = [r for r in rows if r["baseline"] == "prog"]
    assert len(head) == 1 and not head[0]["primary"] and head[0]["arm"] == "prog-emb-never"
    # paired by seed: accuracies 0.60 / 0.55 / 0.50 against 1.0 everywhere
    assert head[0]["delta"] == pytest.approx(-0.45, abs=1e-12) and head[0]["verdict"] == "worse"
    assert head[0]["reduction"] == pytest.approx(0.0)  # both update 600
    assert not any(r["baseline"] == "absent" for r in rows)  # a pair with an arm that never ran: no row
    # the CLI: ARM:OTHER, repeatable; a malformed pair is one line
    assert main(["report", str(study), "--out", str(study / "r"), "--no-plots", "--bootstrap", "0",
                 "--compare", "prog-emb-never:prog"]) == 0
    assert "| prog-emb-never | *prog* |" in (study / "r" / "results.md").read_text()
    assert main(["report", str(study), "--compare", "prog-emb-never"]) == 2
    assert "must be two different arms as ARM:OTHER" in capsys.readouterr().err
