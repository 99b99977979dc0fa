"""ProgtuningCallback inside a real ``transformers.Trainer`` (tiny BERT, CPU).

Covers: stage switches at the planned optimizer steps (also with gradient accumulation and an epoch
that does not divide evenly), log lines tagged with the stage, frozen weights untouched after the
switch, exact resume from a checkpoint, a refused resume with another schedule, and the parity test:
the callback-driven Trainer run and a plain PyTorch loop over ``ProgressiveFreezer`` give bit-identical
weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_dataset, tiny_model
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.optimization import get_linear_schedule_with_warmup

from progtuning.core.callback import STATE_KEY, ProgtuningCallback
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.core.schedule import progressive

LR = 1e-3


def _args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=LR,
        weight_decay=0.0,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class SequentialTrainer(Trainer):
    """The Trainer with its batches in dataset order, so a plain loop can feed the very same batches."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class Snapshot(TrainerCallback):
    """Copies every parameter at ``on_step_begin`` of optimizer step ``step`` (after the stage switch)."""

    def __init__(self, step: int):
        self.step = step
        self.params: dict[str, torch.Tensor] | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step and self.params is None:
            self.params = {n: p.detach().clone() for n, p in model.named_parameters()}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(tmp_path, callbacks, dataset=None, trainer_cls=Trainer, resume=None, seed=0, **overrides):
    model = tiny_model("bert", num_layers=4, seed=seed)
    trainer = trainer_cls(
        model=model,
        args=_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else tiny_dataset(16),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _block_names(model, blocks) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(n.startswith(f"bert.encoder.layer.{b}.") for b in blocks)]


# -- stage switches ------------------------------------------------------------------------------------------
def test_stages_switch_at_planned_steps_and_logs_carry_the_stage(tmp_path):
    callback = ProgtuningCallback(num_stages=2, embeddings="always")
    snapshot = Snapshot(step=4)
    trainer = _train(tmp_path, [callback, snapshot])
    model = trainer.model
    assert trainer.state.global_step == 8
    assert callback.steps_per_epoch == 4 and callback.total_steps == 8
    assert callback.schedule == progressive(4, 2)
    records = callback.stage_records()
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in records] == [(0, 0, 4), (1, 4, 8)]
    total = sum(p.numel() for p in model.parameters())
    frozen = _block_names(model, [0, 1])
    frozen_numel = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    assert [r["trainable_params"] for r in records] == [total, total - frozen_numel]
    assert all(r["mean_train_loss"] is not None for r in records)
    assert [(c.stage, c.previous) for c in callback.changes] == [(0, None), (1, 0)]
    assert callback.changes[1].frozen == tuple(frozen)

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in step_logs] == list(range(1, 9))
    # the log of step s reports the stage that ran update s-1 (0-based): updates 0-3 stage 0, 4-7 stage 1
    assert [entry["progtuning_stage"] for entry in step_logs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [entry["trainable_params"] for entry in step_logs] == [total] * 4 + [total - frozen_numel] * 4

    # the AdamW moments of the frozen blocks were dropped through the Trainer's accelerate wrapper
    inner = trainer.optimizer.optimizer
    params = dict(model.named_parameters())
    assert not any(params[name] in inner.state for name in frozen)
    assert all(params[name] in inner.state for name in params if name not in frozen)

    # frozen blocks are bit-identical to their values at the switch, everything else moved on
    final = _params(model)
    for name, value in snapshot.params.items():
        if name in frozen:
            assert torch.equal(final[name], value), name
            assert not dict(model.named_parameters())[name].requires_grad
        else:
            assert not torch.equal(final[name], value), name


def test_switch_counts_optimizer_updates_with_gradient_accumulation(tmp_path):
    callback = ProgtuningCallback(num_stages=2, embeddings="always")
    snapshot = Snapshot(step=4)
    # 16 rows, batch 2: 8 micro-batches per epoch, 4 optimizer updates per epoch
    trainer = _train(tmp_path, [callback, snapshot], per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert trainer.state.global_step == 8
    assert callback.steps_per_epoch == 4
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in callback.stage_records()] == [(0, 0, 4), (1, 4, 8)]
    final = _params(trainer.model)
    for name in _block_names(trainer.model, [0, 1]):
        assert torch.equal(final[name], snapshot.params[name]), name
    for name in _block_names(trainer.model, [2, 3]):
        assert not torch.equal(final[name], snapshot.params[name]), name


def test_switch_with_uneven_last_accumulation_step(tmp_path):
    callback = ProgtuningCallback(num_stages=2, embeddings="always")
    # 20 rows, batch 4: 5 micro-batches per epoch, accumulation 2 -> 3 updates per epoch (the last of 1 batch)
    trainer = _train(tmp_path, [callback], dataset=tiny_dataset(20), gradient_accumulation_steps=2)
    assert trainer.state.global_step == 6
    assert callback.steps_per_epoch == 3
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in callback.stage_records()] == [(0, 0, 3), (1, 3, 6)]


