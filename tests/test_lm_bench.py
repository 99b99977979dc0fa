"""The decoder bench (``python -m progtuning.runs.lm_bench``): one tiny run's JSON and table (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from progtuning.runs.lm_bench import main
from tiny_lm import make_tiny_lm


@pytest.mark.slow
def test_tiny_run_measures_every_stage_of_both_methods(tmp_path, capsys):
    model = make_tiny_lm(tmp_path, "llama", tie=True, chat=True)
    out = tmp_path / "bench.json"
    code = main(["--model", str(model), "--batch", "2", "--rounds", "1", "--steps", "1", "--checkpointing",
                 "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    labels = [row["label"] for row in results["cases"]]
    assert labels == [f"{m} stage {s}" for m in ("full", "lora", "full+ckpt") for s in (1, 2, 3)]
    rows = {row["label"]: row for row in results["cases"]}
    for method in ("full", "lora"):
        assert rows[f"{method} stage 1"]["time_ratio"] == 1.0 and rows[f"{method} stage 1"]["memory_ratio"] == 1.0
        params = [rows[f"{method} stage {s}"]["trainable_params"] for s in (1, 2, 3)]
        assert params[0] > params[1] > params[2]  # the trainable set shrinks stage by stage
        states = [rows[f"{method} stage {s}"]["optimizer_state_mb"] for s in (1, 2, 3)]
        assert states[0] >= states[1] >= states[2] > 0
    # LoRA trains only its matrices: its optimizer holds two moments of r x (in + out) per wrapped projection
    assert rows["lora stage 1"]["trainable_params"] == 4 * 2 * 8 * (32 + 32)
    assert results["batch_shape"][0] == 2 and results["response_tokens"] > 0
    assert "| full+ckpt stage 3 |" in capsys.readouterr().out
