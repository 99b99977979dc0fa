"""Where are the embeddings, the blocks and the head of *this* model?

:func:`find_blocks` maps every parameter of a Hugging Face model (plain, or wrapped by peft) to one
of three groups: ``"embeddings"``, a block index (0 = bottom), or ``"head"``.

How it decides, in order:

1. **Blocks** are the model's stack of repeated layers: the outermost ``nn.ModuleList`` whose
   children all share one class (``bert.encoder.layer``, ``transformer.h``, ``model.layers``, …).
   Encoder–decoder models have two stacks; they are ordered as data flows, encoder blocks first
   (0 … n−1), then decoder blocks (n … 2n−1), so progressive freezing freezes the encoder bottom-up
   and then the decoder bottom-up. Anything else takes a dotted path (``blocks="encoder.layer"``).
2. **Head** is everything on the output side of the stack: task heads (``classifier``,
   ``pre_classifier``, ``pooler``, ``score``, ``qa_outputs``, ``classification_head``,
   ``lm_head``) and the final norms after the last block (``ln_f``, ``norm``,
   ``final_layer_norm``). The pooler counts as head: it sits on the classification path.
3. **Embeddings** are all the rest: token/position embeddings and their norm, embedding
   projections (ELECTRA), and tables shared by every block (MPNet's relative attention bias).

Two kinds of parameter serve more than the place they live in:

* **A tied output embedding** (GPT-2's ``lm_head`` ↔ ``wte``, tied Llama/Qwen2 ``lm_head`` ↔
  ``embed_tokens``, T5's ``lm_head`` ↔ ``shared``) is one tensor that is both the input table and
  the head. It is grouped as **head** (``tied_head="head"``, the default): the head trains in every
  stage, so it keeps training and is counted once, as head. ``tied_head="embeddings"`` makes it
  follow the embedding policy instead. :attr:`BlockLayout.tied_head` names it either way.
* **A table one block holds for its whole stack**: T5 computes its relative attention bias in
  block 0 of each stack and hands it to every later block. It stays in block 0's group, and
  :attr:`BlockLayout.shared` lists the blocks that use it: it trains while any of them trains.

Tied weights appear once, under their first name (``named_parameters`` de-duplicates them).
ALBERT shares one block across all layers, so it cannot be frozen part by part: it is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence, Union

from torch import nn

from progtuning.errors import ProgtuningError

Group = Union[str, int]  # "embeddings", "head" or a block index
EMBEDDINGS = "embeddings"
HEAD = "head"
TiedHead = Literal["head", "embeddings"]
TIED_HEAD_CHOICES: tuple[str, ...] = ("head", "embeddings")

# Module names that put a parameter on the output side of the block stack.
HEAD_MODULE_NAMES = frozenset(
    {
        "classifier",
        "pre_classifier",
        "pooler",
        "score",
        "qa_outputs",
        "classification_head",
        "lm_head",
        "cls",
        "sequence_summary",
        "head",  # ModernBERT's prediction head
        "logits_proj",  # XLNet
        "ln_f",
        "norm",
        "final_layer_norm",
        "final_norm",  # ModernBERT
    }
)

# A parameter under a module with this name is embeddings even where a head name follows
# (ModernBERT's `embeddings.norm`).
EMBEDDING_MODULE_NAMES = frozenset({"embeddings"})

# A parameter whose module has this name, found in the first block of a stack only, is a table that
# block computes once for the whole stack (T5, mT5, LongT5; UMT5 gives every block its own).
STACK_SHARED_MODULE_NAMES = frozenset({"relative_attention_bias"})


@dataclass(frozen=True)
class BlockLayout:
    """The three groups of one model, by parameter name (names as ``model.named_parameters()`` gives)."""

    block_paths: tuple[str, ...]  # module path of each block, bottom to top
    groups: dict[str, Group] = field(repr=False)
    # parameters one block holds and several blocks use (T5's relative attention bias) -> those blocks
    shared: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    # input embeddings that are also the output head (tied weights), whichever group they are in
    tied_head: tuple[str, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.block_paths)

    def blocks_using(self, name: str) -> tuple[int, ...]:
        """The blocks that need parameter ``name`` to train: its own block, or every block its table serves."""
        if name in self.shared:
            return self.shared[name]
        block = self.block_of(name)
        return () if block is None else (block,)

    def names(self, group: Group) -> list[str]:
        return [name for name, g in self.groups.items() if g == group]

    def block_of(self, name: str) -> int | None:
        group = self.groups[name]
        return group if isinstance(group, int) else None

    def summary(self, model: nn.Module) -> dict[str, int]:
        """Parameter counts: embeddings, each block, head (all parameters, trainable or not)."""
        sizes = dict(model.named_parameters())
        counts: Counter = Counter()
        for name, group in self.groups.items():
            key = f"block {group}" if isinstance(group, int) else group
            counts[key] += sizes[name].numel()
        return dict(counts)


def find_blocks(
    model: nn.Module,
    blocks: str | Sequence[str] | None = None,
    head: Iterable[str] = (),
    tied_head: TiedHead = "head",
) -> BlockLayout:
    """Locate the embeddings, the ordered blocks and the head of ``model``.

    ``blocks`` overrides discovery with one dotted module path (or several, concatenated in
    order) naming ``nn.ModuleList``\\ s of blocks, relative to ``model`` or to the model peft wraps.
    ``head`` adds module names (path components) that count as head. ``tied_head`` places an input
    embedding tied to the output head: with the head (trained in every stage) or with the embeddings.
    """
    if tied_head not in TIED_HEAD_CHOICES:
        raise ProgtuningError(f"unknown tied_head {tied_head!r}: use one of {', '.join(TIED_HEAD_CHOICES)}")
    _refuse_shared_blocks(model)
    if blocks is not None:
        paths = [blocks] if isinstance(blocks, str) else list(blocks)
        stacks = [_resolve_stack(model, path) for path in paths]
    else:
        stacks = _discover_stacks(model)
    block_paths = tuple(f"{prefix}.{i}" for prefix, stack in stacks for i in range(len(stack)))
    index_of = {path: i for i, path in enumerate(block_paths)}
    user_head = set(head)
    groups: dict[str, Group] = {}
    for name, _ in model.named_parameters():
        groups[name] = _group_of(name, index_of, user_head)
    tied = _tied_heads(model, index_of, user_head)
    for name in tied:
        groups[name] = HEAD if tied_head == "head" else EMBEDDINGS
    shared = _stack_shared(groups, stacks)
    return BlockLayout(block_paths=block_paths, groups=groups, shared=shared, tied_head=tied)


def _tied_heads(model: nn.Module, index_of: dict[str, int], user_head_names: set[str]) -> tuple[str, ...]:
    """Names (as ``named_parameters`` lists them) of tensors that are both an input embedding and the head."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    tied = []
    for names in aliases.values():
        groups = {_group_of(name, index_of, user_head_names) for name in names}
        if len(names) > 1 and groups == {EMBEDDINGS, HEAD}:
            tied.append(names[0])  # the first name is the one named_parameters() keeps
    return tuple(tied)


