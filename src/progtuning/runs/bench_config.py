"""The settings of ``progtuning bench``: one dataclass that is also its command line.

Each :class:`BenchConfig` field is one option (``--hidden 384``; a boolean that defaults to on is
``--no-<name>``; a tuple is comma-separated), with the help text and choices from the field's
metadata, so the options, their defaults and the ``config`` block of the bench's JSON never
disagree. Importing this module needs no torch: ``progtuning --help`` builds its parser from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from progtuning.errors import ProgtuningError

ARCHS = ("bert", "roberta", "mpnet", "electra", "distilbert")
POLICIES = ("always", "first_stage", "never")
CLOCKS = ("auto", "cpu", "wall")


def _option(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class BenchConfig:
    """The model shape, the cases to measure and how (see :mod:`progtuning.runs.bench`)."""

    arch: str = _option("bert", "model family of the random model", choices=ARCHS)
    hidden: int = _option(384, "hidden size")
    layers: int = _option(12, "blocks")
    heads: int = _option(12, "attention heads")
    intermediate: int = _option(1536, "feed-forward size")
    vocab: Optional[int] = _option(None, "vocabulary size (default: the architecture's)")
    seq: int = _option(128, "sequence length (no padding)")
    batch: int = _option(16, "training batch for the timings")
    stages: int = _option(4, "T: parts/stages (= epochs)")
    rounds: int = _option(3, "rounds; every case runs once per round")
    steps: int = _option(2, "timed steps per case per round")
    threads: Optional[int] = _option(1, "torch CPU threads (0: torch's choice)")
    device: str = _option("auto", "auto | cpu | cuda")
    dropout: float = _option(0.1, "hidden and attention dropout of the model")
    policies: tuple[str, ...] = _option(POLICIES, "embedding policies, comma-separated")
    cache: bool = _option(True, "measure the frozen-prefix cache cases")
    eval_off: bool = _option(True, "measure frozen blocks kept in train mode (dropout on) too")
    lora: bool = _option(True, "measure the LoRA cases")
    lora_r: int = _option(8, "LoRA rank")
    memory_batch: Optional[int] = _option(32, "batch of the memory pass (0: skip it)")
    overhead: bool = _option(True, "measure the Trainer callback overhead")
    overhead_steps: int = _option(3, "Trainer steps per overhead run")
    seed: int = _option(0, "seed of the model and the batches")
    clock: str = _option(
        "auto", "cpu: process CPU time (auto with 1 CPU thread); wall: elapsed time (auto otherwise)", choices=CLOCKS
    )

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ProgtuningError(f"unknown --arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.hidden % self.heads:
            raise ProgtuningError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        for name in ("layers", "seq", "batch", "stages", "rounds", "steps"):
            if getattr(self, name) < 1:
                raise ProgtuningError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.clock not in CLOCKS:
            raise ProgtuningError(f"unknown --clock {self.clock!r}: use auto, cpu or wall")
        if self.stages > self.layers:
            raise ProgtuningError(f"--stages {self.stages} needs at least as many --layers, got {self.layers}")
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise ProgtuningError(f"unknown embedding policy {bad[0]!r}: use {', '.join(POLICIES)}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


_TYPES = typing.get_type_hints(BenchConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`BenchConfig` field, plus ``--json PATH`` (where to write the results)."""
    for f in dataclasses.fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _TYPES[f.name]
        base = kind
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X; tuple[str, ...] stays a tuple
            base = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = f.metadata["help"]
        if base is bool and f.default:
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                help=f"skip: {help_text}")
        elif base is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, dest=f.name, default=f.default, type=_comma_separated, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=f.default, type=base, choices=f.metadata.get("choices"),
                                help=f"{help_text} [{f.default}]")
    parser.add_argument("--json", dest="json_path", help="write the results here")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})


def _comma_separated(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