def test_fraction_stages_in_a_one_epoch_run(tmp_path):
    callback = ProgtuningCallback(num_stages=2, unit="fraction", embeddings="always")
    _train(tmp_path, [callback], num_train_epochs=1)
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in callback.stage_records()] == [(0, 0, 2), (1, 2, 4)]


def test_default_stages_follow_the_epochs(tmp_path):
    callback = ProgtuningCallback(embeddings="always")
    _train(tmp_path, [callback], num_train_epochs=4, dataset=tiny_dataset(8))
    assert callback.schedule == progressive(4, 4)
    assert [(r["start_step"], r["end_step"]) for r in callback.stage_records()] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_default_stages_follow_the_epochs_of_a_max_steps_run(tmp_path):
    callback = ProgtuningCallback(embeddings="always")
    # 8 rows, batch 4: 2 updates per epoch; max_steps=8 is a 4-epoch run (num_train_epochs keeps its default 3)
    _train(tmp_path, [callback], dataset=tiny_dataset(8), num_train_epochs=3, max_steps=8)
    assert callback.schedule == progressive(4, 4)


def test_second_train_call_starts_again_from_stage_zero(tmp_path):
    callback = ProgtuningCallback(num_stages=2, embeddings="always")
    model = tiny_model("bert", num_layers=4)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=tiny_dataset(16), callbacks=[callback])
    trainer.train()
    after_first = _params(model)
    trainer.train()  # a new run on the trained model: stage 0 trains every block again
    assert len(callback.freezer.method_trainable) == len(after_first)
    for name in _block_names(model, [0, 1]):
        assert not torch.equal(dict(model.named_parameters())[name], after_first[name]), name


# -- checkpoints and resume ------------------------------------------------------------------------------------
def _checkpointed_run(tmp_path):
    callback = ProgtuningCallback(num_stages=2, embeddings="always")
    trainer = _train(tmp_path, [callback], save_strategy="steps", save_steps=2)
    return trainer, callback


def test_state_travels_in_every_checkpoint(tmp_path):
    trainer, callback = _checkpointed_run(tmp_path)
    with open(os.path.join(tmp_path, "checkpoint-6", "trainer_state.json")) as f:
        saved = json.load(f)["stateful_callbacks"][STATE_KEY]
    assert saved["stage"] == 1
    assert saved["schedule"] == progressive(4, 2).to_dict()
    assert saved["schedule_fingerprint"] == progressive(4, 2).fingerprint()
    assert saved["block_paths"] == [f"bert.encoder.layer.{i}" for i in range(4)]
    with open(os.path.join(tmp_path, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["stateful_callbacks"][STATE_KEY]["stage"] == 0


def test_resume_in_stage_one_matches_uninterrupted_run(tmp_path):
    full, _ = _checkpointed_run(tmp_path)
    expected = _params(full.model)
    assert os.path.isdir(tmp_path / "checkpoint-6")

    callback = ProgtuningCallback(num_stages=2, embeddings="always")
    # a differently initialised model: every weight must come from the checkpoint
    resumed = _train(tmp_path, [callback], save_strategy="no", resume=str(tmp_path / "checkpoint-6"), seed=1)
    assert resumed.state.global_step == 8
    assert [(c.stage, c.previous) for c in callback.changes] == [(1, None)]
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in callback.stage_records()] == [(1, 6, 8)]
    got = _params(resumed.model)
    # CPU, fixed seeds, a seedable sampler, restored RNG and optimizer state: bit-identical, because the
    # resumed steps replay the very same kernels on the very same data in this process.
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert not any(p.requires_grad for n, p in resumed.model.named_parameters()
                   if n in _block_names(resumed.model, [0, 1]))


def test_resume_in_stage_zero_then_switches(tmp_path):
    full, _ = _checkpointed_run(tmp_path)
    callback = ProgtuningCallback(num_stages=2, embeddings="always")
    resumed = _train(tmp_path, [callback], resume=str(tmp_path / "checkpoint-2"), seed=1)
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in callback.stage_records()] == [(0, 2, 4), (1, 4, 8)]
    got, expected = _params(resumed.model), _params(full.model)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_resume_with_another_schedule_is_refused(tmp_path):
    _checkpointed_run(tmp_path)
    callback = ProgtuningCallback(schedule=progressive(4, 2, embeddings="never"))
    with pytest.raises(ProgtuningError, match="made with another schedule") as info:
        _train(tmp_path, [callback], resume=str(tmp_path / "checkpoint-6"))
    assert "\n" not in str(info.value)
    with pytest.raises(ProgtuningError, match="made with another schedule"):
        _train(tmp_path, [ProgtuningCallback(num_stages=4, embeddings="always")], resume=str(tmp_path / "checkpoint-6"))


