"""Run ``progtuning`` and kill it (or make it fail) at a chosen point — for the crash-safety tests.

    python tests/crash_runner.py --crash step:12:KILL -- train ... # SIGKILL at on_step_begin of step 12
    python tests/crash_runner.py --crash save:16:KILL -- train ... # SIGKILL while checkpoint-16 is half-written
    python tests/crash_runner.py --crash step:5:TERM -- train ...  # SIGTERM (a clean stop is expected)
    python tests/crash_runner.py --crash nan:5 -- train ...        # the loss of step 6 (0-based 5) is NaN
    torchrun ... tests/crash_runner.py --crash step:5:TERM:1 -- train ...   # only rank 1 gets the signal

``step:N`` fires at ``on_step_begin`` of 0-based optimizer step N, after the stage for that step was
applied (so ``step:16`` on a stage boundary is a kill right at the switch). ``save:N`` fires inside
the checkpoint of global step N, after the model and optimizer files are written and before the RNG
and trainer state. The signals are real (``os.kill`` on this process), nothing is simulated.
"""

from __future__ import annotations

import os
import signal
import sys


def install(crash: str) -> None:
    import torch

    from progtuning.core.callback import ProgtuningCallback

    kind, step, *rest = crash.split(":")
    step = int(step)
    signum = getattr(signal, f"SIG{rest[0]}") if rest else signal.SIGKILL
    if len(rest) > 1 and os.environ.get("RANK", "0") != rest[1]:
        return  # another rank's crash

    if kind == "step":
        original = ProgtuningCallback.on_step_begin

        def on_step_begin(self, args, state, control, **kwargs):
            result = original(self, args, state, control, **kwargs)
            if state.global_step == step:
                print(f"crash_runner: {signal.Signals(signum).name} at step {step}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signum)
            return result

        ProgtuningCallback.on_step_begin = on_step_begin
    elif kind == "save":
        from progtuning.runs.checkpoints import ProgtuningTrainer

        original_rng = ProgtuningTrainer._save_rng_state

        def save_rng_state(self, output_dir):
            if self.state.global_step == step:
                print(f"crash_runner: {signal.Signals(signum).name} while saving {output_dir}", file=sys.stderr,
                      flush=True)
                os.kill(os.getpid(), signum)
            return original_rng(self, output_dir)

        ProgtuningTrainer._save_rng_state = save_rng_state
    elif kind == "nan":
        original = ProgtuningCallback.on_step_begin

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            result = original(self, args, state, control, model=model, **kwargs)
            if state.global_step == step and model is not None:
                with torch.no_grad():  # a weight blows up: every later loss is NaN
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
            return result

        ProgtuningCallback.on_step_begin = on_step_begin
    else:
        raise SystemExit(f"unknown crash kind {kind!r}")


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--crash"]:
        install(argv[1])
        argv = argv[2:]
    rest = argv[1:] if argv[:1] == ["--"] else argv  # (torchrun drops a "--" right after the script)
    from progtuning.runs.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
