"""Sweep reports: numbers checked against hand-computed values from tests/fixtures/results/.

The fixtures are a small sweep tree of hand-written results.json files (model "tiny"):

* rotten-tomatoes/full: baseline test 0.80, 0.70, 0.75 (seeds 0–2) → median 0.75 [0.70–0.80];
  Progtuning 0.78, 0.76, 0.72 → median 0.76 [0.72–0.78]; Δ +0.01; paired by seed Progtuning ≥
  baseline only in seed 1 → 1/3; training times 100/110/120 s and 80/90/99 s → median paired ratio
  0.8182 (90/110); peak RSS
  medians 1100 and 950 MiB; updated parameters 900 → 750, reduction 1 − 750/900 = 16.7% (the
  runs record 15%: the table's reduction is the one its counts give, against the baseline it names).
* trec6/lora: baseline 0.90, 0.80 → median 0.85; Progtuning 0.82, 0.84 → 0.83, Δ −0.02, 1/2;
  variant prog-emb-first (seed 0 only) 0.88 → Δ +0.03, 0/1.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from progtuning.errors import ProgtuningError
from progtuning.runs.report import REPORT_BEGIN, REPORT_END, build_report, load_runs, summarize_runs
from progtuning.runs.results import mode_of_legacy_run as run_mode

FIXTURES = Path(__file__).parent / "fixtures" / "results"


def _row(rows, task, method, mode):
    return next(r for r in rows if (r["task"], r["method"], r["mode"]) == (task, method, mode))


def test_load_runs_finds_every_results_file_and_its_mode():
    runs = load_runs([FIXTURES])
    assert len(runs) == 11
    modes = {(r.task, r.method, r.mode) for r in runs}
    assert modes == {
        ("rotten-tomatoes", "full", "base"),
        ("rotten-tomatoes", "full", "prog"),
        ("trec6", "lora", "base"),
        ("trec6", "lora", "prog"),
        ("trec6", "lora", "prog-emb-first"),
    }
    # the same file given twice (folder and file) counts once
    again = load_runs([FIXTURES, FIXTURES / "trec6/lora/base/seed0/results.json"])
    assert len(again) == 11


def test_run_mode_outside_a_sweep_comes_from_the_config(tmp_path):
    assert run_mode(tmp_path / "x" / "results.json", {"progtuning": False}) == "base"
    assert run_mode(tmp_path / "x" / "results.json", {"progtuning": True}) == "prog"
    assert run_mode(tmp_path / "x" / "results.json", {"progtuning": True, "embeddings": "first_stage"}) == "prog-emb-first_stage"
    assert run_mode(tmp_path / "prog-t4" / "seed0" / "results.json", {"progtuning": True}) == "prog-t4"


def test_summary_numbers_match_hand_computed_values():
    rows = summarize_runs(load_runs([FIXTURES]), split="test")
    assert len(rows) == 3
    full = _row(rows, "rotten-tomatoes", "full", "prog")
    assert full["base_median"] == pytest.approx(0.75)
    assert (full["base_min"], full["base_max"]) == pytest.approx((0.70, 0.80))
    assert full["prog_median"] == pytest.approx(0.76)
    assert (full["prog_min"], full["prog_max"]) == pytest.approx((0.72, 0.78))
    assert full["diff"] == pytest.approx(0.01)
    assert (full["prog_wins"], full["pairs"]) == (1, 3)
    assert (full["n_base"], full["n_prog"]) == (3, 3)
    assert full["base_updated_params"] == 900 and full["prog_updated_params"] == 750
    assert full["reduction"] == pytest.approx(1 - 750 / 900)
    assert full["reduction_blocks_only"] == pytest.approx(0.333)
    assert full["time_ratio"] == pytest.approx(90 / 110)
    assert full["base_peak_rss_mb"] == 1100 and full["prog_peak_rss_mb"] == 950
    assert full["mixed_settings"] == ""

    lora = _row(rows, "trec6", "lora", "prog")
    assert lora["base_median"] == pytest.approx(0.85)
    assert lora["prog_median"] == pytest.approx(0.83)
    assert lora["diff"] == pytest.approx(-0.02)
    assert (lora["prog_wins"], lora["pairs"]) == (1, 2)
    assert lora["time_ratio"] == pytest.approx((40 / 50 + 50 / 70) / 2)  # median of the paired ratios, not 45/60

    variant = _row(rows, "trec6", "lora", "prog-emb-first")
    assert variant["base_median"] == pytest.approx(0.85)  # the same baseline as plain prog
    assert variant["prog_median"] == pytest.approx(0.88)
    assert variant["diff"] == pytest.approx(0.03)
    assert (variant["prog_wins"], variant["pairs"]) == (0, 1)
    assert variant["reduction"] == pytest.approx(1 - 20 / 30)  # from the counts (the run records 0.3)


def test_validation_split_is_used_when_asked():
    rows = summarize_runs(load_runs([FIXTURES]), split="validation")
    full = _row(rows, "rotten-tomatoes", "full", "prog")
    assert full["base_median"] == pytest.approx(0.74)  # 0.81, 0.72, 0.74
    assert full["prog_median"] == pytest.approx(0.75)  # 0.79, 0.75, 0.70
    assert full["diff"] == pytest.approx(0.01)


def test_build_report_writes_tables_csv_and_plots(tmp_path):
    written = build_report([FIXTURES], tmp_path / "out")
    out = tmp_path / "out"
    for name in ("results.md", "results.csv", "runs.csv", "metric_vs_params.png", "bars.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    timelines = sorted((out / "timelines").glob("*.png"))
    assert [p.name for p in timelines] == ["tiny_rotten-tomatoes_full.png", "tiny_trec6_lora.png"]
    assert all(p.stat().st_size > 1000 for p in timelines)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in [out / "bars.png", *timelines])

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    full = next(r for r in table if r["task"] == "rotten-tomatoes")
    assert float(full["base_median"]) == pytest.approx(0.75)
    assert float(full["diff"]) == pytest.approx(0.01)
    assert float(full["time_ratio"]) == pytest.approx(90 / 110)
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 11

    md = (out / "results.md").read_text()
    assert "| tiny | rotten-tomatoes | full | prog | accuracy | 0.7500 [0.7000–0.8000] | 0.7600 [0.7200–0.7800] | +0.0100 | 1/3 |" in md
    assert "| 900 → 750 | 16.7% / 33.3% | 0.82 | 1,100 / 950 | 3+3 |" in md
    assert "| tiny | trec6 | lora | prog | accuracy | 0.8500 [0.8000–0.9000] | 0.8300 [0.8200–0.8400] | -0.0200 | 1/2 |" in md
    # the loss is named, not hidden
    assert "Where Progtuning lost" in md and "tiny/trec6/lora -0.0200" in md
    # setup is read back from the configs
    assert "learning rate per method: full 5e-05; lora 0.001" in md
    assert "| rotten-tomatoes | tiny | 300/200/200 | 64 | accuracy |" in md
    # images are linked relative to the Markdown file
    assert "](metric_vs_params.png)" in md and "](timelines/tiny_rotten-tomatoes_full.png)" in md
    assert written["runs"] == 11
    assert md.startswith("## Progtuning sweep results\n")


def test_markdown_between_markers_keeps_the_hand_written_text(tmp_path):
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"# Intro\nhand-written\n\n{REPORT_BEGIN}\nold numbers\n{REPORT_END}\n\n## After\nmore text\n")
    build_report([FIXTURES], tmp_path / "docs" / "results", markdown=doc, plots=True)
    text = doc.read_text()
    assert text.startswith("# Intro\nhand-written\n")
    assert "## Progtuning sweep results" not in text  # the document has its own heading
    assert text.rstrip().endswith("## After\nmore text")
    assert "old numbers" not in text
    assert "0.7500 [0.7000–0.8000]" in text
    assert "](results/bars.png)" in text  # relative to docs/, where the Markdown lives
    # twice in a row gives the same file (markers survive)
    build_report([FIXTURES], tmp_path / "docs" / "results", markdown=doc, plots=False)
    assert doc.read_text().count(REPORT_BEGIN) == 1


def test_mixed_settings_inside_a_group_are_flagged(tmp_path):
    import json
    import shutil

    shutil.copytree(FIXTURES / "trec6", tmp_path / "trec6")
    path = tmp_path / "trec6/lora/base/seed1/results.json"
    data = json.loads(path.read_text())
    data["config"]["epochs"] = 4
    path.write_text(json.dumps(data))
    rows = summarize_runs(load_runs([tmp_path]))
    assert _row(rows, "trec6", "lora", "prog")["mixed_settings"] == "epochs"


def test_a_group_with_only_one_side_has_no_difference(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "rotten-tomatoes/full/base", tmp_path / "rt/full/base")
    rows = summarize_runs(load_runs([tmp_path]))
    assert len(rows) == 1 and rows[0]["diff"] is None and rows[0]["prog_median"] is None
    written = build_report([tmp_path], tmp_path / "out")
    assert "No group has both" in written["markdown"].read_text()


def test_nothing_to_report_is_a_user_error(tmp_path):
    with pytest.raises(ProgtuningError, match="no results.json"):
        build_report([tmp_path], tmp_path / "out")
    with pytest.raises(ProgtuningError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "out")


def test_report_cli(tmp_path, capsys):
    from progtuning.runs.cli import main

    assert main(["report", str(FIXTURES), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    assert "11 runs, 3 table rows, 0 probe(s)" in capsys.readouterr().out
    assert (tmp_path / "r" / "results.md").is_file()
    assert not (tmp_path / "r" / "bars.png").exists()
    assert main(["report", str(FIXTURES), "--out", str(tmp_path / "t"), "--no-plots", "--tasks", "trec6",
                 "--arms", "prog"]) == 0
    assert "4 runs, 1 table rows" in capsys.readouterr().out


def test_probe_folders_are_reported_as_probes_not_as_sweep_runs(tmp_path):
    import shutil

    from test_probe import stub_runner

    from progtuning.runs.config import TrainConfig
    from progtuning.runs.probe import run_probe

    shutil.copytree(FIXTURES, tmp_path / "sweep")
    probe_dir = tmp_path / "probe" / "trec6"
    run_probe(TrainConfig(task="trec6", model="tiny", max_train_examples=100), out_dir=probe_dir, seeds=[0, 1],
              runner=stub_runner(), num_blocks=3, echo=lambda line: None)
    assert len(list(probe_dir.rglob("results.json"))) == 8

    written = build_report([tmp_path], tmp_path / "out")
    assert written["runs"] == 11 and written["probes"] == 1  # the probe's 8 runs are not sweep runs
    md = written["markdown"].read_text()
    assert "### Per-block probe: trec6 · tiny · full" in md
    # stub scores: 0.6 + 0.05 * block + 0.001 * seed, test 0.01 lower; all blocks 0.9
    assert "| block 2 | 0.7005 [0.7000–0.7010] | 0.6905 | 2 |" in md
    assert "| all blocks (no Progtuning) | 0.9000 [0.9000–0.9000] | 0.8900 | 2 |" in md
    assert "Best single block (validation median): 2." in md and "+1.00" in md
    png = tmp_path / "out" / "probe-trec6-tiny-full.png"
    assert png.is_file() and png.stat().st_size > 1000 and "](probe-trec6-tiny-full.png)" in md

    # a probe alone is a report too
    alone = build_report([probe_dir], tmp_path / "alone")
    assert alone["runs"] == 0 and "Per-block probe" in alone["markdown"].read_text()


def test_each_arm_is_compared_with_the_baseline_it_names(tmp_path):
    from progtuning.runs.results import write_json_atomic

    def write(label, seed, score, compared_with, updated, **config):
        path = tmp_path / "trec6" / "full" / label / f"seed{seed}" / "results.json"
        path.parent.mkdir(parents=True)
        mode = {"label": label, "method": "full", "baseline": label.startswith("base"), "compared_with": compared_with}
        write_json_atomic(path, {"mode": mode, "seed": seed, "config": {"method": "full", "seed": seed, **config},
                                 "task": {"name": "trec6"}, "model": {"name": "tiny"}, "main_metric": "accuracy",
                                 "test_score": score, "updated_params": updated, "reduction": 1 - updated / 1000})

    for seed in (0, 1):
        write("base", seed, 0.80, None, 1000, epochs=3)
        write("base-frozen-emb", seed, 0.70, "base", 500, epochs=3, variant_baseline=True)
        write("prog", seed, 0.78, "base", 850, epochs=3)
        write("prog-emb-never", seed, 0.72, "base-frozen-emb", 300, epochs=4.5, compare_with="base-frozen-emb")
    rows = {r["mode"]: r for r in summarize_runs(load_runs([tmp_path]))}
    assert set(rows) == {"base-frozen-emb", "prog", "prog-emb-never"}
    # arms differ from their baselines by design: only seeds of one arm that disagree are flagged
    assert not any(r["mixed_settings"] for r in rows.values())
    # each reduction against the baseline the row names, not against plain fine-tuning
    assert rows["prog-emb-never"]["reduction"] == pytest.approx(1 - 300 / 500)
    assert rows["base-frozen-emb"]["reduction"] == pytest.approx(0.5)
    assert (rows["prog"]["baseline"], rows["prog"]["diff"]) == ("base", pytest.approx(-0.02))
    assert (rows["prog-emb-never"]["baseline"], rows["prog-emb-never"]["diff"]) == ("base-frozen-emb", pytest.approx(0.02))
    assert (rows["base-frozen-emb"]["baseline"], rows["base-frozen-emb"]["diff"]) == ("base", pytest.approx(-0.10))


def test_a_report_can_show_some_tasks_and_arms_each_with_its_baseline(tmp_path):
    from progtuning.runs.report import select_runs

    runs = load_runs([FIXTURES])
    only_trec = select_runs(runs, tasks=["trec6"])
    assert {r.task for r in only_trec} == {"trec6"} and len(only_trec) == 5
    # an arm keeps the baseline it is compared with, so its rows still have a difference
    emb_first = select_runs(runs, arms=["prog-emb-first"])
    assert sorted({r.mode for r in emb_first}) == ["base", "prog-emb-first"]
    rows = summarize_runs(emb_first)
    assert [r["mode"] for r in rows if r["mode"]] == ["prog-emb-first"]
    assert _row(rows, "trec6", "lora", "prog-emb-first")["diff"] == pytest.approx(0.03)
    with pytest.raises(ProgtuningError, match=r"^no runs of arm prog-t9: the runs have base, prog, prog-emb-first$"):
        select_runs(runs, arms=["prog-t9"])
    with pytest.raises(ProgtuningError, match="no runs of task sst2: the runs have rotten-tomatoes, trec6"):
        build_report([FIXTURES], tmp_path / "out", tasks=["sst2"], plots=False)
    assert not (tmp_path / "out").exists()  # refused before writing anything
