"""The fine-tuning methods by name, and the module that implements each.

A method is one module of this package defining ``METHOD``, an instance of
:class:`~progtuning.methods.base.Method`. The registry maps names to those modules and imports a
module only when its method is used, so reading a config (which checks the name) needs no torch.
Adding a method: write ``methods/<name>.py`` and add one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from progtuning.errors import ProgtuningError

if TYPE_CHECKING:
    from progtuning.methods.base import Method

# name -> the module defining METHOD, in the order tables list the methods
METHODS: dict[str, str] = {
    "full": "progtuning.methods.full",
    "lora": "progtuning.methods.lora",
    "adapter": "progtuning.methods.adapter",
    "bitfit": "progtuning.methods.bitfit",
    "peft": "progtuning.methods.peft",  # any peft method, from a peft config JSON
}


def get_method(name: str) -> Method:
    """The method registered as ``name``; a one-line error names the known ones."""
    if name not in METHODS:
        raise ProgtuningError(f"unknown fine-tuning method {name!r}: use one of {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name]).METHOD


def method_rank(name: str) -> tuple[int, str]:
    """Sort key that lists methods in registry order (unknown names last, alphabetically)."""
    order = list(METHODS)
    return (order.index(name) if name in order else len(order), name)
