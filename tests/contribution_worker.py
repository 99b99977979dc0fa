"""The contribution schedule in one process or as one rank of ``torchrun --nproc_per_node 2`` (gloo, CPU).

Used by ``tests/test_contribution_ddp.py``::

    python tests/contribution_worker.py --out /tmp/one --batch 8 trainer plain
    torchrun --nproc_per_node 2 tests/contribution_worker.py --out /tmp/two --batch 4 --skew trainer plain

A tiny 4-block BERT whose blocks 0 and 1 are damped (``out = x + 1e-3 (block(x) - x)``: their
gradients are ~1000x smaller), 48 rows, 3 epochs, decisions every 25% of the steps, with a target
that makes the deadline freeze a third block later (0.4). Each run writes ``OUT/NAME/rank{R}.safetensors``
(final weights) and ``OUT/NAME/rank{R}.json`` (decision log, frozen history, steps).

``--skew`` makes rank 1 measure wrong numbers on purpose (blocks 0 and 1 look like the strongest
contributors): its decisions must still be rank 0's, because every rank uses rank 0's measurements.

Loops: ``trainer`` (ProgtuningTrainer + ProgtuningCallback, what ``progtuning train`` runs) and
``plain`` (a DDP loop over DistributedFreezer wrapping a ContributionFreezer, rebuilt at each switch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's tiny helpers

import torch  # noqa: E402
from worker_runs import join_process_group, save_runs  # noqa: E402

torch.set_num_threads(1)

ROWS = 48
EPOCHS = 3
LR = 1e-3
DAMPED = (0, 1)


def policy():
    from progtuning.core.contribution import ContributionPolicy

    return ContributionPolicy(target_reduction=0.4, interval=0.25)


def damped_model():
    from conftest import tiny_model

    model = tiny_model("bert", num_layers=4, seed=0)

    def hook(module, args, output):
        x, h = args[0], output[0] if isinstance(output, tuple) else output
        y = x + 1e-3 * (h - x)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    for i in DAMPED:
        model.bert.encoder.layer[i].register_forward_hook(hook)
    return model


def skew_rank_one() -> None:
    """On rank 1 only: inflate the measured contribution of the damped blocks (before the broadcast)."""
    if os.environ.get("RANK") != "1":
        return
    from progtuning.core.contribution_freezer import ContributionFreezer

    original = ContributionFreezer.before_optimizer_step

    def before_optimizer_step(self, step):
        original(self, step)
        if self._pending is not None:
            at, before, norms = self._pending
            offset = torch.zeros_like(before)
            offset[list(DAMPED)] = 1e3
            self._pending = (at, before + offset, norms * 2)

    ContributionFreezer.before_optimizer_step = before_optimizer_step


def run_trainer(batch: int):
    from conftest import tiny_dataset
    from transformers import TrainingArguments

    from progtuning.core.callback import ProgtuningCallback
    from progtuning.runs.checkpoints import ProgtuningTrainer

    extra = {"ddp_backend": "gloo"} if "RANK" in os.environ else {}
    training = TrainingArguments(
        output_dir=os.environ.get("CONTRIBUTION_WORKER_TMP", "/tmp/contribution_worker_trainer"),
        use_cpu=True, report_to=[], per_device_train_batch_size=batch, num_train_epochs=EPOCHS, learning_rate=LR,
        weight_decay=0.0, lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, **extra,
    )
    callback = ProgtuningCallback(policy(), embeddings="always")  # as the plain loop's ContributionFreezer
    trainer = ProgtuningTrainer(model=damped_model(), args=training, train_dataset=tiny_dataset(ROWS),
                                callbacks=[callback])
    trainer.train()
    freezer = callback.freezer
    info = {"steps": trainer.state.global_step, "decisions": freezer.decisions, "history": [list(h) for h in freezer.history],
            "world_size": trainer.args.world_size, "mode": callback.distributed_mode}
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, info


def run_plain(batch: int):
    """Rank r takes the r-th slice of every global batch; the DDP wrapper is rebuilt when blocks freeze."""
    import torch.distributed as dist
    from conftest import tiny_dataset
    from torch.utils.data import DataLoader
    from transformers import default_data_collator
    from transformers.optimization import get_linear_schedule_with_warmup

    from progtuning.core.contribution_freezer import ContributionFreezer
    from progtuning.core.distributed import DistributedFreezer

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dataset = tiny_dataset(ROWS)
    step_rows = batch * world
    indices = [i for start in range(0, ROWS, step_rows) for i in range(start + rank * batch, start + (rank + 1) * batch)]
    loader = DataLoader(dataset.select(indices), batch_size=batch, collate_fn=default_data_collator)
    model = damped_model()
    freezer = ContributionFreezer(model, policy())
    runner = DistributedFreezer(model, None, freezer=freezer)
    optimizer = torch.optim.AdamW(runner.trainable_parameters(), lr=LR, weight_decay=0.0)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * EPOCHS
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
    step = 0
    for _ in range(EPOCHS):
        for inputs in loader:
            wrapped = runner.apply_for_step(step, steps_per_epoch, total, optimizer)
            model.train()
            wrapped(**inputs).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            freezer.before_optimizer_step(step)
            optimizer.step()
            freezer.after_optimizer_step(step)
            scheduler.step()
            model.zero_grad(set_to_none=True)
            step += 1
    info = {"steps": step, "decisions": freezer.decisions, "history": [list(h) for h in freezer.history], "builds": runner.builds,
            "world_size": world}
    runner.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, info


def run(loop: str, batch: int):
    return run_trainer(batch) if loop == "trainer" else run_plain(batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8, help="per-process batch size")
    parser.add_argument("--skew", action="store_true", help="rank 1 measures wrong numbers on purpose")
    parser.add_argument("loops", nargs="+", choices=["trainer", "plain"])
    args = parser.parse_args()
    os.environ.setdefault("CONTRIBUTION_WORKER_TMP", str(Path(args.out) / "trainer_tmp"))
    join_process_group()
    if args.skew:
        skew_rank_one()
    save_runs(args.out, args.loops, lambda loop: run(loop, args.batch))


if __name__ == "__main__":
    main()