def test_resume_from_checkpoint_in_another_folder_with_another_schedule_is_refused(tmp_path):
    _checkpointed_run(tmp_path / "first")
    callback = ProgtuningCallback(schedule=progressive(4, 2, embeddings="never"))
    with pytest.raises(ProgtuningError, match="another schedule"):
        _train(tmp_path / "second", [callback], resume=str(tmp_path / "first" / "checkpoint-6"))


# -- parity: Trainer + callback == plain PyTorch loop + ProgressiveFreezer ---------------------------------------
def _plain_loop(dataset, epochs: int, batch_size: int) -> dict[str, torch.Tensor]:
    """What the Trainer does, written out: same init, batches, AdamW, linear schedule, clipping, freezing."""
    model = tiny_model("bert", num_layers=4, seed=0)
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    # Built over the whole trainable set before any stage is applied; the Trainer's defaults for adamw_torch.
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=SequentialSampler(dataset),
                        collate_fn=default_data_collator)
    steps_per_epoch = len(loader)
    total_steps = epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    step = 0
    model.zero_grad()
    for _ in range(epochs):
        for batch in loader:
            freezer.apply_for_step(step, steps_per_epoch, total_steps, optimizer)
            model.train()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            model.zero_grad()
            step += 1
    assert freezer.stage_index == 1
    return _params(model)


def test_parity_trainer_callback_vs_plain_loop(tmp_path):
    dataset = tiny_dataset(16)
    trainer = _train(tmp_path, [ProgtuningCallback(num_stages=2, embeddings="always")], dataset=dataset, trainer_cls=SequentialTrainer)
    expected = _plain_loop(dataset, epochs=2, batch_size=4)
    got = _params(trainer.model)
    assert got.keys() == expected.keys()
    # Bit-identical by construction: one process, the same model class, seed, batches and optimizer, so
    # the two runs execute the same kernels on the same data; any difference is a difference in what runs.
    mismatched = [n for n in expected if not torch.equal(got[n], expected[n])]
    assert mismatched == []
    # and the run really was progressive: blocks 0-1 differ from a run without freezing
    plain_full = _train(tmp_path / "full", [], dataset=dataset, trainer_cls=SequentialTrainer)
    full = _params(plain_full.model)
    name = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(full[name], got[name])


def test_one_resume_check_for_the_callback_and_for_progtuning_train():
    """The callback (as the Trainer resumes) and check_checkpoint (before anything loads) share one rule."""
    from progtuning.core.callback import check_resume_entry

    saved = {"schedule": progressive(4, 2).to_dict(), "schedule_fingerprint": progressive(4, 2).fingerprint(),
             "block_paths": [f"bert.encoder.layer.{i}" for i in range(4)]}
    check_resume_entry(saved, progressive(4, 2), saved["block_paths"], "checkpoint x")  # the same run: fine
    check_resume_entry(None, progressive(4, 3), [], "checkpoint x")  # no Progtuning entry: nothing to compare
    with pytest.raises(ProgtuningError, match=r"^checkpoint x was made with another model \(4 blocks, this one has 3\)"):
        check_resume_entry(saved, progressive(3, 2), saved["block_paths"][:3], "checkpoint x")
    with pytest.raises(ProgtuningError, match=r"another schedule \(progressive, 2 stages; this run: progressive, 4\)"):
        check_resume_entry(saved, progressive(4, 4), saved["block_paths"], "checkpoint x")
