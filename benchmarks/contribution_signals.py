"""Per-block signals at every optimizer step of a plain fine-tuning run (no freezing): what the contribution
schedule sees, and the alternatives it was chosen over.

    PYTHONPATH=src python benchmarks/contribution_signals.py --method full --lr 5e-5 --out signals.json

MiniLM-L6 on Rotten Tomatoes (1000 training examples, validation 300, max length 64, batch 32, 3 epochs,
AdamW with linear decay, clipping 1.0, seed 0, 1 thread). For every block, the embeddings and the head,
at every step: the gradient norm, the contribution -<g, dW> (from <g, W> before and after the step, as
ContributionFreezer measures it, and exactly from a float64 copy of the weights), and the relative update
|dW| / |W|. Prints a table per 10 steps: each block's contribution per parameter relative to the best
block (the schedule's score), its share of the whole model's contribution, its gradient norm and its
relative update divided by the learning rate. It copies the weights every step: a study tool, not a
training loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch.utils.data import DataLoader
from transformers.optimization import get_linear_schedule_with_warmup

from progtuning.core.blocks import find_blocks
from progtuning.runs.config import TrainConfig
from progtuning.runs.train import prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="full")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainConfig(task="rotten-tomatoes", model="minilm-l6", method=args.method, max_train_examples=1000,
                         max_eval_examples=300, max_length=64, batch_size=32, learning_rate=args.lr, seed=0)
    prepared = prepare(config)
    features = prepared.task.preprocess(prepared.data, prepared.tokenizer, config)
    train, evals = features.train, features.eval
    collator = prepared.task.collator(prepared.tokenizer)
    torch.manual_seed(0)
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, collate_fn=collator)
    model = prepared.model
    layout = find_blocks(model)
    params = dict(model.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    groups: dict[str, list[str]] = {str(i): [n for n in trained if layout.groups[n] == i] for i in range(layout.num_blocks)}
    groups["embeddings"] = [n for n in trained if layout.groups[n] == "embeddings"]
    groups["head"] = [n for n in trained if layout.groups[n] == "head"]
    optimizer = torch.optim.AdamW([params[n] for n in trained], lr=args.lr, weight_decay=0.01)
    total = len(loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
    records, step, started = [], 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([params[n] for n in trained], 1.0)
            record = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
            before = {}
            for key, names in groups.items():
                with_grad = [n for n in names if params[n].grad is not None]
                before[key] = (
                    sum(torch.dot(params[n].grad.reshape(-1), params[n].detach().reshape(-1)).item() for n in with_grad),
                    sum(params[n].detach().double().pow(2).sum().item() for n in names),
                    {n: params[n].detach().clone() for n in names},
                )
            optimizer.step()
            for key, names in groups.items():
                dot_before, weight2, copy = before[key]
                with_grad = [n for n in names if params[n].grad is not None]
                dot_after = sum(torch.dot(params[n].grad.reshape(-1), params[n].detach().reshape(-1)).item() for n in with_grad)
                exact = -sum((params[n].grad.double() * (params[n].detach() - copy[n]).double()).sum().item() for n in with_grad)
                update2 = sum((params[n].detach() - copy[n]).double().pow(2).sum().item() for n in names)
                record[key] = {
                    "params": sum(params[n].numel() for n in names),
                    "grad_norm": math.sqrt(sum(params[n].grad.double().pow(2).sum().item() for n in with_grad)),
                    "contribution": dot_before - dot_after,
                    "contribution_exact": exact,
                    "relative_update": math.sqrt(update2 / weight2) if weight2 else 0.0,
                }
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            records.append(record)
            step += 1
        print(f"epoch {epoch + 1} done after {time.time() - started:.0f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump(records, f)
    _table(records, layout.num_blocks)


def _table(records: list[dict], num_blocks: int, window: int = 10) -> None:
    blocks = [str(i) for i in range(num_blocks)]
    keys = blocks + ["embeddings", "head"]
    for start in range(0, len(records), window):
        part = records[start:start + window]
        mean = {k: {f: sum(r[k][f] for r in part) / len(part) for f in ("contribution", "grad_norm", "relative_update")}
                for k in keys}
        lr = sum(r["lr"] for r in part) / len(part)
        rate = [mean[k]["contribution"] / part[0][k]["params"] for k in blocks]
        whole = sum(mean[k]["contribution"] for k in keys)
        score = " ".join(f"{x / max(rate):5.2f}" for x in rate)
        share = " ".join(f"{mean[k]['contribution'] / whole:4.2f}" for k in keys)
        grad = " ".join(f"{mean[k]['grad_norm']:.3f}" for k in blocks)
        update = " ".join(f"{mean[k]['relative_update'] / lr:4.1f}" for k in blocks)
        loss = sum(r["loss"] for r in part) / len(part)
        print(f"steps {start:3d}+  loss {loss:.3f} | score {score} | share {share} | grad norm {grad} | update/lr {update}")

if __name__ == "__main__":
    main()
