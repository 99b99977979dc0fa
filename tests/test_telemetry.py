"""StageTelemetry beside ProgtuningCallback: per-stage wall time and memory, merged into the stage records."""

from __future__ import annotations

from conftest import tiny_dataset, tiny_model
from transformers import Trainer, TrainingArguments

from progtuning.core.callback import ProgtuningCallback
from progtuning.core.telemetry import StageTelemetry


def _trainer(tmp_path, callbacks) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    return Trainer(model=tiny_model("bert", num_layers=4), args=args, train_dataset=tiny_dataset(16), callbacks=callbacks)


def test_each_stage_gets_its_time_and_memory(tmp_path):
    progtuning = ProgtuningCallback(num_stages=2, embeddings="always")
    telemetry = StageTelemetry(progtuning)
    _trainer(tmp_path, [progtuning, telemetry]).train()
    records = telemetry.stage_records()
    spans = progtuning.stage_records()
    # the core callback's records, unchanged, with the measured cost beside them
    assert [{k: r[k] for k in spans[0]} for r in records] == spans
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in records] == [(0, 0, 4), (1, 4, 8)]
    for record in records:
        assert record["wall_time_s"] > 0 and record["peak_rss_mb"] > 0
        assert record["peak_gpu_mb"] is None  # CPU run


def test_the_core_callback_measures_nothing(tmp_path):
    progtuning = ProgtuningCallback(num_stages=2, embeddings="always")
    _trainer(tmp_path, [progtuning]).train()
    assert set(progtuning.stage_records()[0]) == {"stage", "start_step", "end_step", "trainable_params",
                                                  "mean_train_loss"}
    import progtuning.core.callback as callback_module

    assert not hasattr(callback_module, "psutil")  # memory sampling lives in core.telemetry
