"""User-facing errors and warnings: a mistake the user can fix (bad config, unknown task or model, ...).

Raise :class:`ProgtuningError` with one line that names the problem and the fix. The CLI prints
it as ``error: <message>`` and exits with code 2; anything else is an internal bug and keeps its
traceback. :func:`warn` prints a one-line ``warning: ...`` for what the user should know but
need not fix.
"""

from __future__ import annotations


class ProgtuningError(Exception):
    """A problem in the user's input, with a one-line message that names the fix."""


def warn(message: str) -> None:
    """Print ``warning: <message>`` on one line of stderr, once (from the first process of a launch)."""
    import os
    import sys

    if os.environ.get("RANK", "0") == "0":  # torchrun's rank, known before any process group exists
        print(f"warning: {message}", file=sys.stderr, flush=True)
