"""Sweeps: the grid expands to the right runs and folders, finished runs are skipped, failures are
logged and the sweep goes on. A stub runner stands in for training; one slow test runs a real one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from progtuning.runs.config import load_config
from progtuning.errors import ProgtuningError
from progtuning.runs.sweep import run_sweep, write_run_config
from progtuning.runs.sweep_grid import RunSpec, Sweep, expand_sweep, load_sweep

REPO = Path(__file__).resolve().parent.parent


def _sweep(tmp_path, **extra) -> dict:
    data = {
        "output_dir": str(tmp_path / "sweep"),
        "parallel": 2,
        # the paper's reading pinned (as the study's sweeps do), so "prog" is the paper's schedule
        "base": {"model": "minilm-l6", "epochs": 3, "max_length": 64, "threads": 1, "learning_rate": 5e-5,
                 "preset": "paper"},
        "grid": {
            "task": ["rotten-tomatoes", "trec6"],
            "method": ["full", "lora"],
            "progtuning": [False, True],
            "seed": [0, 1, 2],
        },
        "tasks": {"trec6": {"max_length": 32}},
        "methods": {"lora": {"learning_rate": 1e-3}},
    }
    data.update(extra)
    return data


def fake_runner(calls: list | None = None, fail: set[str] = frozenset()):
    """Writes a results.json like train does (the score encodes the seed), or fails on demand."""

    def run(spec: RunSpec, log_path: Path) -> dict:
        if calls is not None:
            calls.append(spec.name)
        if spec.name in fail:
            raise RuntimeError("exit code 1: error: boom")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        results = {
            "config": spec.config,
            "main_metric": "accuracy",
            "validation_score": 0.5 + spec.config["seed"] / 10,
            "test_score": 0.4,
            "reduction": 0.15 if spec.config["progtuning"] else 0.0,
        }
        (spec.run_dir / "results.json").write_text(json.dumps(results))
        log_path.write_text("log of " + spec.name)
        return results

    return run


def test_grid_expands_to_one_run_per_combination_in_its_own_folder(tmp_path):
    sweep = expand_sweep(_sweep(tmp_path))
    assert len(sweep.runs) == 2 * 2 * 2 * 3
    names = [r.name for r in sweep.runs]
    assert len(set(names)) == len(names)
    # order: seed → task → method → base then prog, so twins run side by side
    assert names[:4] == [
        "rotten-tomatoes/full/base/seed0",
        "rotten-tomatoes/full/prog/seed0",
        "rotten-tomatoes/lora/base/seed0",
        "rotten-tomatoes/lora/prog/seed0",
    ]
    assert names[-1] == "trec6/lora/prog/seed2"
    run = next(r for r in sweep.runs if r.name == "trec6/lora/prog/seed1")
    assert run.run_dir == tmp_path / "sweep" / "trec6" / "lora" / "prog" / "seed1"
    assert run.config["output_dir"] == str(run.run_dir) and run.config["overwrite"] is True
    # precedence: base < tasks < methods < grid values
    assert run.config["max_length"] == 32 and run.config["learning_rate"] == 1e-3
    assert run.config["seed"] == 1 and run.config["progtuning"] is True and run.config["threads"] == 1
    full = next(r for r in sweep.runs if r.name == "rotten-tomatoes/full/base/seed0")
    assert full.config["max_length"] == 64 and full.config["learning_rate"] == 5e-5
    assert full.config["progtuning"] is False


def test_variants_add_progtuning_runs_and_models_add_a_folder_level(tmp_path):
    data = _sweep(tmp_path, variants={"emb-first": {"embeddings": "first_stage"}})
    data["grid"]["model"] = ["minilm-l6", "minilm-l3"]
    data["models"] = {"minilm-l3": {"epochs": 4}}
    sweep = expand_sweep(data)
    assert len(sweep.runs) == 2 * 2 * 2 * 3 * 3  # model × task × method × seed × {base, prog, prog-emb-first}
    variant = next(r for r in sweep.runs if r.name == "minilm-l3/trec6/full/prog-emb-first/seed0")
    assert variant.config["embeddings"] == "first_stage" and variant.config["epochs"] == 4
    assert variant.run_dir == tmp_path / "sweep" / "minilm-l3" / "trec6" / "full" / "prog-emb-first" / "seed0"
    assert next(r for r in sweep.runs if r.name.endswith("trec6/full/base/seed0")).config["embeddings"] == "always"


def test_study_arms_baseline_variants_compute_matched_epochs_and_the_baseline_each_arm_is_compared_with(tmp_path):
    from progtuning.runs.results import run_mode

    variants = {
        "frozen-emb": {"baseline": True, "stages": 1, "embeddings": "never"},
        "emb-never": {"embeddings": "never", "compare_with": "frozen-emb"},
        "matched": {"epochs": 5, "stages": 3},
        "rewarm": {"lr_schedule": "per_stage"},
    }
    sweep = expand_sweep(_sweep(tmp_path, variants=variants))
    runs = {r.name: r for r in sweep.runs if r.name.startswith("trec6/lora/") and r.name.endswith("seed1")}
    # run order: base, prog, then the variants as declared
    assert list(runs) == [f"trec6/lora/{m}/seed1" for m in
                          ("base", "prog", "base-frozen-emb", "prog-emb-never", "prog-matched", "prog-rewarm")]
    modes = {name.split("/")[2]: run_mode(r.config) for name, r in runs.items()}
    assert {k: (m["label"], m["baseline"], m["compared_with"]) for k, m in modes.items()} == {
        "base": ("base", True, None),
        "base-frozen-emb": ("base-frozen-emb", True, "base"),  # a cheap baseline, shown against the plain one
        "prog": ("prog", False, "base"),
        "prog-emb-never": ("prog-emb-never", False, "base-frozen-emb"),
        "prog-matched": ("prog-matched", False, "base"),
        "prog-rewarm": ("prog-rewarm", False, "base"),
    }
    frozen = runs["trec6/lora/base-frozen-emb/seed1"].config
    assert frozen["progtuning"] is True and frozen["stages"] == 1 and frozen["embeddings"] == "never"
    assert runs["trec6/lora/base-frozen-emb/seed1"].run_dir == tmp_path / "sweep/trec6/lora/base-frozen-emb/seed1"
    matched = runs["trec6/lora/prog-matched/seed1"].config
    assert (matched["epochs"], matched["stages"]) == (5, 3)
    assert runs["trec6/lora/base/seed1"].config["epochs"] == 3  # the baseline keeps the sweep's epochs
    assert runs["trec6/lora/prog-rewarm/seed1"].config["lr_schedule"] == "per_stage"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "unknown sweep key"),
        ({"grid": {"learning_rate": [1e-3]}}, "not supported"),
        ({"grid": {"task": []}}, "non-empty list"),
        ({"variants": {"lr": {"learning_rate": 1.0}}}, "schedule and training length only"),
        ({"variants": {"a b": {"embeddings": "never"}}}, "folder name"),
        ({"variants": {"x": {"embeddings": "never", "compare_with": "nowhere"}}}, "not a baseline variant"),
        ({"variants": {"b": {"baseline": True, "stages": 1}, "c": {"baseline": True, "compare_with": "b"}}},
         "is a baseline"),
        ({"variants": {"x": {"lr_schedule": "cosine"}}}, "lr_schedule"),
        ({"base": {"output_dir": "x"}}, "sweep chooses"),
        ({"methods": {"lora": {"lora_rank": 4}}}, "sweep run .*lora.*unknown config key"),
        ({"grid": {"method": ["fancy"]}}, "unknown method"),
        ({"parallel": 0}, "at least 1"),
    ],
)
def test_mistakes_fail_before_anything_runs(tmp_path, change, message):
    data = _sweep(tmp_path)
    data.update(change)
    with pytest.raises(ProgtuningError, match=message):
        expand_sweep(data)
    assert not (tmp_path / "sweep").exists()


def test_finished_runs_are_skipped_and_a_killed_sweep_continues(tmp_path):
    sweep = expand_sweep(_sweep(tmp_path))
    calls: list[str] = []
    lines: list[str] = []
    # first sweep "killed" after 5 runs: simulate by running only a prefix
    partial = Sweep(sweep.output_dir, 1, sweep.runs[:5], sweep.source)
    run_sweep(partial, runner=fake_runner(calls), echo=lines.append)
    assert calls == [r.name for r in sweep.runs[:5]]
    calls.clear()
    lines.clear()
    outcomes = run_sweep(sweep, runner=fake_runner(calls), echo=lines.append)
    assert sorted(calls) == sorted(r.name for r in sweep.runs[5:])  # the finished five are not run again
    assert sum(o.skipped for o in outcomes) == 5 and all(o.ok for o in outcomes)
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 19 and progress[-1].startswith("[24/24]")
    assert "accuracy val" in progress[0] and "eta" in progress[0]
    # each run keeps its config and log
    run_dir = sweep.runs[7].run_dir
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").read_text() == "log of " + sweep.runs[7].name
    # and a third invocation has nothing to do
    calls.clear()
    run_sweep(sweep, runner=fake_runner(calls), echo=lines.append)
    assert calls == []


def test_an_arm_to_train_after_its_baseline_finished_is_noted(tmp_path):
    variants = {"t2": {"stages": 2, "stage_unit": "fraction"},
                "frozen-emb": {"baseline": True, "stages": 1, "embeddings": "never"},
                "emb-never": {"embeddings": "never", "compare_with": "frozen-emb"}}
    sweep = expand_sweep(_sweep(tmp_path, grid={"task": ["trec6"], "method": ["full"], "progtuning": [False, True],
                                                "seed": [0]}, variants=variants))
    lines: list[str] = []
    first = Sweep(sweep.output_dir, 2, [r for r in sweep.runs if r.name.split("/")[2] in ("base", "prog")], sweep.source)
    run_sweep(first, runner=fake_runner(), echo=lines.append)
    assert not [line for line in lines if line.startswith("note:")]  # each arm beside its baseline
    lines.clear()
    run_sweep(sweep, runner=fake_runner(), echo=lines.append)
    # prog-t2 will pair with a base from the first sitting; base-frozen-emb is a baseline itself, and
    # prog-emb-never's baseline (base-frozen-emb) trains in this sitting too
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == [
        "note: 1 of the runs to train will be timed against a baseline that already finished (e.g. "
        "trec6/full/prog-t2/seed0 with base/seed0): their time ratios will pair two sittings; for a fair one, "
        "train both again side by side (--output-dir NEW --only ...)"
    ]


def test_an_edited_yaml_is_not_met_by_runs_finished_with_the_old_settings(tmp_path):
    data = _sweep(tmp_path)
    run_sweep(expand_sweep(data), runner=fake_runner(), echo=lambda line: None)
    data["methods"]["lora"]["learning_rate"] = 5e-4
    calls: list[str] = []
    with pytest.raises(ProgtuningError) as error:
        run_sweep(expand_sweep(data), runner=fake_runner(calls), echo=lambda line: None)
    message = str(error.value)
    assert "\n" not in message and "run rotten-tomatoes/lora/base/seed0 finished with other settings" in message
    assert "learning_rate: 0.001 -> 0.0005" in message and "(and 11 more runs)" in message and "delete" in message
    assert calls == []  # refused before anything ran


def test_a_second_sweep_in_the_same_folder_reuses_the_runs_it_shares(tmp_path):
    # the study: plain and Progtuning runs on two tasks
    study = _sweep(tmp_path, grid={"task": ["rotten-tomatoes", "trec6"], "method": ["full"],
                                   "progtuning": [False, True], "seed": [0]})
    study_yaml = tmp_path / "study.yaml"
    study_yaml.write_text(yaml.safe_dump(study))
    run_sweep(load_sweep(study_yaml), runner=fake_runner(), echo=lambda line: None)
    # ablations on one task, into the same folder: base and prog are the study's, setting for setting
    ablations = _sweep(tmp_path, grid={"task": ["trec6"], "method": ["full"], "progtuning": [False, True],
                                       "seed": [0]}, variants={"t2": {"stages": 2, "stage_unit": "fraction"}})
    ablations_yaml = tmp_path / "ablations.yaml"
    ablations_yaml.write_text(yaml.safe_dump(ablations))
    calls: list[str] = []
    run_sweep(load_sweep(ablations_yaml), runner=fake_runner(calls), echo=lambda line: None)
    assert calls == ["trec6/full/prog-t2/seed0"]
    kept = sorted(p.name for p in (tmp_path / "sweep" / "_sweep").glob("*.yaml"))
    assert kept == ["ablations.yaml", "study.yaml"]  # each sweep's YAML, neither overwriting the other


def test_only_runs_the_runs_a_pattern_names(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path)))
    sweep = load_sweep(path, only=["trec6/lora/prog/seed1", "rotten-tomatoes/*/base/seed2"])
    # in run order (seed first), whatever the order of the patterns
    assert [r.name for r in sweep.runs] == [
        "trec6/lora/prog/seed1", "rotten-tomatoes/full/base/seed2", "rotten-tomatoes/lora/base/seed2",
    ]
    with pytest.raises(ProgtuningError, match=r"^--only 'trec6/full/prog/seed7' matches no run of .*: run names look like"):
        load_sweep(path, only=["trec6/full/prog/seed7"])


def test_a_failed_run_is_logged_and_the_sweep_goes_on(tmp_path):
    sweep = expand_sweep(_sweep(tmp_path))
    bad = "trec6/full/prog/seed0"
    lines: list[str] = []
    outcomes = run_sweep(sweep, runner=fake_runner(fail={bad}), echo=lines.append)
    failed = [o for o in outcomes if not o.ok]
    assert [o.spec.name for o in failed] == [bad]
    assert sum(o.ok for o in outcomes) == 23
    assert any("FAILED" in line and bad in line and "boom" in line for line in lines)
    assert "1 failed" in lines[-1] and "retry" in lines[-1]
    status = [json.loads(line) for line in (sweep.output_dir / "_sweep" / "status.jsonl").read_text().splitlines()]
    assert len(status) == 24 and [s["run"] for s in status if not s["ok"]] == [bad]
    # the next invocation retries only the failed run
    calls: list[str] = []
    run_sweep(sweep, runner=fake_runner(calls), echo=lines.append)
    assert calls == [bad]


def test_an_interrupted_sweep_starts_nothing_new_and_resumes_later(tmp_path):
    sweep = expand_sweep(_sweep(tmp_path, parallel=1))
    calls: list[str] = []
    inner = fake_runner(calls)

    def interrupted(spec, log_path):
        if len(calls) == 2:
            calls.append(spec.name)
            raise KeyboardInterrupt
        return inner(spec, log_path)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, runner=interrupted, echo=lambda line: None)
    assert len(calls) == 3  # two finished, the third interrupted, none of the other 21 started
    calls.clear()
    outcomes = run_sweep(sweep, runner=fake_runner(calls), echo=lambda line: None)
    assert len(calls) == 22 and sum(o.skipped for o in outcomes) == 2


def test_dry_run_lists_without_running(tmp_path):
    sweep = expand_sweep(_sweep(tmp_path))
    lines: list[str] = []
    assert run_sweep(sweep, runner=fake_runner(fail={r.name for r in sweep.runs}), dry_run=True, echo=lines.append) == []
    assert lines[0] == "todo  rotten-tomatoes/full/base/seed0"
    assert "24 runs: 0 finished, 24 to run" in lines[-1]
    assert not (sweep.output_dir / "_sweep").exists()


def test_two_sweeps_never_share_a_folder(tmp_path):
    import fcntl

    sweep = expand_sweep(_sweep(tmp_path))
    state = sweep.output_dir / "_sweep"
    state.mkdir(parents=True)
    with open(state / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # flock locks belong to open file descriptions: a second open() in this process conflicts too
        with pytest.raises(ProgtuningError, match="another sweep is running"):
            run_sweep(sweep, runner=fake_runner(), echo=lambda line: None)


def test_run_config_file_is_a_valid_train_config(tmp_path):
    spec = expand_sweep(_sweep(tmp_path)).runs[3]
    path = tmp_path / "run.yaml"
    write_run_config(spec, path)
    text = path.read_text()
    assert text.startswith(f"# progtuning train {spec.run_dir / 'config.yaml'}\n")
    config = load_config(path)
    assert config.method == "lora" and config.progtuning and config.output_dir == str(spec.run_dir)


def test_shipped_sweep_configs_expand(tmp_path):
    for path in sorted((REPO / "configs" / "sweep").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# progtuning sweep ") and str(path.relative_to(REPO)) in first, path
        sweep = load_sweep(path, output_dir=str(tmp_path / path.stem))
        assert sweep.runs and len({r.name for r in sweep.runs}) == len(sweep.runs)
        assert yaml.safe_load(path.read_text())["grid"]


def test_sweep_cli_dry_run(tmp_path, capsys):
    from progtuning.runs.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path)))
    assert main(["sweep", str(path), "--dry-run", "--output-dir", str(tmp_path / "other")]) == 0
    out = capsys.readouterr().out
    assert "24 runs: 0 finished" in out and str(tmp_path / "other") in out


@pytest.mark.slow
def test_a_real_tiny_sweep_run_in_a_subprocess(tmp_path):
    data = {
        "output_dir": str(tmp_path / "sweep"),
        "base": {"model": "minilm-l6", "max_train_examples": 16, "max_eval_examples": 16, "max_length": 16,
                 "epochs": 1, "batch_size": 8, "threads": 1, "save_model": False, "save_checkpoints": False},
        "grid": {"task": ["rotten-tomatoes"], "method": ["bitfit"], "progtuning": [True], "seed": [0]},
    }
    sweep = expand_sweep(data)
    lines: list[str] = []
    outcomes = run_sweep(sweep, echo=lines.append)
    assert [o.ok for o in outcomes] == [True], (outcomes[0].error, lines)
    run_dir = sweep.runs[0].run_dir
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["method"] == "bitfit" and results["task"]["sizes"]["train"] == 16
    assert (run_dir / "config.yaml").is_file() and "-m progtuning train" in (run_dir / "train.log").read_text()
    assert not (run_dir / "model").exists()
    lines.clear()
    outcomes = run_sweep(sweep, echo=lines.append)
    assert [o.skipped for o in outcomes] == [True]
