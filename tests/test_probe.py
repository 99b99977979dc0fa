"""The per-block probe (the paper's Figure 1): the runs it builds, what it collects, its CLI.

A stub runner stands in for training (its score rises with the block index); one slow test probes
a single block of the real minilm-l6 on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from progtuning.runs.cli import _PROBE_OPTIONS, _split_own_options
from progtuning.runs.config import TrainConfig, load_config
from progtuning.errors import ProgtuningError
from progtuning.runs.probe import probe_specs, run_probe
from progtuning.runs.sweep_grid import RunSpec

REPO = Path(__file__).resolve().parent.parent


def stub_runner(calls: list | None = None):
    def run(spec: RunSpec, log_path: Path) -> dict:
        if calls is not None:
            calls.append(spec.name)
        config = spec.config
        block = config["stage_blocks"][0][0] if config["progtuning"] else None
        score = 0.9 if block is None else 0.6 + 0.05 * block + 0.001 * config["seed"]
        trainable = 1000 + (100 if block is not None else 600)
        results = {
            "config": config,
            "seed": config["seed"],
            "main_metric": "accuracy",
            "validation_score": score,
            "test_score": score - 0.01,
            "train_time_s": 10.0,
            "stages": [{"stage": 0, "start_step": 0, "end_step": 3, "trainable_params": trainable}],
        }
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        (spec.run_dir / "results.json").write_text(json.dumps(results))
        return results

    return run


def test_probe_specs_train_embeddings_plus_one_block(tmp_path):
    config = TrainConfig(task="rotten-tomatoes", model="minilm-l6", epochs=2, stages=2, seed=7, embeddings="always")
    specs = probe_specs(config, tmp_path, num_blocks=6, seeds=[0, 1])
    assert len(specs) == (6 + 1) * 2
    block3 = next(s for s in specs if s.name == "block3/seed1")
    assert block3.run_dir == tmp_path / "block3" / "seed1"
    assert block3.config["progtuning"] is True and block3.config["stage_blocks"] == [[3]]
    assert block3.config["embeddings"] == "always" and block3.config["stages"] is None
    assert block3.config["seed"] == 1 and block3.config["epochs"] == 2
    full = next(s for s in specs if s.name == "full/seed0")
    assert full.config["progtuning"] is False
    # every spec is a valid train config
    for spec in specs:
        load_config(None, spec.config)
    # the built schedule is one stage with that one block, embeddings on
    from progtuning.runs.train import build_schedule

    schedule = build_schedule(load_config(None, block3.config), 6)
    assert [(s.blocks, s.train_embeddings) for s in schedule.stages] == [((3,), True)]


def test_probe_specs_choose_blocks_and_check_them(tmp_path):
    config = TrainConfig()
    specs = probe_specs(config, tmp_path, num_blocks=6, blocks=[0, 5], full=False)
    assert [s.name for s in specs] == ["block0/seed0", "block5/seed0"]
    with pytest.raises(ProgtuningError, match="blocks 0..5"):
        probe_specs(config, tmp_path, num_blocks=6, blocks=[6])


def test_run_probe_collects_scores_per_block_and_plots(tmp_path):
    calls: list[str] = []
    lines: list[str] = []
    config = TrainConfig(task="trec6", model="minilm-l6", max_train_examples=100)
    summary = run_probe(config, out_dir=tmp_path, seeds=[0, 1, 2], runner=stub_runner(calls), num_blocks=4,
                        echo=lines.append)
    assert len(calls) == (4 + 1) * 3
    assert [r["block"] for r in summary["blocks"]] == [0, 1, 2, 3]
    block2 = summary["blocks"][2]
    assert block2["validation"] == pytest.approx([0.70, 0.701, 0.702])
    assert block2["validation_median"] == pytest.approx(0.701)
    assert (block2["validation_min"], block2["validation_max"]) == pytest.approx((0.70, 0.702))
    assert block2["test_median"] == pytest.approx(0.691)
    assert block2["trainable_params"] == 1100
    assert summary["full"]["validation_median"] == pytest.approx(0.9)
    assert summary["best_block"] == 3
    assert summary["spearman_block_vs_score"] == pytest.approx(1.0)
    assert summary["metric"] == "accuracy" and summary["failed"] == []
    on_disk = json.loads((tmp_path / "probe.json").read_text())
    assert on_disk["blocks"][2]["validation_median"] == pytest.approx(0.701)
    png = tmp_path / "probe.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    assert any("best block: 3" in line for line in lines)
    # a second call runs nothing new
    calls.clear()
    run_probe(config, out_dir=tmp_path, seeds=[0, 1, 2], runner=stub_runner(calls), num_blocks=4, echo=lines.append)
    assert calls == []


def test_probe_command_line_splits_its_own_options_from_train_overrides():
    own, rest = _split_own_options(
        ["cfg.yaml", "--seeds", "0,1", "--seed", "3", "--epochs", "1", "--no-full", "--out=x", "--parallel", "2"],
        _PROBE_OPTIONS,
    )
    assert own == ["cfg.yaml", "--seeds", "0,1", "--no-full", "--out=x", "--parallel", "2"]
    assert rest == ["--seed", "3", "--epochs", "1"]
    own, rest = _split_own_options(["--task", "trec6", "--blocks", "5"], _PROBE_OPTIONS)
    assert own == ["--blocks", "5"] and rest == ["--task", "trec6"]
    # train has no options of its own: everything after CONFIG is an override
    assert _split_own_options(["cfg.yaml", "--blocks", "5"], {}) == (["cfg.yaml"], ["--blocks", "5"])


def test_shipped_probe_configs_load():
    paths = sorted((REPO / "configs" / "probe").glob("*.yaml"))
    assert paths
    for path in paths:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# progtuning probe ") and str(path.relative_to(REPO)) in first
        load_config(path)


@pytest.mark.slow
def test_real_probe_of_one_block_on_a_tiny_budget(tmp_path, capsys):
    from progtuning.runs.cli import main

    code = main([
        "probe", "--task", "rotten-tomatoes", "--model", "minilm-l6", "--blocks", "5", "--no-full",
        "--out", str(tmp_path), "--max-train-examples", "16", "--max-eval-examples", "16", "--max-length", "16",
        "--epochs", "1", "--batch-size", "8", "--threads", "1", "--no-save-model", "--no-save-checkpoints",
    ])
    assert code == 0, capsys.readouterr()
    summary = json.loads((tmp_path / "probe.json").read_text())
    assert [r["block"] for r in summary["blocks"]] == [5] and summary["full"] is None
    results = json.loads((tmp_path / "block5" / "seed0" / "results.json").read_text())
    assert [s["blocks"] for s in results["stages"]] == [[5]]
    # embeddings + block 5 + head of all-MiniLM-L6-v2 (pooler included in the head)
    assert results["stages"][0]["trainable_params"] == 11_918_592 + 1_774_464 + results["accounting"]["head_params"]
    assert (tmp_path / "probe.png").stat().st_size > 1000
