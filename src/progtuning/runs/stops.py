"""Clean stops of a Trainer run: SIGTERM / Ctrl-C save a checkpoint and stop; a NaN loss stops before the step.

* :class:`StopOnSignal`: SIGTERM or Ctrl-C finishes the current optimizer step, saves a checkpoint
  and stops (all ranks agree on the step); ``progtuning train`` then raises :class:`TrainingStopped`,
  which the CLI turns into one line saying how to resume, and exit code 128 + the signal number.
* :class:`StopOnNonFiniteLoss`: a NaN/inf training loss stops the run before the optimizer step,
  naming the step and the stage; nothing is saved, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch
from transformers import TrainerCallback

from progtuning.errors import ProgtuningError
from progtuning.runs.checkpoint_files import last_checkpoint


class TrainingStopped(ProgtuningError):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signal_name: str, signum: int, step: int, stage: int | None, checkpoint: str | None):
        self.signal_name, self.signum, self.step, self.stage, self.checkpoint = signal_name, signum, step, stage, checkpoint
        self.exit_code = 128 + signum
        super().__init__(self.message())

    def message(self, resume_command: str | None = None) -> str:
        where = f"step {self.step}" + (f" (stage {self.stage})" if self.stage is not None else "")
        saved = f"checkpoint {self.checkpoint} saved" if self.checkpoint else "no checkpoint saved"
        how = f"resume with: {resume_command}" if resume_command else "resume with the same command plus --resume"
        return f"stopped by {self.signal_name} at {where}, {saved}: {how}"


class NonFiniteLoss(ProgtuningError):
    """The training loss (or the weights about to be saved) stopped being finite."""


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT (Ctrl-C): finish the optimizer step, save a checkpoint, stop.

    The handlers are installed at ``on_train_begin`` (main thread only) and the previous ones come
    back at ``on_train_end``. A second Ctrl-C interrupts at once. With several processes the ranks
    all-reduce the flag after every step, so they all stop (and save) at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._at_epoch_end = False
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.stopped_at = None, None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "(Ctrl-C again to interrupt at once)", file=sys.stderr, flush=True)
        if signum == signal.SIGINT:
            previous = self._previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.received or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same step, or the others would wait forever in the next all-reduce
            device = args.device if "nccl" in str(torch.distributed.get_backend()) else "cpu"
            tensor = torch.tensor([flag], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = int(tensor.item())
            if flag and self.received is None:
                self.received = flag
        if flag:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            # At the end of an epoch the Trainer evaluates and then saves (on_epoch_end): keep that order, so
            # the checkpoint holds the same RNG state as an uninterrupted run's (evaluation draws from it).
            self._at_epoch_end = abs(state.epoch - round(state.epoch)) < 1e-9
            if not self._at_epoch_end:
                control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is None:
            return
        if self._at_epoch_end:
            control.should_save = True
        else:  # saved at the step's end already; no evaluation of a half epoch
            control.should_save = False
            control.should_evaluate = False

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise :class:`NonFiniteLoss` as soon as a training forward returns a NaN/inf loss.

    A forward hook on the model reads ``outputs.loss`` (the Trainer's logged mean hides NaNs, see
    ``logging_nan_inf_filter``); raising there stops the run before backward and the optimizer
    step, so no checkpoint of the broken state is written. ``progtuning`` is the
    :class:`~progtuning.core.callback.ProgtuningCallback` whose stage the message names. Costs one
    host-device sync per micro-batch.
    """

    def __init__(self, progtuning=None) -> None:
        self.progtuning = progtuning
        self._hook = None
        self._step = 0
        self._run_dir: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run_dir = args.output_dir
        self.close()
        if model is not None:
            self._hook = model.register_forward_hook(self._check)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the loss hook (``on_train_end`` does it; call it yourself if ``train()`` raised)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _check(self, module, inputs, output) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all()):
            return
        value = "nan" if bool(torch.isnan(loss.detach()).any()) else "inf"
        freezer = getattr(self.progtuning, "freezer", None)
        stage = f" (stage {freezer.stage_index})" if freezer is not None and freezer.stage_index is not None else ""
        last = last_checkpoint(self._run_dir) if self._run_dir else None
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLoss(
            f"the training loss is {value} at step {self._step + 1}{stage}: training stopped before the optimizer "
            f"step and nothing was saved; {keep} (lower learning_rate, or check the data, then resume)"
        )
