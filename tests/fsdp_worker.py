"""Tiny progressive runs under FSDP2, in one process (the reference) or as one rank of ``torchrun``.

Used by ``tests/test_fsdp.py`` and to take the measurements in ``docs/distributed.md``::

    python tests/fsdp_worker.py --out /tmp/one --batch 8 fsdp:shrink fsdp:grow:acc2:clip
    torchrun --nproc_per_node 2 tests/fsdp_worker.py --out /tmp/two --batch 4 fsdp:shrink fsdp:grow:acc2:clip
    torchrun --nproc_per_node 2 tests/fsdp_worker.py --out /tmp/m --batch 4 fsdp:none:h256 fsdp:paper:h256

Each run ``LOOP:SCHEDULE[:OPTION...]`` writes the final (whole) weights to ``OUT/NAME/weights.safetensors``
(rank 0) and what each rank saw to ``OUT/NAME/rank{R}.json`` (NAME is the spec with ``:`` replaced by
``-``). ``--batch`` is the per-process batch: the same global batch in one and in two processes must give
the same weights, up to float summation order. Without a process group nothing is sharded: that is the
one-process reference the tests compare against.

Loops:

* ``fsdp``: a plain loop over :func:`~progtuning.core.fsdp.shard_by_block` +
  :class:`~progtuning.core.fsdp.ShardedFreezer`, traffic counted per step;
* ``ddp``: the same loop over :class:`~progtuning.core.distributed.DistributedFreezer`;
* ``trainer``: :class:`~progtuning.runs.checkpoints.ProgtuningTrainer` + the callback, the model sharded
  before the Trainer is built (what ``progtuning train --fsdp`` does).

Schedules: ``none`` (full fine-tuning), ``shrink`` (the paper's, 3 stages, embeddings first stage only),
``grow`` (top block first, then more), ``cycle`` (blocks off and on again), ``paper`` (the paper's with
4 stages, embeddings frozen: the communication measurement), ``paper-emb`` (the same, embeddings trained). Options: ``acc2`` (half the batch, 2
accumulation steps), ``clip`` (max_grad_norm 0.02, so clipping binds every step), ``lora`` (LoRA r=4
on query/value instead of full fine-tuning), ``hN`` (hidden N instead of 32: ``h256``, ``h1024``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's tiny helpers

import torch  # noqa: E402
from worker_runs import save_runs  # noqa: E402

torch.set_num_threads(1)

ROWS = 48
EPOCHS = 3  # one epoch per stage for schedules with more stages (``paper``: 4)
LR = 1e-3


def build_schedule(name: str, num_blocks: int = 4):
    from progtuning.core.schedule import explicit, no_progtuning, progressive

    if name == "none":
        return no_progtuning(num_blocks)
    if name == "shrink":
        return progressive(num_blocks, 3, embeddings="first_stage")
    if name == "grow":
        return explicit(num_blocks, [[3], [2, 3], [0, 1, 2, 3]], embeddings="never")
    if name == "cycle":
        return explicit(num_blocks, [[0, 1, 2, 3], [3], [1, 2, 3]], embeddings="first_stage")
    if name == "paper":
        return progressive(num_blocks, 4, embeddings="never")
    if name == "paper-emb":
        return progressive(num_blocks, 4, embeddings="always")
    raise SystemExit(f"unknown schedule {name}")


def build_model(options: set[str]):
    from conftest import tiny_model

    from progtuning.methods.api import MethodConfig, apply_method

    hidden = next((int(o[1:]) for o in options if o[:1] == "h" and o[1:].isdigit()), None)  # h256, h1024
    size = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64) if hidden else {}
    model = tiny_model("bert", num_layers=4, seed=0, **size)
    method = MethodConfig(name="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0) if "lora" in options else MethodConfig()
    return apply_method(model, method, task_type="seq_cls")


def distributed() -> tuple[bool, int, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return on, (dist.get_rank() if on else 0), (dist.get_world_size() if on else 1)


def run(spec: str, batch: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One run by spec; returns the whole final weights (rank 0; empty elsewhere) and what it saw."""
    loop, schedule, *options = spec.split(":")
    options = set(options)
    accumulation = 2 if "acc2" in options else 1
    if loop == "trainer":
        return run_trainer(schedule, batch // accumulation, accumulation, options)
    return run_plain(loop, schedule, batch // accumulation, accumulation, options)


def run_plain(loop: str, schedule_name: str, batch: int, accumulation: int, options: set[str]):
    """A plain loop; rank r takes the r-th slice of every global batch (no sampler shuffling)."""
    import psutil
    from conftest import tiny_dataset
    from torch.utils.data import DataLoader
    from transformers import default_data_collator
    from transformers.optimization import get_linear_schedule_with_warmup

    from progtuning.core.distributed import DistributedFreezer
    from progtuning.core.freezing import ProgressiveFreezer
    from progtuning.core.fsdp import (
        ShardedFreezer,
        count_traffic,
        full_state_dict,
        gradient_sync_off,
        shard_by_block,
        sharded_state_bytes,
    )

    on, rank, world = distributed()
    dataset = tiny_dataset(ROWS)
    global_batch = batch * world
    indices = [i for start in range(0, len(dataset), global_batch)
               for i in range(start + rank * batch, min(start + (rank + 1) * batch, len(dataset)))]
    loader = DataLoader(dataset.select(indices), batch_size=batch, collate_fn=default_data_collator)
    model = build_model(options)
    schedule = build_schedule(schedule_name)
    sharded = loop == "fsdp" and on
    traffic = None
    if sharded:
        shard_by_block(model)
        freezer = ShardedFreezer(model, schedule)
        traffic = count_traffic(model)
    elif loop == "ddp":
        runner = DistributedFreezer(model, schedule)
        freezer = runner.freezer
    else:
        freezer = ProgressiveFreezer(model, schedule)
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=LR, weight_decay=0.01)
    epochs = max(EPOCHS, schedule.num_stages)
    steps_per_epoch = len(loader) // accumulation
    total = steps_per_epoch * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
    max_norm = 0.02 if "clip" in options else 1.0
    process = psutil.Process()
    stages: dict[int, dict] = {}
    norms = []
    step = 0
    for _ in range(epochs):
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            if loop == "ddp":
                wrapped = runner.apply_for_step(step, steps_per_epoch, total, optimizer)
            else:
                freezer.apply_for_step(step, steps_per_epoch, total, optimizer)
                wrapped = model
            record = stages.setdefault(freezer.stage_index, {"steps": 0, "reduce_scatter_bytes": 0,
                                                             "all_gather_bytes": 0, "peak_rss_mb": 0.0,
                                                             "peak_state_bytes": {}, "optimizer_entries": 0})
            before = traffic.snapshot() if traffic else None
            model.train()
            for micro in range(accumulation):
                inputs = next(batches)
                last = micro == accumulation - 1
                if sharded:
                    context = contextlib.nullcontext() if last else gradient_sync_off(model)
                else:
                    context = contextlib.nullcontext() if last or not on else wrapped.no_sync()
                with context:
                    (wrapped(**inputs).loss / accumulation).backward()
            held = sharded_state_bytes(model, optimizer)  # gradients are there now
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
            optimizer.step()
            scheduler.step()
            held["optimizer"] = sharded_state_bytes(model, optimizer)["optimizer"]  # moments exist after the step
            optimizer.zero_grad(set_to_none=True)
            record["steps"] += 1
            if traffic:
                after = traffic.snapshot()
                record["reduce_scatter_bytes"] += after["reduce_scatter_bytes"] - before["reduce_scatter_bytes"]
                record["all_gather_bytes"] += after["all_gather_bytes"] - before["all_gather_bytes"]
            record["peak_rss_mb"] = max(record["peak_rss_mb"], process.memory_info().rss / 2**20)
            record["peak_state_bytes"] = {k: max(v, record["peak_state_bytes"].get(k, 0)) for k, v in held.items()}
            record["optimizer_entries"] = len(optimizer.state)
            step += 1
    weights = full_state_dict(model) if sharded else {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = {"steps": step, "world_size": world, "sharded": sharded, "grad_norms": norms,
            "stages": {str(k): v for k, v in stages.items()},
            "parameters": sum(p.numel() for p in model.parameters())}
    if loop == "ddp":
        info["builds"] = runner.builds
        runner.close()
    else:
        freezer.close()
    return weights, info


def run_trainer(schedule_name: str, batch: int, accumulation: int, options: set[str]):
    from conftest import tiny_dataset
    from transformers import TrainingArguments

    from progtuning.core.callback import ProgtuningCallback
    from progtuning.core.fsdp import TrafficLog, full_state_dict, shard_by_block
    from progtuning.runs.checkpoints import ProgtuningTrainer

    on, rank, world = distributed()
    extra = {"ddp_backend": "gloo"} if on else {}
    args = TrainingArguments(
        output_dir=os.environ.get("FSDP_WORKER_TMP", "/tmp/fsdp_worker_trainer"),
        use_cpu=True, report_to=[], per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        num_train_epochs=EPOCHS, learning_rate=LR, weight_decay=0.01, lr_scheduler_type="linear",
        max_grad_norm=0.02 if "clip" in options else 1.0, logging_steps=1, save_strategy="no", seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **extra,
    )
    model = build_model(options)
    if on:
        args.device  # the Trainer's process group is up: shard as progtuning train --fsdp does
        shard_by_block(model)
    callback = ProgtuningCallback(build_schedule(schedule_name))
    traffic = TrafficLog(callback)
    trainer = ProgtuningTrainer(model=model, args=args, train_dataset=tiny_dataset(ROWS), callbacks=[callback, traffic])
    trainer.train()
    weights = full_state_dict(trainer.model) if on else {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = {
        "steps": trainer.state.global_step,
        "world_size": world,
        "stages": [[r["stage"], r["start_step"], r["end_step"]] for r in callback.stage_records()],
        "mode": callback.distributed_mode,
        "traffic": traffic.records(),
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
    }
    return weights, info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8, help="per-process batch size (per optimizer step)")
    parser.add_argument("runs", nargs="+", help="LOOP:SCHEDULE[:OPTION...]")
    args = parser.parse_args()
    os.environ.setdefault("FSDP_WORKER_TMP", str(Path(args.out) / "trainer_tmp"))
    # every rank ends with the same full weights (gathered from the shards): rank 0's are saved
    save_runs(args.out, args.runs, lambda spec: run(spec, args.batch), weights_from_rank0_only=True)


if __name__ == "__main__":
    main()
