"""The contribution schedule in 2 processes (torchrun, gloo) against 1 process: every rank decides the same.

Rank 1 is made to measure wrong numbers on purpose (``--skew``); both ranks must still log the
same decisions, signal values included, bit for bit (they use rank 0's measurements), and hold
identical weights. Against one process with the same global batch, the frozen history (which
blocks, at which step) is the same, and the weights agree within float summation order (as in
``test_distributed.py``). One launch runs both loops: the Trainer with the callback, and a plain DDP
loop over ``DistributedFreezer(freezer=ContributionFreezer(...))``. Marked slow (a torchrun launch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import TESTS, subprocess_env

TOLERANCE = 1e-5  # as test_distributed.py: 1 vs 2 processes differ only in the order of float sums
LOOPS = ("trainer", "plain")

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("contribution-ddp2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "contribution_worker.py"), "--out", str(out), "--batch", "4", "--skew", *LOOPS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process() -> dict:
    import contribution_worker

    return {loop: contribution_worker.run(loop, batch=8) for loop in LOOPS}


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_every_rank_makes_rank_zeros_decisions_and_matches_one_process(two_processes, one_process, loop):
    folder = two_processes / loop
    rank0, rank1 = (load_file(str(folder / f"rank{r}.safetensors")) for r in (0, 1))
    info0, info1 = (json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1))
    assert info0["world_size"] == 2 and info0["steps"] == 18
    assert info1["decisions"] == info0["decisions"]  # signal values and all, despite rank 1's skewed measurements
    assert info1["history"] == info0["history"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    reference, reference_info = one_process[loop]
    assert reference_info["world_size"] == 1
    # blocks 0-1 freeze on their signals at the first decision, block 2 on the target's deadline later
    assert info0["history"] == reference_info["history"] == [[0, 0], [4, 2], [9, 3]]
    assert [d["reason"] for d in info0["decisions"]] == [d["reason"] for d in reference_info["decisions"]]
    assert max((rank0[k] - reference[k]).abs().max().item() for k in rank0) < TOLERANCE
    if loop == "plain":
        assert info0["builds"] == 3  # one DDP wrapper per trainable set
    else:
        assert info0["mode"] == "ddp"
