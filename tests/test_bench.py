"""``progtuning bench``: the FLOP model, the case plan, and one tiny run's JSON (no timing asserts)."""

from __future__ import annotations

import argparse
import json

import pytest

from progtuning.errors import ProgtuningError
from progtuning.runs.bench import main, run_bench
from progtuning.runs.bench_config import BenchConfig, add_arguments, config_from_args
from progtuning.runs.bench_flops import flop_units, plan_variants
from progtuning.runs.bench_format import format_results


def schedule_flop(config: BenchConfig, name: str) -> float:
    variant = next(v for v in plan_variants(config) if v.name == name)
    full = flop_units(config.layers, 0, True)
    return (sum(variant.flop) + sum(variant.flop_build)) / (config.stages * full)


def test_flop_model_reproduces_the_planned_ratios():
    config = BenchConfig(layers=12, stages=4)
    assert schedule_flop(config, "prog-always") == pytest.approx(0.875)
    assert schedule_flop(config, "prog-never") == pytest.approx(0.75)
    assert schedule_flop(config, "prog-first_stage") == pytest.approx(0.75)  # the embeddings' own cost is not modelled
    assert schedule_flop(config, "prog-first_stage+cache") == pytest.approx(0.6875)
    variant = next(v for v in plan_variants(config) if v.name == "prog-first_stage+cache")
    assert sum(variant.flop) / 144 == pytest.approx(0.625)  # steps only
    assert [b.to if b else None for b in variant.builds] == [None, 3, 6, 9]
    assert [b.start if b else None for b in variant.builds] == [None, None, 3, 6]  # incremental


def test_identical_configurations_are_measured_once():
    variants = {v.name: v for v in plan_variants(BenchConfig(layers=12, stages=4))}
    assert variants["prog-always"].stages[0] == variants["full"].stages[0]
    assert variants["prog-first_stage"].stages[1:] == variants["prog-never"].stages[1:]
    assert variants["prog-never/dropout-on"].stages[1].eval_frozen is False


def test_bad_shapes_are_refused():
    with pytest.raises(ProgtuningError, match="--stages"):
        run_bench(BenchConfig(layers=2, stages=4))
    with pytest.raises(ProgtuningError, match="multiple of --heads"):
        run_bench(BenchConfig(hidden=30, heads=4))


def test_tiny_bench_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        ["--hidden", "32", "--layers", "4", "--heads", "2", "--intermediate", "64", "--vocab", "100", "--seq", "8",
         "--batch", "4", "--stages", "2", "--rounds", "1", "--steps", "1", "--memory-batch", "4",
         "--overhead-steps", "2", "--json", str(out)]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["variants"]) == {
        "full", "prog-always", "prog-first_stage", "prog-never", "prog-never/dropout-on",
        "prog-first_stage+cache", "prog-never+cache", "lora", "lora+prog", "lora+prog+cache",
    }
    for name, variant in results["variants"].items():
        assert len(variant["stages"]) == 2
        assert {"schedule_ratio", "schedule_ratio_steps_only", "schedule_flop_ratio"} <= set(variant)
        for stage in variant["stages"]:
            assert {"step_s", "ratio", "flop_ratio", "peak_mb", "memory_ratio", "activations_mb"} <= set(stage)
    assert results["variants"]["full"]["schedule_ratio"] == 1.0
    cached = results["variants"]["prog-never+cache"]["stages"][1]
    assert cached["cached"] and cached["build_s"] is not None and cached["build"] == "base build E->2"
    assert "schedule_ratio_vs_lora" in results["variants"]["lora+prog"]
    assert set(results["callback_overhead"]) >= {"plain_trainer_step_s", "callback_trainer_step_s", "ratio"}
    assert "targets" not in results
    # frozen prefix saves nothing for backward: fewer saved tensors than full fine-tuning
    never = results["variants"]["prog-never"]["stages"]
    full = results["variants"]["full"]["stages"]
    assert never[1]["saved_tensors"] < full[1]["saved_tensors"]
    assert never[1]["optimizer_state_mb"] < full[1]["optimizer_state_mb"]
    text = capsys.readouterr().out
    # what a user can act on: each option of progtuning train against full fine-tuning, no internal targets
    assert "a whole run of T equal epochs against full fine-tuning" in text and "--embeddings never --cache-frozen" in text
    saved = round((1 - results["variants"]["prog-never"]["schedule_ratio"]) * 100)
    assert any(line.strip().startswith("--embeddings never ") and f"{saved}%" in line for line in text.splitlines())
    assert "ProgtuningCallback itself" in text
    assert not any(word in text for word in ("[met]", "NOT met", "<=", "target"))
    assert format_results(results).splitlines()[0].startswith("bert, hidden 32")


def test_command_line_reads_comma_separated_policies_and_optional_numbers():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--policies", "always,never", "--vocab", "500", "--layers", "6"]))
    assert config.policies == ("always", "never")
    assert config.vocab == 500 and config.layers == 6
    config.validate()
    assert config_from_args(parser.parse_args([])).policies == ("always", "first_stage", "never")