def _stack_shared(groups: dict[str, Group], stacks: list[tuple[str, nn.ModuleList]]) -> dict[str, tuple[int, ...]]:
    """Tables that only the first block of a stack holds and every block of it uses (T5's position bias)."""
    shared: dict[str, tuple[int, ...]] = {}
    first = 0
    for _, stack in stacks:
        stack_blocks = tuple(range(first, first + len(stack)))
        first += len(stack)
        holders = {
            name: block
            for name, block in groups.items()
            if block in stack_blocks and STACK_SHARED_MODULE_NAMES & set(name.split(".")[:-1])
        }
        if holders and set(holders.values()) == {stack_blocks[0]} and len(stack_blocks) > 1:
            shared.update({name: stack_blocks for name in holders})
    return shared


def _group_of(name: str, index_of: dict[str, int], user_head_names: set[str]) -> Group:
    parts = name.split(".")
    # The longest module path that is a block wins; blocks are never nested in one another.
    for end in range(len(parts) - 1, 0, -1):
        index = index_of.get(".".join(parts[:end]))
        if index is not None:
            return index
    modules = parts[:-1]
    if any(part in user_head_names for part in modules):
        return HEAD
    if any(part in EMBEDDING_MODULE_NAMES for part in modules):
        return EMBEDDINGS
    if any(part in HEAD_MODULE_NAMES for part in modules):
        return HEAD
    return EMBEDDINGS


def _module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ModuleLists of one repeated class that hold parameters."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(True for _ in module.parameters()):
            continue
        found.append((name, module))
    return found


def _discover_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    stacks = _module_lists(model)
    if len(stacks) == 1:
        return stacks
    encoder = [s for s in stacks if ".encoder." in f".{s[0]}."]
    decoder = [s for s in stacks if ".decoder." in f".{s[0]}."]
    if len(stacks) == 2 and len(encoder) == 1 and len(decoder) == 1:
        return encoder + decoder  # data flows through the encoder first
    found = ", ".join(f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in stacks) or "none"
    raise ProgtuningError(
        f"cannot tell which module list holds the blocks of {type(model).__name__} (found: {found}); "
        "name it with blocks='dotted.path' (--blocks on the command line)"
    )


def _resolve_stack(model: nn.Module, path: str) -> tuple[str, nn.ModuleList]:
    modules = dict(model.named_modules())
    # Let a user write the path as the unwrapped model sees it, even when peft wraps the model.
    for prefix in ("", "base_model.model.", "base_model."):
        module = modules.get(prefix + path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return prefix + path, module
    lists = ", ".join(name for name, _ in _module_lists(model)) or "none"
    raise ProgtuningError(f"no module list of blocks at {path!r} in {type(model).__name__}; module lists found: {lists}")


def _refuse_shared_blocks(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "albert":
        groups = getattr(config, "num_hidden_groups", 1)
        raise ProgtuningError(
            f"ALBERT shares {groups} block(s) across its {config.num_hidden_layers} layers, so its layers "
            "cannot be frozen one part at a time: use a model with separate blocks (BERT, RoBERTa, MiniLM, ...)"
        )
