"""The validation score after each epoch against the training time spent so far (``validation_curve``).

"How long does Progtuning take to reach the baseline's validation score?" needs, per run, the
score after every evaluation beside the training time up to it. :class:`ValidationCurve` is a
Trainer callback that records ``{epoch, step, train_time_s, score}`` at every evaluation during
training, evaluation time excluded (it starts the clock at train begin and stops it from an
epoch's end to the end of that epoch's evaluation; checkpoint saving, which follows the evaluation,
counts as training time, as it does in ``train_time_s``).

The points travel in every checkpoint (``trainer_state.json``, ``stateful_callbacks``), so a
resumed run keeps the points of its first part and continues their clock.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

STATE_KEY = "validation_curve"


class ValidationCurve(TrainerCallback):
    """Records the validation ``metric`` after each evaluation during training (``None``: records nothing)."""

    def __init__(self, metric: str | None):
        self.metric = metric
        self.points: list[dict] = []
        self._training = False
        self._started = 0.0  # perf_counter at train begin, moved back by the time a resumed run had spent
        self._eval_time = 0.0  # evaluation time so far (not training)
        self._eval_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._training, self._eval_time, self._eval_started = True, 0.0, None
        saved = (state.stateful_callbacks or {}).get(STATE_KEY) if state.global_step > 0 else None
        self.points = list(saved["points"]) if isinstance(saved, dict) else []
        spent = self.points[-1]["train_time_s"] if self.points else 0.0
        self._started = time.perf_counter() - spent

    def on_epoch_end(self, args, state, control, **kwargs):
        self._eval_started = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = f"eval_{self.metric}"
        if not self._training or self.metric is None or not metrics or key not in metrics:
            return
        now = time.perf_counter()
        eval_started = self._eval_started if self._eval_started is not None else now
        train_time = eval_started - self._started - self._eval_time
        self._eval_time += now - eval_started
        self._eval_started = None
        self.points.append(
            {"epoch": state.epoch, "step": state.global_step, "train_time_s": round(train_time, 3),
             "score": metrics[key]}
        )
        # saved with the checkpoint that follows this evaluation
        state.stateful_callbacks[STATE_KEY] = {"points": list(self.points)}

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
