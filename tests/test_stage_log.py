"""The stage as logging integrations and the console see it (tiny BERT in a real Trainer, CPU).

A spy callback listed *before* the ProgtuningCallback stands where the Trainer puts its report_to
integrations: with :class:`StageLogging` mixed into the Trainer it receives the stage values with
every training log; TensorBoard's event files hold them; a switch prints one line.
"""

from __future__ import annotations

import importlib.util
import logging
import struct
from pathlib import Path

import pytest
from conftest import tiny_dataset, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from progtuning.core.callback import ProgtuningCallback
from progtuning.core.counting import count_updates
from progtuning.core.schedule import explicit, progressive
from progtuning.core.stage_log import StageLogging, block_ranges, switch_line
from progtuning.errors import ProgtuningError

KEYS = ("progtuning_stage", "trainable_params", "updated_params")


class Spy(TrainerCallback):
    """Records every ``logs`` dict the Trainer hands its callbacks (as an integration would)."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class LoggingTrainer(StageLogging, Trainer):
    pass


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                  num_train_epochs=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0,
                  disable_tqdm=True, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _fit(tmp_path, callbacks, trainer_cls=LoggingTrainer, **overrides):
    trainer = trainer_cls(model=tiny_model("bert", num_layers=4), args=_args(tmp_path, **overrides),
                          train_dataset=tiny_dataset(16), eval_dataset=tiny_dataset(8, seed=1), callbacks=callbacks)
    trainer.train()
    return trainer


def test_an_integration_listed_before_the_callback_receives_the_stage_with_every_training_log(tmp_path, caplog):
    spy, progtuning = Spy(), ProgtuningCallback(progressive(4, 2))
    with caplog.at_level(logging.INFO, logger="progtuning"):
        trainer = _fit(tmp_path, [spy, progtuning])
    training = [logs for logs in spy.logs if "loss" in logs]
    assert len(training) == 8  # 2 epochs x 4 steps, one log each
    assert [logs["progtuning_stage"] for logs in training] == [0] * 4 + [1] * 4
    first, second = (r["trainable_params"] for r in progtuning.stage_records())
    assert [logs["trainable_params"] for logs in training] == [first] * 4 + [second] * 4
    # updated parameters so far: one step of stage t adds a quarter epoch of its trainable parameters
    expected = [round(first * min(s, 4) / 4 + second * max(s - 4, 0) / 4) for s in range(1, 9)]
    assert [logs["updated_params"] for logs in training] == expected
    total = count_updates(progtuning.freezer, [4, 4], epochs=2).updated_params
    assert training[-1]["updated_params"] == total
    # the Trainer's own history carries the same values
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [tuple(e[k] for k in KEYS) for e in history] == [tuple(logs[k] for k in KEYS) for logs in training]
    # one console line per switch: the stage, what froze, what trains now
    lines = [r.getMessage() for r in caplog.records if r.name == "progtuning" and "stage" in r.getMessage()]
    assert lines == [
        f"progtuning: stage 1/2 from step 0: training blocks 0-3, embeddings, head ({first:,} parameters)",
        f"progtuning: stage 2/2 from step 4: blocks 0-1 froze; training blocks 2-3, embeddings, head ({second:,} parameters)",
    ]
    # evaluate() returns the dict it logged: it stays untagged
    scores = trainer.evaluate()
    assert "eval_loss" in scores and not set(KEYS) & set(scores)


def test_a_plain_trainer_tags_the_logs_of_the_callbacks_after_it(tmp_path):
    spy = Spy()
    _fit(tmp_path, [ProgtuningCallback(progressive(4, 2)), spy], trainer_cls=Trainer)
    training = [logs for logs in spy.logs if "loss" in logs]
    assert training and all(set(KEYS) <= set(logs) for logs in training)
    assert training[-1]["progtuning_stage"] == 1


def test_switch_lines_for_frozen_embeddings_growing_stages_and_a_resume():
    model = tiny_model("bert", num_layers=4)
    from progtuning.core.freezing import ProgressiveFreezer

    freezer = ProgressiveFreezer(model, explicit(4, [[3], [2, 3], [0, 1, 2, 3]], embeddings="first_stage"))
    first = freezer.apply(0)
    assert switch_line(first, freezer, 0).startswith("progtuning: stage 1/3 from step 0: training block 3, embeddings, head")
    second = freezer.apply(1)
    assert "embeddings froze; block 2 started training; training blocks 2-3, head" in switch_line(second, freezer, 5)
    freezer.stage_index = None
    resumed = freezer.apply(2)
    assert switch_line(resumed, freezer, 9).startswith("progtuning: stage 3/3 from step 9: resumed; training blocks 0-3")
    assert block_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def _event_tags(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars in TensorBoard event files: a TFRecord stream of Event protos (tensorboardX's own proto)."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + length])  # 8 length + 4 CRC bytes, then the record
            i += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return tags


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None,
                    reason="tensorboardX is not installed (the test extra brings it): no event files to read")
def test_tensorboard_event_files_hold_the_stage(tmp_path):
    trainer = _fit(tmp_path, [ProgtuningCallback(progressive(4, 2))], report_to=["tensorboard"])
    tags = _event_tags(Path(trainer.args.output_dir))
    assert [value for _, value in tags["train/progtuning_stage"]] == [0.0] * 4 + [1.0] * 4
    assert [step for step, _ in tags["train/updated_params"]] == list(range(1, 9))
    assert tags["train/trainable_params"][0][1] > tags["train/trainable_params"][-1][1]


def test_report_to_is_checked_in_one_line():
    from progtuning.runs.reporting import check_report_to, report_to_list

    assert report_to_list("none") == [] and report_to_list("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    with pytest.raises(ProgtuningError, match="unknown report_to 'tensorbord': use none or one of"):
        check_report_to("tensorbord")
    with pytest.raises(ProgtuningError, match="report_to 'all' would start every installed integration"):
        check_report_to("all")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ProgtuningError, match="report_to wandb needs its package: pip install wandb"):
            check_report_to("wandb")
