"""FSDP2 with one unit per block: sharding, freezing whole units, traffic, sharded checkpoints, several machines.

Fast tests run FSDP2 in this process on a one-process gloo group (sharding, freezing, checkpoints and
the one-line refusals behave the same with one rank). The slow ones launch 2 gloo processes:

* ``tests/fsdp_worker.py`` under ``torchrun``: plain loops and the Trainer, shrinking and growing, LoRA,
  accumulation and binding gradient clipping, against the same runs in one process without FSDP
  (within 1e-5: only the float summation order differs); the reduce-scatter volume each stage sent.
* ``progtuning train --fsdp`` as two ``torchrun --nnodes 2`` launchers (two simulated machines, c10d
  rendezvous on localhost), SIGKILLed on both "machines" while writing a checkpoint, then resumed:
  bit-identical to an uninterrupted two-process run, and equal to one process.
* ``progtuning train`` with DDP over the same two launchers, SIGTERM on one of them, resumed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model
from safetensors.torch import load_file
from tiny_run import TESTS, final_weights, make_tiny_setup, subprocess_env, train_argv

from progtuning.errors import ProgtuningError

# Two processes sum each gradient in another order than one process (reduce-scatter of two halves vs one
# batch mean): float32 rounding, about 1e-7 relative per step, carried through 18-24 AdamW steps at lr 1e-3
# (measured 2.8e-7 at most on these tiny models). 1e-5 leaves a wide margin and still catches a step
# that was not averaged (such runs are 1e-4..1e-2 off, see test_distributed.py).
TOLERANCE = 1e-5
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group in this process, torn down after the test."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_bert(seed: int = 0):
    from progtuning.core.fsdp import shard_by_block

    model = tiny_model("bert", num_layers=4, seed=seed)
    shard_by_block(model)
    return model


def _local(model) -> dict[str, torch.Tensor]:
    from progtuning.core.fsdp import local_tensor

    return {name: local_tensor(param).detach().clone() for name, param in model.named_parameters()}


def _train(model, freezer, optimizer, steps, first_step=0, steps_per_epoch=2, total=6):
    for step in range(first_step, first_step + steps):
        freezer.apply_for_step(step, steps_per_epoch, total, optimizer)
        model.train()
        model(**tiny_batch(4, seed=step)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# -- sharding and freezing (one process) ------------------------------------------------------------
@needs_gloo
def test_every_block_is_a_unit_of_its_own_and_names_do_not_change(one_process_group):
    from torch.distributed.tensor import DTensor

    from progtuning.core.blocks import find_blocks
    from progtuning.core.fsdp import ROOT, units

    before = find_blocks(tiny_model("bert", num_layers=4))
    model = _sharded_bert()
    assert set(units(model)) == {*before.block_paths, ROOT}
    assert all(isinstance(p, DTensor) for p in model.parameters())
    after = find_blocks(model)  # the locator still reads the sharded model
    assert after.block_paths == before.block_paths and after.groups == before.groups


@needs_gloo
def test_a_stage_freezes_whole_units_and_only_the_stage_moves(one_process_group):
    """peft's invariant under FSDP: large-LR steps move exactly the stage's parameters; the rest stay bit-identical."""
    from progtuning.core.fsdp import ShardedFreezer
    from progtuning.core.schedule import progressive

    model = _sharded_bert()
    freezer = ShardedFreezer(model, progressive(4, 3, embeddings="first_stage"))  # parts [0], [1], [2, 3]
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=1e-2)
    _train(model, freezer, optimizer, 2)  # stage 0 trains everything
    entries = len(optimizer.state)
    before = _local(model)
    _train(model, freezer, optimizer, 2, first_step=2)  # stage 1: embeddings and block 0 frozen
    after = _local(model)
    frozen = {n for n in before if n.startswith(("bert.embeddings.", "bert.encoder.layer.0."))}
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in before if n not in frozen)
    params = dict(model.named_parameters())
    assert all(not params[n].requires_grad and params[n].grad is None for n in frozen)
    assert len(optimizer.state) == entries - len(frozen)  # their AdamW shards were dropped
    freezer.close()


@needs_gloo
@pytest.mark.parametrize("freezer_class", ["ShardedFreezer", "ProgressiveFreezer"])
def test_a_forward_without_backward_cannot_leak_a_frozen_flag(one_process_group, freezer_class):
    """An evaluation leaves the root unit unsharded; FSDP2 copies requires_grad only when it all-gathers.

    The plain freezer would switch the sharded flags while the root's unsharded parameters keep the old
    ones, so the "frozen" embeddings still get a gradient and move. ShardedFreezer reshards first.
    """
    import progtuning.core.fsdp as fsdp
    from progtuning.core.freezing import ProgressiveFreezer
    from progtuning.core.schedule import explicit

    model = _sharded_bert()
    fsdp.reshard_all(model)
    cls = fsdp.ShardedFreezer if freezer_class == "ShardedFreezer" else ProgressiveFreezer
    schedule = explicit(4, [[0, 1, 2, 3], [0, 1, 2, 3]], embeddings="first_stage")
    freezer = cls(model, schedule)
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=1e-2)
    _train(model, freezer, optimizer, 1, steps_per_epoch=1, total=2)
    model.eval()
    with torch.no_grad():
        model(**tiny_batch(4, seed=9))  # the root keeps its unsharded parameters after this
    before = _local(model)
    _train(model, freezer, optimizer, 1, first_step=1, steps_per_epoch=1, total=2)  # stage 1 freezes the embeddings
    after = _local(model)
    moved = [n for n in before if n.startswith("bert.embeddings.") and not torch.equal(before[n], after[n])]
    assert (moved == []) == (freezer_class == "ShardedFreezer")
    freezer.close()


@needs_gloo
def test_blocks_must_be_units(one_process_group):
    from torch.distributed.fsdp import fully_shard

    from progtuning.core.fsdp import ShardedFreezer
    from progtuning.core.schedule import progressive

    model = tiny_model("bert", num_layers=4)
    fully_shard(model)  # the whole model one unit: freezing a block could not skip anything
    with pytest.raises(ProgtuningError, match="every block a unit") as info:
        ShardedFreezer(model, progressive(4, 2))
    assert "\n" not in str(info.value)


@needs_gloo
def test_the_trainer_accepts_fsdp_only_when_every_block_is_a_unit(one_process_group):
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel

    from progtuning.core.distributed import check_trainer_parallelism
    from progtuning.core.schedule import progressive

    schedule = progressive(4, 2)
    fsdp_args = SimpleNamespace(fsdp=True, world_size=2)
    assert check_trainer_parallelism(fsdp_args, _sharded_bert(), schedule) == "fsdp"
    # TrainingArguments(fsdp=...) whose model nobody sharded per block (on CPUs accelerate ran DDP instead)
    with pytest.raises(ProgtuningError, match="FSDP set up by accelerate .* pass --fsdp") as info:
        check_trainer_parallelism(fsdp_args, tiny_model("bert", num_layers=4), schedule)
    assert "\n" not in str(info.value)
    class FlatParameters(FullyShardedDataParallel):  # FSDP1 cannot be built on CPUs; its type is what counts
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ProgtuningError, match="does not support FSDP1"):
        check_trainer_parallelism(SimpleNamespace(world_size=2), FlatParameters(tiny_model("bert", 2)), schedule)
    with pytest.raises(ProgtuningError, match="does not support DeepSpeed .* keeps updating them after they freeze"):
        check_trainer_parallelism(SimpleNamespace(deepspeed="ds.json", world_size=2), _sharded_bert(), schedule)


@needs_gloo
def test_the_frozen_prefix_cache_refuses_a_sharded_model(one_process_group):
    from progtuning.cache.prefix import unsupported_reason

    assert unsupported_reason(tiny_model("bert", num_layers=4)) is None
    reason = unsupported_reason(_sharded_bert())
    assert reason.startswith("the frozen-prefix cache does not work on a model sharded by FSDP") and "\n" not in reason


def test_sharding_needs_a_process_group():
    from progtuning.core.fsdp import shard_by_block

    with pytest.raises(ProgtuningError, match="torch.distributed is not initialised"):
        shard_by_block(tiny_model("bert", num_layers=2))


# -- sharded checkpoints (one process) --------------------------------------------------------------
def _fresh(schedule):
    from progtuning.core.fsdp import ShardedFreezer

    model = _sharded_bert()
    freezer = ShardedFreezer(model, schedule)
    return model, freezer, torch.optim.AdamW(freezer.trainable_parameters(), lr=1e-2, weight_decay=0.01)


@needs_gloo
def test_a_sharded_checkpoint_resumes_bit_identically_and_holds_no_pickle(one_process_group, tmp_path):
    from progtuning.core.schedule import progressive
    from progtuning.core.sharded_checkpoint import check_sharded, load_sharded, save_sharded

    schedule = progressive(4, 3, embeddings="first_stage")
    model, freezer, optimizer = _fresh(schedule)
    _train(model, freezer, optimizer, 3)  # into stage 1: some optimizer state already released
    folder = save_sharded(tmp_path / "ckpt", model, optimizer)
    entries = len(optimizer.state)
    _train(model, freezer, optimizer, 3, first_step=3)
    uninterrupted = _local(model)

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # no .metadata pickle, no .pt
    assert not any(p.name.startswith(".partial-") for p in tmp_path.iterdir())
    model2, freezer2, optimizer2 = _fresh(schedule)
    check_sharded(folder, model2)
    load_sharded(folder, model2, optimizer2)
    assert len(optimizer2.state) == entries
    _train(model2, freezer2, optimizer2, 3, first_step=3)
    resumed = _local(model2)
    assert all(torch.equal(uninterrupted[n], resumed[n]) for n in uninterrupted)


@needs_gloo
def test_a_broken_or_foreign_sharded_checkpoint_is_refused_in_one_line(one_process_group, tmp_path):
    import shutil

    from progtuning.core.schedule import progressive
    from progtuning.core.sharded_checkpoint import INDEX, check_sharded, save_sharded

    model, freezer, optimizer = _fresh(progressive(4, 2))
    _train(model, freezer, optimizer, 1)
    good = save_sharded(tmp_path / "good", model, optimizer)

    def refused(folder, match, check_model=None):
        with pytest.raises(ProgtuningError, match=match) as info:
            check_sharded(folder, check_model, fix="delete it")
        assert "\n" not in str(info.value)
        assert str(info.value).endswith("delete it" if check_model is None else "or start a new run")

    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    shard = sorted((cut / "optimizer").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # killed mid-write
    refused(cut, "is corrupt")
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    for shard in (missing / "model").glob("*.safetensors"):
        shard.unlink()
    refused(missing, "no shard files")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(good, unfinished)
    (unfinished / INDEX).unlink()
    refused(unfinished, "incomplete")
    other = tiny_model("bert", num_layers=4, num_labels=3)  # another head
    refused(good, r"another model \(2 tensors do not fit: classifier.bias is \[2\]", other)


# -- what progtuning train refuses before loading anything --------------------------------------------
def test_fsdp_needs_several_processes_and_no_prefix_cache(tmp_path, capsys, monkeypatch):
    from progtuning.runs.cli import main

    model_dir, data_dir = make_tiny_setup(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(train_argv(model_dir, data_dir, tmp_path / "one", "--fsdp")) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(train_argv(model_dir, data_dir, tmp_path / "cache", "--fsdp", "--cache-frozen",
                           "--embeddings", "never")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: --fsdp shards the model across processes, but this is one process")
    assert errors[1].startswith("error: --cache-frozen does not work with --fsdp")
    assert len(errors) == 2 and not (tmp_path / "one").exists() and not (tmp_path / "cache").exists()


def test_a_checkpoint_resumes_only_with_the_sharding_it_was_written_with(tmp_path):
    from progtuning.runs.sharded_trainer import SHARDED, check_same_sharding

    plain, sharded = tmp_path / "checkpoint-8", tmp_path / "checkpoint-16"
    plain.mkdir()
    (sharded / SHARDED).mkdir(parents=True)
    check_same_sharding(plain, False)
    check_same_sharding(sharded, True)
    with pytest.raises(ProgtuningError, match="written without --fsdp: resume it without --fsdp"):
        check_same_sharding(plain, True)
    with pytest.raises(ProgtuningError, match="written with --fsdp: resume it with --fsdp"):
        check_same_sharding(sharded, False)


# -- two processes ---------------------------------------------------------------------------------
RUNS = ["fsdp:none", "fsdp:shrink", "fsdp:grow:acc2:clip", "fsdp:shrink:lora", "trainer:shrink:clip",
        "trainer:grow:acc2"]
STAGES = [[0, 0, 6], [1, 6, 12], [2, 12, 18]]  # 48 rows, global batch 8, 3 epochs: two switches


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    result = subprocess.run(torchrun(str(TESTS / "fsdp_worker.py"), "--out", str(out), "--batch", "4", *RUNS),
                            capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process() -> dict:
    import fsdp_worker

    return {spec: fsdp_worker.run(spec, batch=8) for spec in RUNS if spec != "fsdp:none"}


def _load(folder: Path, spec: str) -> tuple[dict, dict]:
    run = folder / spec.replace(":", "-")
    return load_file(str(run / "weights.safetensors")), json.loads((run / "rank0.json").read_text())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in RUNS if s != "fsdp:none"])
def test_two_sharded_processes_match_one_process(two_processes, one_process, spec):
    weights, info = _load(two_processes, spec)
    reference, reference_info = one_process[spec]
    assert info["world_size"] == 2 and reference_info["world_size"] == 1
    assert _max_diff(weights, reference) < TOLERANCE
    # the gradient norm before clipping: the global one over DTensors, equal to the unsharded run's
    assert len(info["grad_norms"]) == len(reference_info["grad_norms"]) == 18
    # norms around 0.3, off by the same float32 rounding as the weights (about 1e-7): 1e-4 is a wide margin
    assert max(abs(a - b) for a, b in zip(info["grad_norms"], reference_info["grad_norms"])) < 1e-4
    if "clip" in spec:
        assert min(info["grad_norms"]) > 0.02  # max_grad_norm 0.02: clipping bound at every step
    if spec.startswith("trainer"):
        assert info["mode"] == "fsdp" and info["stages"] == STAGES == reference_info["stages"]
    else:
        assert info["sharded"] and not reference_info["sharded"]


@needs_gloo
@pytest.mark.slow
def test_frozen_units_send_nothing_so_each_stage_sends_less(two_processes):
    def per_step(spec: str) -> list[int]:
        stages = _load(two_processes, spec)[1]["stages"]
        return [stages[str(s)]["reduce_scatter_bytes"] // stages[str(s)]["steps"] for s in range(len(stages))]

    full = per_step("fsdp:none")[0]
    shrink = per_step("fsdp:shrink")
    assert full >= shrink[0] > shrink[1] > shrink[2] > 0  # the paper's schedule: less at every switch
    grow = per_step("fsdp:grow:acc2:clip")  # one reduce-scatter per step, accumulation or not
    assert 0 < grow[0] < grow[1] < grow[2] < full
    lora = per_step("fsdp:shrink:lora")
    assert lora[0] > lora[1] > lora[2] and lora[0] < full / 10  # LoRA sends its own parameters' gradients only
    trainer = [r["reduce_scatter_bytes_per_step"] for r in _load(two_processes, "trainer:shrink:clip")[1]["traffic"]]
    assert trainer == shrink  # the Trainer sends exactly what the plain loop does
    # each rank's optimizer state (its AdamW shards) shrinks with the trainable set
    stages = _load(two_processes, "fsdp:shrink")[1]["stages"]
    held = [stages[str(s)]["peak_state_bytes"]["optimizer"] for s in range(3)]
    assert held[0] > held[1] > held[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_machines(argv: list[str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``progtuning`` (through crash_runner) as two torchrun launchers, one process each, meeting by c10d."""
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", str(TESTS / "crash_runner.py"), *argv]
    launchers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=subprocess_env()) for _ in range(2)]
    results = []
    try:
        for launcher in launchers:
            out, err = launcher.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command, launcher.returncode, out, err))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    return results


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("setup")
    model_dir, data_dir = make_tiny_setup(root, dropout=0.0)  # dropout masks differ per process count
    return root, model_dir, data_dir


