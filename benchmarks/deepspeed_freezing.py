"""Why progtuning refuses DeepSpeed: what ZeRO does with parameters a stage freezes (the measurement).

Trains a 4-block BERT (hidden 32) with the HF Trainer under DeepSpeed ZeRO on 2 gloo processes,
with ProgtuningCallback and progtuning's DeepSpeed refusal bypassed on purpose, and reports how far
parameters moved while they were frozen. Under DDP and FSDP the same parameters stay bit-identical.
DeepSpeed is not a dependency of progtuning; install it beside the CPU torch only for this::

    pip install deepspeed==0.19.8 torch==2.13.0        # no CUDA torch; CPU ops compile on first use (minutes)
    STAGE=2 SCHEDULE=shrink torchrun --standalone --nproc_per_node 2 benchmarks/deepspeed_freezing.py
    STAGE=3 SCHEDULE=grow torchrun --standalone --nproc_per_node 2 benchmarks/deepspeed_freezing.py

Schedules: ``shrink`` (the paper's, 3 stages: block 0 and the embeddings freeze at step 6) and
``grow`` (block 0 frozen until step 12, the embeddings never trained). 48 rows, batch 4 per process,
3 epochs = 18 steps, AdamW lr 1e-3, weight decay 0.01. Prints one JSON line on rank 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models of the test suite

import torch  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    import deepspeed
    from conftest import tiny_dataset, tiny_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import progtuning.core.distributed as distributed
    from progtuning.core.callback import ProgtuningCallback
    from progtuning.core.schedule import explicit, progressive

    distributed._deepspeed_enabled = lambda args=None: False  # bypass the refusal: this measures why it exists
    stage, name = int(os.environ.get("STAGE", "2")), os.environ.get("SCHEDULE", "shrink")
    schedule = (progressive(4, 3, embeddings="first_stage") if name == "shrink"
                else explicit(4, [[3], [2, 3], [0, 1, 2, 3]], embeddings="never"))
    config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        # threshold 0: ZeRO-3 partitions even this tiny model's parameters (by default it keeps those under 1e5 whole)
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"}},
    }

    def snapshot(model):
        params = list(model.named_parameters())
        partitioned = any(hasattr(p, "ds_id") and p.data.numel() == 0 for _, p in params)  # ZeRO-3 outside forward
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=partitioned):
            return partitioned, {n: p.detach().clone() for n, p in params}

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.weights, self.partitioned = {}, []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step in (6, 12):
                partitioned, self.weights[state.global_step] = snapshot(model)
                self.partitioned.append(partitioned)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            partitioned, self.weights[18] = snapshot(model)
            self.partitioned.append(partitioned)

    args = TrainingArguments(
        output_dir=os.environ.get("OUT", "/tmp/deepspeed_freezing"), use_cpu=True, report_to=[],
        per_device_train_batch_size=4, num_train_epochs=3, learning_rate=1e-3, weight_decay=0.01,
        save_strategy="no", deepspeed=config, seed=0, disable_tqdm=True, logging_steps=100,
    )
    snapshots = Snapshots()
    trainer = Trainer(model=tiny_model("bert", num_layers=4), args=args, train_dataset=tiny_dataset(48),
                      callbacks=[ProgtuningCallback(schedule), snapshots])
    trainer.train()

    def moved(start: int, end: int, prefix: str) -> float:
        a, b = snapshots.weights[start], snapshots.weights[end]
        return max((b[n] - a[n]).abs().max().item() for n in a if n.startswith(prefix))

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({
            "zero": stage, "schedule": name, "partitioned": snapshots.partitioned,
            "block0_moved_steps_6_12": moved(6, 12, "bert.encoder.layer.0."),
            "block0_moved_steps_12_18": moved(12, 18, "bert.encoder.layer.0."),
            "embeddings_moved_steps_6_18": moved(6, 18, "bert.embeddings."),
        }), flush=True)


if __name__ == "__main__":
    main()
