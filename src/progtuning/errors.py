"""User-facing errors: a mistake the user can fix (bad config, unknown task or model, ...).

Raise :class:`ProgtuningError` with one line that names the problem and the fix. The CLI prints
it as ``error: <message>`` and exits with code 2; anything else is an internal bug and keeps its
traceback.
"""

from __future__ import annotations


class ProgtuningError(Exception):
    """A problem in the user's input, with a one-line message that names the fix."""
