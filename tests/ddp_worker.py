"""Tiny progressive runs, in one process or as one rank of ``torchrun --nproc_per_node N`` (gloo, CPU).

Used by ``tests/test_distributed.py`` and to take the measurements in ``docs/distributed.md``::

    python tests/ddp_worker.py --out /tmp/one --batch 8 trainer:shrink plain:grow
    torchrun --nproc_per_node 2 tests/ddp_worker.py --out /tmp/two --batch 4 trainer:shrink plain:grow

Each run ``LOOP:SCHEDULE[:OPTION...]`` writes its final weights to ``OUT/NAME/rank{R}.safetensors``
and what it did to ``OUT/NAME/rank{R}.json`` (NAME is the run spec with ``:`` replaced by ``-``).
``--batch`` is the per-process batch: the same global batch in one and in two processes must give
the same weights, up to float summation order.

Loops:

* ``trainer``: :class:`~progtuning.runs.checkpoints.ProgtuningTrainer` + :class:`~progtuning.core.callback.ProgtuningCallback`
  (what ``progtuning train`` runs); option ``hf`` uses the plain ``transformers.Trainer`` instead.
* ``plain``: a plain PyTorch DDP loop over :class:`~progtuning.core.distributed.DistributedFreezer`
  (the wrapper is rebuilt whenever the trainable set changes).
* ``naive``: a plain loop that builds DDP once and never rebuilds it — the broken baseline the
  measurements compare against. Options ``unused`` (find_unused_parameters=True), ``static``
  (static_graph=True), ``late`` (apply stage 0 *before* wrapping, as a loop that freezes first would).

Options for every loop: ``acc2`` (per-process batch halved, 2 accumulation steps: same global batch).
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
EPOCHS = 3
LR = 1e-3


def build_schedule(name: str, num_blocks: int = 4):
    from progtuning.core.schedule import explicit, no_progtuning, progressive

    if name == "none":  # one stage that trains everything: plain data parallelism
        return no_progtuning(num_blocks)
    if name == "shrink":  # the paper: stage t trains parts t..T (3 stages, 2 switches)
        return progressive(num_blocks, 3, embeddings="first_stage")
    if name == "grow":  # the reverse: the top block first, then more and more (3 stages, 2 switches)
        return explicit(num_blocks, [[3], [2, 3], [0, 1, 2, 3]], embeddings="never")
    if name == "cycle":  # blocks go off *and* come back on
        return explicit(num_blocks, [[0, 1, 2, 3], [3], [1, 2, 3]], embeddings="first_stage")
    raise SystemExit(f"unknown schedule {name}")


def run(spec: str, batch: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One run by spec (``trainer:grow:acc2``); returns its final weights and a summary."""
    loop, schedule, *options = spec.split(":")
    accumulation = 2 if "acc2" in options else 1
    per_step_batch = batch // accumulation
    if loop == "trainer":
        return run_trainer(schedule, per_step_batch, accumulation, hf="hf" in options)
    return run_plain(loop, schedule, per_step_batch, accumulation, set(options))


def run_trainer(schedule_name: str, batch: int, accumulation: int, hf: bool = False):
    from conftest import tiny_dataset, tiny_model
    from transformers import Trainer, TrainingArguments

    from progtuning.core.callback import ProgtuningCallback
    from progtuning.runs.checkpoints import ProgtuningTrainer

    extra = {"ddp_backend": "gloo"} if "RANK" in os.environ else {}
    training = TrainingArguments(
        output_dir=os.environ.get("DDP_WORKER_TMP", "/tmp/ddp_worker_trainer"),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=EPOCHS,
        learning_rate=LR,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )
    model = tiny_model("bert", num_layers=4, seed=0)
    callback = ProgtuningCallback(build_schedule(schedule_name))
    trainer_cls = Trainer if hf else ProgtuningTrainer
    trainer = trainer_cls(model=model, args=training, train_dataset=tiny_dataset(ROWS), callbacks=[callback])
    trainer.train()
    info = {
        "steps": trainer.state.global_step,
        "stages": [[r["stage"], r["start_step"], r["end_step"]] for r in callback.stage_records()],
        "wrapper": type(trainer.model_wrapped).__name__,
        "world_size": trainer.args.world_size,
        "mode": callback.distributed_mode,
    }
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, info


def run_plain(loop: str, schedule_name: str, batch: int, accumulation: int, options: set[str]):
    """A plain loop; rank r takes the r-th slice of every global batch (no sampler shuffling)."""
    import torch.distributed as dist
    from conftest import tiny_dataset, tiny_model
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader
    from transformers import default_data_collator
    from transformers.optimization import get_linear_schedule_with_warmup

    from progtuning.core.distributed import DistributedFreezer
    from progtuning.core.freezing import ProgressiveFreezer

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    dataset = tiny_dataset(ROWS)
    global_batch = batch * world
    indices = [i for start in range(0, len(dataset), global_batch)
               for i in range(start + rank * batch, min(start + (rank + 1) * batch, len(dataset)))]
    loader = DataLoader(dataset.select(indices), batch_size=batch, collate_fn=default_data_collator)
    model = tiny_model("bert", num_layers=4, seed=0)
    schedule = build_schedule(schedule_name)
    if loop == "plain":
        runner = DistributedFreezer(model, schedule)
        params = runner.trainable_parameters()
    else:
        freezer = ProgressiveFreezer(model, schedule)
        params = freezer.trainable_parameters()
        if "late" in options:  # freeze first, wrap second
            freezer.apply(0)
        kwargs = {"find_unused_parameters": "unused" in options, "static_graph": "static" in options}
        wrapped = DDP(model, **kwargs) if distributed else model
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    steps_per_epoch = len(loader) // accumulation
    total = steps_per_epoch * EPOCHS
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
    step, errors = 0, []
    for _ in range(EPOCHS):
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            if loop == "plain":
                wrapped = runner.apply_for_step(step, steps_per_epoch, total, optimizer)
            else:
                freezer.apply_for_step(step, steps_per_epoch, total, optimizer)
            model.train()
            try:
                for micro in range(accumulation):
                    inputs = next(batches)
                    sync = micro == accumulation - 1 or not distributed
                    context = contextlib.nullcontext() if sync else wrapped.no_sync()
                    with context:
                        (wrapped(**inputs).loss / accumulation).backward()
            except RuntimeError as error:
                errors.append({"step": step, "error": str(error).splitlines()[0][:100]})
                break
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            model.zero_grad(set_to_none=True)
            step += 1
        if errors:
            break
    info = {"steps": step, "errors": errors, "builds": runner.builds if loop == "plain" else 0, "world_size": world}
    if loop == "plain":
        runner.close()
    else:
        freezer.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8, help="per-process batch size (per optimizer step)")
    parser.add_argument("runs", nargs="+", help="LOOP:SCHEDULE[:OPTION...]")
    args = parser.parse_args()
    os.environ.setdefault("DDP_WORKER_TMP", str(Path(args.out) / "trainer_tmp"))
    save_runs(args.out, args.runs, lambda spec: run(spec, args.batch))


if __name__ == "__main__":
    main()
