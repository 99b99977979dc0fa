"""What every torchrun test worker does around its runs (ddp_worker, fsdp_worker, contribution_worker).

Each worker trains a list of runs in one process group; after each run it saves, under
``OUT/<run folder>/``, the trained weights and a JSON of what happened, and waits at a barrier so
that the parent test reads complete folders. The workers differ only in what a run is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch


def join_process_group() -> int:
    """This process's rank; under torchrun, after joining the gloo group the Trainer (accelerate) reuses."""
    import torch.distributed as dist

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    return int(os.environ.get("RANK", 0))


def save_runs(
    out: str,
    specs: list[str],
    run: Callable[[str], tuple[dict[str, torch.Tensor], dict]],
    *,
    weights_from_rank0_only: bool = False,
) -> None:
    """Run each spec and keep its weights (``rank<k>.safetensors``, or one ``weights.safetensors``
    where every rank holds the same full weights) and its info (``rank<k>.json``)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank = join_process_group()
    for spec in specs:
        weights, info = run(spec)
        folder = Path(out) / spec.replace(":", "-")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in weights.items()}
        if not weights_from_rank0_only:
            save_file(tensors, str(folder / f"rank{rank}.safetensors"))
        elif rank == 0:
            save_file(tensors, str(folder / "weights.safetensors"))
        (folder / f"rank{rank}.json").write_text(json.dumps(info))
        if dist.is_initialized():
            dist.barrier()
