"""Named sets of the schedule settings the paper leaves open: the paper's reading, and the default.

A preset fixes three choices the paper does not spell out (see ``docs/results.md`` for the
measurements behind them):

* ``embeddings``: whether the embeddings train in every stage (``always``), in the first stage
  only, or ``never``;
* ``eval_frozen_blocks``: whether frozen blocks run in eval mode (their dropout off), or keep the
  training mode a plain ``requires_grad_(False)`` leaves them in;
* ``cache_frozen``: whether ``progtuning train`` caches the frozen prefix's outputs across epochs.
  A preset that caches does so only where the cache can run and pays (BERT-family encoders, one
  process or DDP, embeddings frozen, training on the CPU: on a GPU it measured no faster); elsewhere
  the run goes on without it, where an explicit ``--cache-frozen`` would be refused (or, on a GPU,
  honoured). The HF callback cannot switch the cache on by itself: add
  :class:`progtuning.cache.callback.PrefixCacheCallback` for that.

Settings given explicitly (a YAML key, a flag, a callback argument) win over the preset's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from progtuning.errors import ProgtuningError


@dataclass(frozen=True)
class Preset:
    name: str
    embeddings: str
    eval_frozen_blocks: bool
    cache_frozen: bool
    summary: str

    def settings(self) -> dict:
        """The config keys this preset sets."""
        values = asdict(self)
        del values["name"], values["summary"]
        return values

    def under(self, **given) -> dict:
        """Each of ``given``'s keys: its value, or this preset's where it is None (not given)."""
        defaults = self.settings()
        return {key: defaults[key] if value is None else value for key, value in given.items()}


PRESETS = {
    preset.name: preset
    for preset in (
        Preset(
            "paper", embeddings="always", eval_frozen_blocks=False, cache_frozen=False,
            summary="the paper's reading: the embeddings train in every stage (the only reading that gives its "
                    "~25% for BERT-base) and frozen blocks are merely excluded from the update (dropout still on)",
        ),
        Preset(
            "fast", embeddings="never", eval_frozen_blocks=True, cache_frozen=True,
            summary="the compute saver: the embeddings stay frozen, frozen blocks run in eval mode and their "
                    "outputs are cached on the CPU, so backward stops at the lowest trainable block and the "
                    "frozen prefix runs once",
        ),
    )
}
DEFAULT_PRESET = "fast"


def get_preset(name: str | None) -> Preset:
    """The preset called ``name`` (None: the default); one line naming the choices otherwise."""
    name = DEFAULT_PRESET if name is None else name
    try:
        return PRESETS[name]
    except KeyError:
        raise ProgtuningError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None
