"""The bench's FLOP model and its plan of cases: which configurations to time, and the bound for each.

Pure arithmetic (see the FLOP model in :mod:`progtuning.runs.bench`): a block's forward costs 1
unit, its backward 1 unit for the input gradient plus 1 for the weight gradients. A *case* is one
distinct configuration to time (:class:`Key`, or :class:`BuildKey` for a cache build); a
:class:`Variant` is a whole schedule as a list of cases, one per stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from progtuning.core.schedule import progressive
from progtuning.runs.bench_config import BenchConfig


def flop_units(num_blocks: int, lowest: int, train_embeddings: bool, cached: bool = False, lora: bool = False) -> float:
    """Cost of one step in block-forward units (see the module docstring)."""
    L, k = num_blocks, lowest
    if lora:
        return 2 * (L - k) if cached else L + (L - k)
    if cached:
        return 3 * (L - k)
    return L + 2 * (L - k) + (k if train_embeddings else 0)


@dataclass(frozen=True)
class Key:
    """One distinct configuration to measure (several variant stages may share it)."""

    model: str  # "base" or "lora"
    lowest: int  # lowest block that trains
    train_embeddings: bool
    eval_frozen: bool
    cached: bool

    @property
    def label(self) -> str:
        parts = [self.model, f"k={self.lowest}", "E" if self.train_embeddings else "noE"]
        if not self.eval_frozen:
            parts.append("train-mode")
        if self.cached:
            parts.append("cached")
        return " ".join(parts)


@dataclass(frozen=True)
class BuildKey:
    model: str
    start: int | None  # None: from scratch (embeddings + blocks 0..to-1)
    to: int

    @property
    def label(self) -> str:
        return f"{self.model} build {'E' if self.start is None else self.start}->{self.to}"


@dataclass
class Variant:
    name: str
    model: str
    stages: list[Key]
    builds: list[BuildKey | None]
    flop: list[float]
    flop_build: list[float]
    baseline: str = "full"


def plan_variants(config: BenchConfig) -> list[Variant]:
    L, T = config.layers, config.stages
    schedules = {p: progressive(L, T, p) for p in config.policies}
    ref = progressive(L, T, "always")
    lowest = [min(stage.blocks) for stage in ref.stages]
    full = Key("base", 0, True, True, False)
    variants = [Variant("full", "base", [full] * T, [None] * T, [flop_units(L, 0, True)] * T, [0.0] * T)]

    def key(model, k, emb, eval_frozen=True, cached=False):
        if k == 0 and emb:
            eval_frozen = True  # nothing is frozen: the flag changes nothing
        return Key(model, k, emb, eval_frozen, cached)

    def builds_for(model: str, emb_flags: list[bool]) -> tuple[list[BuildKey | None], list[bool]]:
        out: list[BuildKey | None] = []
        cached: list[bool] = []
        level = None
        for t in range(T):
            usable = not emb_flags[t] and lowest[t] >= 1
            if not usable:
                out.append(None)
                cached.append(False)
                level = None
                continue
            out.append(BuildKey(model, level, lowest[t]))
            cached.append(True)
            level = lowest[t]
        return out, cached

    for policy in config.policies:
        flags = [s.train_embeddings for s in schedules[policy].stages]
        variants.append(
            Variant(
                f"prog-{policy}", "base", [key("base", lowest[t], flags[t]) for t in range(T)], [None] * T,
                [flop_units(L, lowest[t], flags[t]) for t in range(T)], [0.0] * T,
            )
        )
    if config.eval_off:
        for policy in [p for p in ("never",) if p in config.policies] or list(config.policies)[:1]:
            flags = [s.train_embeddings for s in schedules[policy].stages]
            variants.append(
                Variant(
                    f"prog-{policy}/dropout-on", "base",
                    [key("base", lowest[t], flags[t], eval_frozen=False) for t in range(T)], [None] * T,
                    [flop_units(L, lowest[t], flags[t]) for t in range(T)], [0.0] * T,
                )
            )
    if config.cache:
        for policy in [p for p in ("first_stage", "never") if p in config.policies]:
            flags = [s.train_embeddings for s in schedules[policy].stages]
            builds, cached = builds_for("base", flags)
            variants.append(
                Variant(
                    f"prog-{policy}+cache", "base",
                    [key("base", lowest[t], flags[t], cached=cached[t]) for t in range(T)], builds,
                    [flop_units(L, lowest[t], flags[t], cached=cached[t]) for t in range(T)],
                    [_build_units(b) for b in builds],
                )
            )
    if config.lora:
        variants.append(
            Variant("lora", "lora", [key("lora", 0, False)] * T, [None] * T, [flop_units(L, 0, False, lora=True)] * T,
                    [0.0] * T, baseline="lora")
        )
        variants.append(
            Variant("lora+prog", "lora", [key("lora", lowest[t], False) for t in range(T)], [None] * T,
                    [flop_units(L, lowest[t], False, lora=True) for t in range(T)], [0.0] * T, baseline="lora")
        )
        if config.cache:
            builds, cached = builds_for("lora", [False] * T)
            variants.append(
                Variant("lora+prog+cache", "lora", [key("lora", lowest[t], False, cached=cached[t]) for t in range(T)],
                        builds, [flop_units(L, lowest[t], False, cached=cached[t], lora=True) for t in range(T)],
                        [_build_units(b) for b in builds], baseline="lora")
            )
    return variants


def _build_units(build: BuildKey | None) -> float:
    if build is None:
        return 0.0
    return float(build.to - (build.start or 0))


def ordered_cases(variants: list[Variant]) -> list[Key | BuildKey]:
    """Every distinct case once, each build right before the cached step that needs its level."""
    cases: list[Key | BuildKey] = []
    for variant in variants:
        for stage_key, build in zip(variant.stages, variant.builds):
            if build is not None and build not in cases:
                cases.append(build)
            if stage_key not in cases:
                cases.append(stage_key)
    return cases
