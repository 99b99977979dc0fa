"""Several processes (2 CPU processes, gloo, launched with ``torchrun --standalone``) against one process.

The same global batch in one and in two processes must give the same weights (within 1e-5: only the
float summation order differs), the two ranks must hold identical weights, for a shrinking and a
growing schedule with two stage switches each, through the HF Trainer (+ ProgtuningCallback) and
through a plain DDP loop (+ DistributedFreezer), with and without gradient accumulation. The broken
baselines the library avoids are asserted too, so the measurements in ``docs/distributed.md`` stay
true. One end-to-end test runs ``progtuning train`` itself under torchrun, stops it with SIGTERM on
one rank only, resumes it, and compares with a one-process run.

The multi-process launches take 15-40 s each on 2 CPU cores: they are marked ``slow`` (still in ``make test``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from float_tolerance import adam_drift_tolerance
from tiny_run import TESTS, final_weights, make_tiny_setup, subprocess_env, train_argv

from progtuning.core.distributed import DistributedFreezer, check_trainer_parallelism, refuse_unsupported_parallelism
from progtuning.errors import ProgtuningError
from progtuning.core.schedule import no_progtuning, progressive

# 18 AdamW steps at lr 1e-3 (ddp_worker); one and two processes sum the gradients in another order
TOLERANCE = adam_drift_tolerance(steps=18, lr=1e-3)
RUNS = [
    "trainer:shrink",
    "trainer:grow",
    "trainer:grow:acc2",  # 2 processes x batch 2 x 2 accumulation steps == 1 process x batch 8
    "plain:shrink",
    "plain:grow",
    "naive:shrink",  # DDP built once, find_unused_parameters=False: fails on the step after a switch
    "naive:grow:unused:late",  # built after stage 0 froze blocks: they are never averaged, silently
]
STAGES = [[0, 0, 6], [1, 6, 12], [2, 12, 18]]  # 48 rows, global batch 8, 3 epochs: two switches

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Every run of RUNS as 2 processes with batch 4 each (one torchrun launch)."""
    out = tmp_path_factory.mktemp("ddp2")
    result = subprocess.run(
        torchrun(str(TESTS / "ddp_worker.py"), "--out", str(out), "--batch", "4", *RUNS),
        capture_output=True, text=True, timeout=600, env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The references, in this process: batch 8, so the same global batches."""
    import ddp_worker

    return {spec: ddp_worker.run(spec, batch=8) for spec in ("trainer:shrink", "trainer:grow", "plain:shrink", "plain:grow")}


def _load(folder: Path, spec: str) -> tuple[dict, dict, dict]:
    run = folder / spec.replace(":", "-")
    return (load_file(str(run / "rank0.safetensors")), load_file(str(run / "rank1.safetensors")),
            json.loads((run / "rank0.json").read_text()))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- correctness across process counts -----------------------------------------------------------
@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["trainer:shrink", "trainer:grow", "trainer:grow:acc2", "plain:shrink", "plain:grow"])
def test_two_processes_match_one_process(two_processes, one_process, spec):
    rank0, rank1, info = _load(two_processes, spec)
    reference, reference_info = one_process[spec.replace(":acc2", "")]
    assert info["world_size"] == 2 and reference_info["world_size"] == 1
    # bit-identical by construction: every rank steps with the same all-reduced gradient
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' weights differ"
    assert _max_diff(rank0, reference) < TOLERANCE
    if spec.startswith("trainer"):
        assert info["stages"] == STAGES == reference_info["stages"]
        assert info["mode"] == "ddp" and info["wrapper"] == "DistributedDataParallel"
    else:
        assert info["steps"] == 18 and info["errors"] == []
        assert info["builds"] == 3  # one wrapper per trainable set: stage 0, 1, 2


@needs_gloo
@pytest.mark.slow
def test_a_wrapper_built_once_is_wrong_without_rebuild(two_processes, one_process):
    # find_unused_parameters=False: the switch step is not averaged, the next one raises
    rank0, rank1, info = _load(two_processes, "naive:shrink")
    assert info["steps"] == 7 and "Expected to have finished reduction" in info["errors"][0]["error"]
    assert _max_diff(rank0, rank1) > 1e-5
    # wrapped after stage 0 froze blocks 0-2: growing brings them back, but they are never averaged
    rank0, rank1, info = _load(two_processes, "naive:grow:unused:late")
    assert info["errors"] == [] and info["steps"] == 18  # no error ever...
    assert _max_diff(rank0, rank1) > 1e-4  # ...yet the ranks drifted apart
    assert _max_diff(rank0, one_process["plain:grow"][0]) > 1e-4


# -- progtuning train under torchrun: stop on one rank, resume, compare --------------------------------
@needs_gloo
@pytest.mark.slow
def test_progtuning_train_under_torchrun_stops_resumes_and_matches_one_process(tmp_path):
    from progtuning.runs.cli import main

    model_dir, data_dir = make_tiny_setup(tmp_path, dropout=0.0)  # dropout masks differ per process count
    assert main(train_argv(model_dir, data_dir, tmp_path / "one")) == 0  # 1 process, batch 4
    two = tmp_path / "two"
    argv = train_argv(model_dir, data_dir, two, "--batch-size", "2")  # 2 processes, batch 2 each
    runner = str(TESTS / "crash_runner.py")
    # only rank 1 gets SIGTERM (at 0-based step 10): the ranks agree, both stop after step 11 and save it
    stopped = subprocess.run(torchrun(runner, "--crash", "step:10:TERM:1", "--", *argv),
                             capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert stopped.returncode != 0
    checkpoints = sorted(os.listdir(two / "checkpoints"))
    assert checkpoints == ["checkpoint-11", "checkpoint-8"], stopped.stderr[-3000:]
    assert {"rng_state_0.json", "rng_state_1.json", "model.safetensors", "optimizer.safetensors"} <= set(
        os.listdir(two / "checkpoints" / "checkpoint-11"))
    assert not (two / "results.json").exists()
    assert "stopped by SIGTERM at step 11 (stage 1)" in stopped.stderr

    resumed = subprocess.run(torchrun(runner, "--", *argv, "--resume"), capture_output=True, text=True,
                             timeout=600, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((two / "results.json").read_text())
    assert results["steps"] == 24
    assert _max_diff(final_weights(two), final_weights(tmp_path / "one")) < adam_drift_tolerance(steps=24, lr=1e-3)


# -- what is refused, and the no-process-group path ------------------------------------------------------
def test_distributed_freezer_without_a_process_group_is_the_plain_freezer(tiny_bert):
    runner = DistributedFreezer(tiny_bert, progressive(4, 2))
    assert runner.apply_for_step(0, 2, 4) is tiny_bert
    assert runner.apply_for_step(2, 2, 4) is tiny_bert and runner.stage_index == 1 and runner.builds == 0
    assert not tiny_bert.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    runner.close()
    other = DistributedFreezer(tiny_bert, progressive(4, 2), find_unused_parameters=True)  # kept for DDP
    assert other.ddp_kwargs == {"find_unused_parameters": True} and other.apply(0) is tiny_bert


@pytest.mark.parametrize(
    "args, env",
    [
        (SimpleNamespace(fsdp="full_shard", world_size=2), {}),
        (SimpleNamespace(fsdp=None, world_size=2), {"ACCELERATE_USE_FSDP": "true"}),
        (SimpleNamespace(deepspeed="ds.json", world_size=2), {}),
        (SimpleNamespace(world_size=2), {"ACCELERATE_USE_DEEPSPEED": "true"}),
    ],
)
def test_fsdp_and_deepspeed_are_refused_with_one_line(monkeypatch, args, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ProgtuningError, match="does not support (FSDP|DeepSpeed)") as info:
        check_trainer_parallelism(args, None, progressive(4, 2))
    assert "\n" not in str(info.value)
    with pytest.raises(ProgtuningError):
        refuse_unsupported_parallelism(args)


def test_ddp_without_unused_parameter_detection_is_refused_when_anything_freezes():
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=False)
    with pytest.raises(ProgtuningError, match="ddp_find_unused_parameters=True"):
        check_trainer_parallelism(args, None, progressive(4, 2))
    assert check_trainer_parallelism(args, None, no_progtuning(4)) == "ddp"  # nothing freezes: fine
    default = SimpleNamespace(world_size=2, ddp_find_unused_parameters=None, activation_checkpointing=False)
    assert check_trainer_parallelism(default, None, progressive(4, 2)) == "ddp"
    checkpointing = SimpleNamespace(world_size=2, ddp_find_unused_parameters=None, activation_checkpointing=True)
    with pytest.raises(ProgtuningError):  # the Trainer would turn detection off here
        check_trainer_parallelism(checkpointing, None, progressive(4, 2))
    assert check_trainer_parallelism(SimpleNamespace(world_size=1), None, progressive(4, 2)) == "single"


def test_fsdp_in_the_launcher_environment_stops_progtuning_train_before_loading(monkeypatch, tmp_path, capsys):
    from progtuning.runs.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model_dir, data_dir = make_tiny_setup(tmp_path)
    assert main(train_argv(model_dir, data_dir, tmp_path / "run")) == 2
    err = [line[line.index("error: "):] for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(err) == 1 and err[0].startswith("error: Progtuning does not support FSDP")
    assert not (tmp_path / "run").exists()
