"""Where a run reports as it trains: the Trainer's logging integrations (``--report-to``) and the console.

``report_to`` is ``none`` (the default: nothing leaves the machine) or a comma-separated list of
transformers' integrations: ``tensorboard``, ``wandb``, ``mlflow``, ``trackio``, ... Each receives
every training log with the stage values (:mod:`progtuning.core.stage_log`). Offline-safe:

* ``tensorboard`` writes event files under ``OUTPUT_DIR/checkpoints/runs/`` (``tensorboard --logdir OUTPUT_DIR``);
* ``mlflow`` logs to ``./mlruns`` unless ``MLFLOW_TRACKING_URI`` says otherwise;
* ``wandb`` without a login (no ``WANDB_API_KEY``, no ``~/.netrc`` entry) and without ``WANDB_MODE``
  logs offline (``wandb sync`` uploads it later) instead of asking for a key mid-run.

A name transformers does not know, or one whose package is missing, is refused in one line before
anything loads. :func:`show_progress_lines` puts the ``progtuning`` logger's INFO lines (a stage
switch, the cache) on the console of ``progtuning`` commands.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from progtuning.errors import ProgtuningError

logger = logging.getLogger("progtuning")

# integration -> what to install (the pip name); the rest are named after their package
_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet_ml", "azure_ml": "azureml-core"}


def report_to_list(value: str | list | None) -> list[str]:
    """``"tensorboard, wandb"`` → ``["tensorboard", "wandb"]``; ``none`` (or nothing) → ``[]``."""
    if value is None:
        return []
    names = value if isinstance(value, list) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    return [] if names in ([], ["none"]) else names


def check_report_to(value: str | list | None) -> list[str]:
    """The integrations asked for, each known to transformers and installed, or a one-line error."""
    names = report_to_list(value)
    if not names:
        return []
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    known = sorted(INTEGRATION_TO_CALLBACK)
    for name in names:
        if name == "all":
            raise ProgtuningError("report_to 'all' would start every installed integration: name them "
                                  f"({', '.join(known)})")
        if name not in known:
            raise ProgtuningError(f"unknown report_to {name!r}: use none or one of {', '.join(known)}")
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in available:
            extra = " (or tensorboardX)" if name == "tensorboard" else ""
            raise ProgtuningError(
                f"report_to {name} needs its package: pip install {_PACKAGES.get(name, name)}{extra}"
            )
    if "wandb" in names:
        _wandb_offline_without_login()
    return names


def _wandb_offline_without_login() -> None:
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"
    logger.info("progtuning: wandb has no login here, so it logs offline (upload later with `wandb sync`)")


class _ConsoleHandler(logging.Handler):
    """Writes through tqdm, so a line does not tear the Trainer's progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break a run
            self.handleError(record)


def show_progress_lines() -> None:
    """Show the ``progtuning`` logger's INFO lines on stderr (once per process)."""
    if any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        return
    handler = _ConsoleHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
