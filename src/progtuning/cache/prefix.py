"""The cache's model side: which modules of a model form the frozen prefix, and which models it can drive."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from progtuning.core.blocks import BlockLayout, find_blocks
from progtuning.errors import ProgtuningError

# Bidirectional encoders whose blocks take (hidden_states, attention_mask, ...) and whose positions
# are either added in the embeddings (absolute) or recomputed from the shape (MPNet).
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "distilbert")
_TUPLE_OUTPUT = {"mpnet"}  # blocks that return (hidden_states, ...) instead of a tensor


@dataclass
class Prefix:
    """The modules the cache drives in one model."""

    root: nn.Module  # BertModel, RobertaModel, ... (the one with .embeddings)
    model_type: str
    embeddings: nn.Module
    project: nn.Module | None  # ELECTRA's embeddings_project (embedding_size != hidden_size)
    blocks: list[nn.Module]
    tuple_output: bool


def unsupported_reason(model: nn.Module, layout: BlockLayout | None = None) -> str | None:
    """Why the cache can't drive ``model`` (one line), or ``None`` if it can."""
    try:
        locate(model, layout or find_blocks(model))
    except ProgtuningError as error:
        return str(error)
    return None


def locate(model: nn.Module, layout: BlockLayout) -> Prefix:
    from progtuning.core.fsdp import is_sharded

    if is_sharded(model):  # it would run the frozen blocks outside FSDP's all-gathers
        raise ProgtuningError("the frozen-prefix cache does not work on a model sharded by FSDP: run without "
                              "--cache-frozen (or without --fsdp)")
    stacks = {path.rsplit(".", 1)[0] for path in layout.block_paths}
    name = type(model).__name__
    if len(stacks) != 1:
        raise ProgtuningError(
            f"the frozen-prefix cache needs one stack of blocks, {name} has {len(stacks)}: run without --cache-frozen"
        )
    stack = stacks.pop()
    root_path = stack.rsplit(".", 2)[0] if stack.count(".") >= 2 else ""
    root = model.get_submodule(root_path) if root_path else model
    config = getattr(root, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(root, "embeddings"):
        raise ProgtuningError(
            f"the frozen-prefix cache supports BERT-family encoders ({', '.join(SUPPORTED_MODEL_TYPES)}), "
            f"not {model_type or name}: run without --cache-frozen"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ProgtuningError(
            f"the frozen-prefix cache needs a bidirectional encoder, but this {model_type} is configured as a decoder: "
            "run without --cache-frozen"
        )
    blocks = [model.get_submodule(path) for path in layout.block_paths]
    return Prefix(
        root=root,
        model_type=model_type,
        embeddings=root.embeddings,
        project=getattr(root, "embeddings_project", None),
        blocks=blocks,
        tuple_output=model_type in _TUPLE_OUTPUT,
    )
