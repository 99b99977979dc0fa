"""The fine-tuning method's settings: one dataclass, read by the methods, the YAML configs and the CLI.

:class:`MethodSettings` declares every method setting once, with its default and help text.
:class:`~progtuning.runs.config.TrainConfig` inherits these fields (so each one is a YAML key and a
``--flag``), and :class:`MethodConfig` adds the method's name, checks the values and is what
:func:`~progtuning.methods.api.save_method` writes as ``progtuning_method.json``. Importing this
module needs no torch: a config error is reported before any model code loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from progtuning.errors import ProgtuningError
from progtuning.methods.registry import METHODS

# the part of the head a PEFT method trains: peft's convention (the task's output layers), or the whole
# head (pooler and final norms too); see progtuning.methods.base
METHOD_HEADS: tuple[str, ...] = ("classifier", "classifier+pooler")

ADAPTER_TYPES: tuple[str, ...] = ("houlsby", "pfeiffer")
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu")


@dataclass
class MethodSettings:
    """Every method's settings; each is read by the method its name starts with (``peft_*``: peft)."""

    method_head: str = field(
        default="classifier",
        metadata={
            "help": "the part of the head LoRA, adapters, BitFit and peft train: classifier (peft's convention: "
            "classifier/score/qa_outputs only) or classifier+pooler (the whole head, pooler and final norms "
            "included); full fine-tuning trains everything"
        },
    )

    lora_r: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "module names LoRA wraps (a name matches itself or a dotted path ending in it); "
            "default: the attention query and value projections of the architecture"
        },
    )
    peft_config_path: Optional[str] = field(
        default=None,
        metadata={"help": "for method peft: a peft config JSON file (or a directory holding adapter_config.json)"},
    )
    adapter_type: str = field(
        default="houlsby",
        metadata={
            "help": "adapter placement: houlsby (after attention and feed-forward) or pfeiffer (after feed-forward)"
        },
    )
    adapter_reduction_factor: int = field(
        default=16, metadata={"help": "adapter bottleneck = hidden size // reduction factor"}
    )
    adapter_train_layernorm: Optional[bool] = field(
        default=None,
        metadata={"help": "also train the LayerNorms inside the blocks; default: true for houlsby, false for pfeiffer"},
    )
    adapter_activation: str = field(
        default="gelu", metadata={"help": "adapter nonlinearity: gelu (default; no dead units at init) or relu"}
    )


METHOD_HELP = f"fine-tuning method: {', '.join(METHODS)} (peft: any peft method, from peft_config_path)"


@dataclass
class MethodConfig(MethodSettings):
    """The fine-tuning method and its settings; also what :func:`save_method` writes as JSON."""

    name: str = field(default="full", metadata={"help": METHOD_HELP})

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ProgtuningError(f"unknown fine-tuning method {self.name!r}: use one of {', '.join(METHODS)}")
        if self.name == "peft" and not self.peft_config_path:
            raise ProgtuningError("method 'peft' needs peft_config_path: the path of a peft config JSON")
        if self.peft_config_path and self.name != "peft":
            raise ProgtuningError(
                f"peft_config_path is only read by method 'peft', not {self.name!r}: use name='peft' or drop the path"
            )
        if self.method_head not in METHOD_HEADS:
            raise ProgtuningError(f"unknown method_head {self.method_head!r}: use one of {', '.join(METHOD_HEADS)}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if self.lora_r < 1:
            raise ProgtuningError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ProgtuningError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ProgtuningError(f"unknown adapter type {self.adapter_type!r}: use one of {', '.join(ADAPTER_TYPES)}")
        if self.adapter_reduction_factor < 1:
            raise ProgtuningError(f"adapter_reduction_factor must be >= 1, got {self.adapter_reduction_factor}")
        if self.adapter_activation not in ACTIVATIONS:
            raise ProgtuningError(
                f"unknown adapter activation {self.adapter_activation!r}: use one of {', '.join(ACTIVATIONS)}"
            )

    @classmethod
    def from_settings(cls, name: str, settings: MethodSettings) -> "MethodConfig":
        """The method ``name`` with the method settings of ``settings`` (e.g. a ``TrainConfig``)."""
        return cls(name=name, **{f.name: getattr(settings, f.name) for f in fields(MethodSettings)})

    @property
    def train_layernorm(self) -> bool:
        """Whether the adapter method trains the block LayerNorms (Houlsby: yes, Pfeiffer: no, unless set)."""
        if self.adapter_train_layernorm is not None:
            return bool(self.adapter_train_layernorm)
        return self.adapter_type == "houlsby"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProgtuningError(f"unknown method setting(s) {unknown}: known settings are {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MethodConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