@pytest.fixture(scope="module")
def one_process_run(tiny_setup) -> Path:
    from progtuning.runs.cli import main

    root, model_dir, data_dir = tiny_setup
    assert main(train_argv(model_dir, data_dir, root / "one")) == 0  # 1 process, batch 4, no FSDP
    return root / "one"


@needs_gloo
@pytest.mark.slow
def test_fsdp_on_two_machines_killed_while_saving_resumes_bit_identically(tiny_setup, one_process_run):
    root, model_dir, data_dir = tiny_setup
    reference = root / "fsdp-standalone"
    argv = train_argv(model_dir, data_dir, reference, "--batch-size", "2", "--fsdp")  # 2 x 2 = the same global batch
    done = subprocess.run(torchrun(str(TESTS / "crash_runner.py"), "--", *argv), capture_output=True, text=True,
                          timeout=600, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]

    two = root / "fsdp-two-machines"
    argv = train_argv(model_dir, data_dir, two, "--batch-size", "2", "--fsdp")
    # both machines are killed inside checkpoint-16, after its shards and before its RNG state
    killed = two_machines(["--crash", "save:16:KILL", "--", *argv])
    assert all(r.returncode != 0 for r in killed)
    assert "crash_runner: SIGKILL while saving" in killed[0].stderr + killed[1].stderr
    checkpoints = sorted(os.listdir(two / "checkpoints"))
    assert checkpoints == [".partial-checkpoint-16", "checkpoint-8"], killed[0].stderr[-3000:]
    assert (two / "checkpoints" / "checkpoint-8" / "sharded" / "sharded.json").is_file()

    resumed = two_machines(["--", *argv, "--resume"])
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    results = json.loads((two / "results.json").read_text())
    assert results["steps"] == 24 and len(results["fsdp"]["stages"]) == 2  # resumed inside stage 1: stages 1, 2
    resumed_weights, uninterrupted = final_weights(two), final_weights(reference)
    assert all(torch.equal(resumed_weights[k], uninterrupted[k]) for k in uninterrupted)
    assert _max_diff(uninterrupted, final_weights(one_process_run)) < TOLERANCE


@needs_gloo
@pytest.mark.slow
def test_ddp_on_two_machines_stops_on_one_resumes_and_matches_one_process(tiny_setup, one_process_run):
    root, model_dir, data_dir = tiny_setup
    two = root / "ddp-two-machines"
    argv = train_argv(model_dir, data_dir, two, "--batch-size", "2")
    stopped = two_machines(["--crash", "step:10:TERM:1", "--", *argv])  # only machine 1 gets SIGTERM
    assert all(r.returncode != 0 for r in stopped)
    assert sorted(os.listdir(two / "checkpoints")) == ["checkpoint-11", "checkpoint-8"]
    resumed = two_machines(["--", *argv, "--resume"])
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    assert json.loads((two / "results.json").read_text())["steps"] == 24
    assert _max_diff(final_weights(two), final_weights(one_process_run)) < TOLERANCE
