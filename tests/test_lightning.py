"""The Lightning callback: a tiny BERT in a LightningModule, Trainer(max_epochs=3), CPU.

Each epoch exactly the scheduled blocks change (every other parameter stays bit-identical), and a
run resumed from its checkpoint (``ckpt_path``) trains the stage of the epoch it resumes in.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning", reason="the lightning extra is not installed: pip install 'progtuning[lightning]'")

from conftest import tiny_dataset, tiny_model  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from progtuning.core.blocks import find_blocks  # noqa: E402
from progtuning.errors import ProgtuningError  # noqa: E402
from progtuning.integrations.lightning import ProgtuningFinetuning  # noqa: E402


class Classifier(LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_model("bert", num_layers=4)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)

    def train_dataloader(self):
        return DataLoader(tiny_dataset(16), batch_size=4, collate_fn=default_data_collator)


class ChangedBlocks(Callback):
    """Which blocks (and whether embeddings / head) changed during each epoch."""

    def __init__(self):
        self.epochs: dict[int, set] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self._before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_epoch_end(self, trainer, pl_module):
        groups = find_blocks(pl_module.model).groups
        changed = {groups[n] for n, p in pl_module.model.named_parameters() if not torch.equal(p, self._before[n])}
        self.epochs[trainer.current_epoch] = changed


def _trainer(tmp_path, max_epochs, *callbacks):
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=list(callbacks))


def _expected():
    # 4 blocks, 3 stages: parts [0], [1], [2, 3]; embeddings and head train in every stage
    return {0: {0, 1, 2, 3, "embeddings", "head"}, 1: {1, 2, 3, "embeddings", "head"}, 2: {2, 3, "embeddings", "head"}}


def test_each_epoch_trains_exactly_the_scheduled_blocks(tmp_path):
    torch.manual_seed(0)
    spy, progtuning = ChangedBlocks(), ProgtuningFinetuning(embeddings="always")
    _trainer(tmp_path, 3, progtuning, spy).fit(Classifier())
    assert spy.epochs == _expected()
    assert progtuning.schedule.num_stages == 3 and progtuning.freezer.stage_index == 2
    frozen = [p for n, p in progtuning.freezer.params.items() if find_blocks(progtuning.freezer.model).groups[n] in (0, 1)]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_a_resumed_run_trains_the_stage_of_its_epoch(tmp_path):
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 2, ProgtuningFinetuning(num_stages=3, embeddings="always"), checkpoints).fit(Classifier())
    last = str(tmp_path / "ckpt" / "last.ckpt")

    spy, progtuning = ChangedBlocks(), ProgtuningFinetuning(num_stages=3, embeddings="always")
    _trainer(tmp_path, 3, progtuning, spy).fit(Classifier(), ckpt_path=last)
    assert spy.epochs == {2: _expected()[2]}  # only epoch 3 ran, in stage 3
    assert progtuning.freezer.stage_index == 2

    with pytest.raises(ProgtuningError, match="was made with another schedule"):
        _trainer(tmp_path, 3, ProgtuningFinetuning(num_stages=2, embeddings="always")).fit(Classifier(), ckpt_path=last)
