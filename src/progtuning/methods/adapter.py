"""The adapter method: bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) inside each block.

The method (:data:`METHOD`, at the end) trains the adapters, the head (its ``method_head`` part) and, when
``adapter_train_layernorm`` (default: yes for Houlsby, as in the Houlsby paper; no for
Pfeiffer), the block LayerNorms; it saves them as ``adapters.safetensors``. Adapters are
non-linear, so they cannot be merged into the base weights.

peft has no bottleneck adapters, and AdapterHub's ``adapters`` package (1.3.0) pins
``transformers ~= 4.57.6``, so it cannot be used with transformers 5: this file is the small
implementation the project needs.

An adapter is ``out = h + up(act(down(h)))``: a down-projection from the hidden size to
``hidden // reduction_factor``, a GELU (or ReLU), an up-projection back, and a residual. The
up-projection starts at exactly zero, so a model with fresh adapters computes exactly what the
base model computes; the down-projection starts as N(0, 0.01²). (With ``up = 0`` the
down-projection gets a zero gradient on the very first step and moves from the second step on:
the usual near-identity start.) GELU is the default because the small down-projection puts every
pre-activation near zero, right at ReLU's kink: with ReLU a unit whose pre-activations are negative
for every token (common when token states are nearly parallel, as in deep or small models) never
gets a gradient, while GELU has one everywhere. ``activation="relu"`` gives Pfeiffer's original.

Where the adapters go, per block (found by :func:`progtuning.core.blocks.find_blocks`, so every adapter
parameter belongs to its block and Progtuning freezes it with its block):

* ``houlsby``: two adapters, one on the attention output projection and one on the feed-forward
  output projection, i.e. before the residual add and the LayerNorm of post-LN models (BERT), or
  before the residual add of pre-LN models (GPT-2, Llama, T5).
* ``pfeiffer``: one adapter, on the feed-forward output projection.

An adapter is registered as a child ``adapter`` of the projection it follows and runs from a
forward hook on that projection, so the base parameter names stay as they were (base
checkpoints still load) and adapter parameters are named ``<projection>.adapter.down.weight`` &c.
The adapter sees the projection's output before the block's dropout (AdapterHub applies it after
that dropout; the two are the same in eval mode).

T5 decoder blocks also hold a cross-attention; the attention adapter follows the *self*-attention
(``layer.0``) in encoder and decoder blocks alike, and the feed-forward adapter the last sub-layer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from progtuning.core.blocks import find_blocks
from progtuning.errors import ProgtuningError
from progtuning.methods.base import DeltaMethod, head_parameter_names
from progtuning.methods.config import ACTIVATIONS, ADAPTER_TYPES

AdapterType = Literal["houlsby", "pfeiffer"]

# model_type -> (attention output projection, feed-forward output projection), relative to a block.
# A negative index counts from the end of a ModuleList (T5: the feed-forward is the last sub-layer,
# layer.1 in encoder blocks and layer.2 in decoder blocks).
_BERT_LIKE = ("attention.output.dense", "output.dense")
PROJECTIONS: dict[str, tuple[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "mpnet": ("attention.attn.o", "output.dense"),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "t5": ("layer.0.SelfAttention.o", "layer.-1.DenseReluDense.wo"),
}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` starting at zero, so the adapter starts as the identity."""

    def __init__(self, hidden_size: int, reduction_factor: int = 16, activation: str = "gelu") -> None:
        super().__init__()
        if reduction_factor < 1:
            raise ProgtuningError(f"adapter_reduction_factor must be >= 1, got {reduction_factor}")
        if activation not in ACTIVATIONS:
            raise ProgtuningError(f"unknown adapter activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        self.hidden_size = hidden_size
        self.bottleneck = max(1, hidden_size // reduction_factor)
        self.down = nn.Linear(hidden_size, self.bottleneck)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.up = nn.Linear(self.bottleneck, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.bottleneck} -> {self.hidden_size}"


def _run_adapter(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # A module-level function (not a lambda) so that models with adapters deep-copy and pickle.
    return module.adapter(output)


def add_adapters(
    model: nn.Module,
    adapter_type: AdapterType = "houlsby",
    reduction_factor: int = 16,
    activation: str = "gelu",
) -> list[str]:
    """Attach bottleneck adapters inside every block of ``model``; returns the adapters' module names.

    The adapters are created on the device and in the dtype of the projection they follow. Nothing
    is frozen here: the method (:data:`METHOD`) decides what trains.
    """
    if adapter_type not in ADAPTER_TYPES:
        raise ProgtuningError(f"unknown adapter type {adapter_type!r}: use one of {', '.join(ADAPTER_TYPES)}")
    if any(isinstance(m, BottleneckAdapter) for m in model.modules()):
        raise ProgtuningError("the model already has adapters: add them once, to a freshly loaded model")
    layout = find_blocks(model)
    blocks = [model.get_submodule(path) for path in layout.block_paths]
    attn_path, ffn_path = projection_paths(model, blocks)
    wanted = [attn_path, ffn_path] if adapter_type == "houlsby" else [ffn_path]
    added = []
    for block_path, block in zip(layout.block_paths, blocks):
        for rel in wanted:
            projection, resolved = _resolve(block, rel)
            weight = projection.weight
            adapter = BottleneckAdapter(_out_features(projection), reduction_factor, activation)
            projection.adapter = adapter.to(device=weight.device, dtype=weight.dtype)
            projection.register_forward_hook(_run_adapter)
            added.append(f"{block_path}.{resolved}.adapter")
    return added


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of every adapter parameter in ``model``."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter):
            names.extend(f"{module_name}.{n}" for n, _ in module.named_parameters())
    return names


def projection_paths(model: nn.Module, blocks: list[nn.Module]) -> tuple[str, str]:
    """The (attention output, feed-forward output) projection paths inside each block of ``model``.

    Known model types use :data:`PROJECTIONS`; any other model gets the first layout of that table
    that fits all its blocks (CamemBERT, Mistral, ... share a known layout), else a one-line error.
    """
    model_type = getattr(_config_of(model), "model_type", None)
    if model_type in PROJECTIONS:
        layout = PROJECTIONS[model_type]
        if not all(_fits(block, layout) for block in blocks):
            raise ProgtuningError(
                f"{type(blocks[0]).__name__} blocks of this {model_type} model lack {layout[0]!r} / {layout[1]!r}: "
                "the model does not have the standard layout, so adapters cannot be placed"
            )
        return layout
    for layout in dict.fromkeys(PROJECTIONS.values()):
        if all(_fits(block, layout) for block in blocks):
            return layout
    raise ProgtuningError(
        f"cannot place adapters in {type(model).__name__} (model type {model_type!r}): adapters support "
        f"{', '.join(PROJECTIONS)}; use one of them or LoRA/BitFit"
    )


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    return config


def _fits(block: nn.Module, layout: tuple[str, str]) -> bool:
    try:
        return all(_is_projection(_resolve(block, rel)[0]) for rel in layout)
    except (AttributeError, IndexError, TypeError):
        return False


def _resolve(block: nn.Module, rel: str) -> tuple[nn.Module, str]:
    """Walk a dotted path inside ``block``; negative integers index ModuleLists from the end."""
    module, resolved = block, []
    for part in rel.split("."):
        if part.lstrip("-").isdigit():
            index = int(part)
            if not isinstance(module, (nn.ModuleList, nn.Sequential)):
                raise TypeError(f"{part} indexes a {type(module).__name__}")
            index = index % len(module)
            module = module[index]
            resolved.append(str(index))
        else:
            module = getattr(module, part)
            if not isinstance(module, nn.Module):
                raise AttributeError(part)
            resolved.append(part)
    return module, ".".join(resolved)


def _is_projection(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[1]  # Conv1D stores (in, out)


# -- the method ----------------------------------------------------------------------------------
class Adapters(DeltaMethod):
    name = "adapter"
    weights_file = "adapters.safetensors"
    mergeable = False

    def prepare(self, model, config) -> None:
        add_adapters(model, config.adapter_type, config.adapter_reduction_factor, config.adapter_activation)

    def delta_names(self, model, config) -> set[str]:
        """Adapters, head and (if trained) block norms, read from the model's structure, not from
        ``requires_grad``, so it holds whatever stage is applied."""
        adapters = adapter_parameter_names(model)
        if not adapters:
            raise ProgtuningError("the model has no adapters: apply the adapter method (apply_method) first")
        names = head_parameter_names(model, config.method_head) | set(adapters)
        if config.train_layernorm:
            names |= _block_norm_parameter_names(model, find_blocks(model).block_paths)
        return names


def _block_norm_parameter_names(model: nn.Module, block_paths: tuple[str, ...]) -> set[str]:
    names = set()
    for path in block_paths:
        for module_name, module in model.get_submodule(path).named_modules():
            if _is_norm(module):
                prefix = f"{path}.{module_name}" if module_name else path
                names |= {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return names


def _is_norm(module: nn.Module) -> bool:
    # nn.LayerNorm, DeBERTa's / T5's LayerNorm, Llama's and Qwen2's RMSNorm.
    kind = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or kind.endswith(("LayerNorm", "RMSNorm"))


METHOD = Adapters()
