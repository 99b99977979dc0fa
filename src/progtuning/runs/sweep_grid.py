"""A sweep YAML and the runs it expands to: one ``progtuning train`` config and folder per combination.

    progtuning sweep configs/sweep/minilm-cpu.yaml [--parallel 2] [--output-dir DIR] [--dry-run]

A sweep YAML (first line: the command that runs it)::

    output_dir: runs/sweep-minilm          # every run lands under here
    parallel: 2                            # runs at once (each a fresh subprocess)
    base: {model: minilm-l6, epochs: 3, max_length: 64, threads: 1, save_model: false}
    grid:                                  # the cross product of these lists
      task: [rotten-tomatoes, trec6]
      method: [full, lora, adapter, bitfit]
      progtuning: [false, true]
      seed: [0, 1, 2]
      # model: [minilm-l6, minilm-l3]      # optional; adds a <model>/ level to the folders
    variants:                              # optional extra arms, beside plain "prog"
      emb-first: {embeddings: first_stage}
      frozen-emb: {baseline: true, stages: 1, embeddings: never}   # a cheap baseline: all blocks, no embeddings
      emb-never: {embeddings: never, compare_with: frozen-emb}     # ... and the arm it is the baseline of
      matched: {epochs: 5, stages: 3}      # compute-matched: more epochs for the cheaper arm
    models:  {minilm-l3: {...}}            # per-model overrides
    tasks:   {bbc-news: {max_length: 256, max_train_examples: 200}}
    methods: {full: {learning_rate: 5.0e-5}, lora: {learning_rate: 1.0e-3}}

Each combination becomes ``OUTPUT_DIR/[<model>/]<task>/<method>/<base|prog>[-<variant>]/seed<k>``
with the settings ``base`` < ``models[model]`` < ``tasks[task]`` < ``methods[method]`` < the grid
values < the variant. Variants are run beside the Progtuning runs (where the grid's ``progtuning``
has ``true``) and may set the schedule keys and the training length (:data:`VARIANT_KEYS`: e.g.
``epochs`` for a compute-matched arm, which gets the baseline's training time; ``lr_schedule``),
plus two keys of their own:

* ``baseline: true`` makes the variant a *baseline arm*, not a Progtuning arm: its folder and mode
  are ``base-<name>`` (e.g. frozen embeddings, ``{baseline: true, stages: 1, embeddings: never}``:
  every block trains, the embeddings never do, so a saving that comes from freezing the embeddings
  alone is not credited to the schedule). Reports compare it with the plain baseline, for information.
* ``compare_with: <baseline variant>`` names the baseline a Progtuning arm is compared with
  (default: the plain baseline ``base``).

A variant run's config carries ``variant: <name>`` (and ``variant_baseline`` / ``compare_with``),
so its results.json records its mode (reports read it from there, not from the folder name).
Every combination is checked with :func:`progtuning.runs.config.load_config` before anything
runs, so a typo fails the sweep at once, not after an hour.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from progtuning.errors import ProgtuningError
from progtuning.runs.config import FIELDS, load_config, read_yaml
from progtuning.runs.results import CONFIG_FILE, RESULTS_FILE

SWEEP_KEYS = ("output_dir", "parallel", "base", "grid", "variants", "models", "tasks", "methods")
GRID_KEYS = ("model", "task", "method", "progtuning", "seed")
# What a variant may change: the schedule (fixed or contribution-aware), how long it trains, and the
# learning-rate schedule.
VARIANT_KEYS = ("embeddings", "stages", "stage_unit", "stage_blocks", "eval_frozen_blocks", "cache_frozen",
                "epochs", "lr_schedule",
                "schedule", "target_reduction", "contribution_threshold", "decision_interval", "signal_every")
# A variant's own keys: whether it is a baseline arm, and which baseline a Progtuning arm is compared with.
VARIANT_ROLE_KEYS = ("baseline", "compare_with")
# The sweep owns these: every run writes into its own folder, replaces a crashed attempt and is
# labelled by its variant.
FORCED_KEYS = ("output_dir", "overwrite", "resume", "variant", "variant_baseline", "compare_with")


@dataclass
class RunSpec:
    """One run of a sweep: a name (its folder relative to the sweep), its folder and its config."""

    name: str
    run_dir: Path
    config: dict[str, Any]

    @property
    def done(self) -> bool:
        return (self.run_dir / RESULTS_FILE).is_file()

    def changed_settings(self) -> list[str]:
        """How a finished run's recorded config differs from this spec (``key: was -> now``).

        A finished run is skipped, so a settings change in the YAML must not be met by an old result.
        A key the recorded config lacks was added to progtuning after the run; it counts as changed
        only where the spec gives it a value other than its default (which the old run could not have).
        """
        recorded_path = self.run_dir / CONFIG_FILE
        if not self.done or not recorded_path.is_file():
            return []
        recorded = read_yaml(recorded_path)
        changed = []
        for key, now in self.config.items():
            if key == "output_dir":
                continue
            was = recorded[key] if key in recorded else FIELDS[key].default if key in FIELDS else now
            if was != now:
                changed.append(f"{key}: {was!r} -> {now!r}")
        return changed


@dataclass
class Sweep:
    output_dir: Path
    parallel: int
    runs: list[RunSpec] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    name: str = "sweep"  # the YAML's stem: several sweeps may add arms to one folder, each kept as _sweep/<name>.yaml


def load_sweep(
    path: str | Path, output_dir: str | None = None, parallel: int | None = None, only: list[str] | None = None
) -> Sweep:
    """Read a sweep YAML and expand it (see the module docstring).

    ``only``: keep the runs whose name (``task/method/arm/seedK``) matches one of these shell
    patterns, e.g. ``bbc-news/*/prog-matched/seed1``; a pattern that matches none is an error.
    """
    data = read_yaml(path)
    if output_dir is not None:
        data["output_dir"] = output_dir
    if parallel is not None:
        data["parallel"] = parallel
    sweep = expand_sweep(data)
    sweep.name = Path(path).stem
    if only:
        unmatched = [p for p in only if not any(fnmatch.fnmatchcase(run.name, p) for run in sweep.runs)]
        if unmatched:
            raise ProgtuningError(
                f"--only {unmatched[0]!r} matches no run of {path}: run names look like {sweep.runs[0].name} "
                "(see --dry-run)"
            )
        sweep.runs = [run for run in sweep.runs if any(fnmatch.fnmatchcase(run.name, p) for p in only)]
    return sweep


def expand_sweep(data: dict) -> Sweep:
    """The runs of a sweep mapping, checked, in run order."""
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ProgtuningError(f"unknown sweep key(s) {', '.join(unknown)}: use {', '.join(SWEEP_KEYS)}")
    if "output_dir" not in data:
        raise ProgtuningError("a sweep needs output_dir: the folder that receives one subfolder per run")
    output_dir = Path(str(data["output_dir"]))
    try:
        parallel = int(1 if data.get("parallel") is None else data["parallel"])
    except (TypeError, ValueError):
        raise ProgtuningError(f"parallel must be a whole number, got {data['parallel']!r}")
    if parallel < 1:
        raise ProgtuningError(f"parallel must be at least 1, got {parallel}")
    base = _mapping(data, "base")
    grid = _mapping(data, "grid")
    variants = _mapping(data, "variants")
    overrides = {name: _mapping(data, name) for name in ("models", "tasks", "methods")}

    bad = sorted(set(grid) - set(GRID_KEYS))
    if bad:
        raise ProgtuningError(
            f"grid key(s) {', '.join(bad)} not supported: the grid crosses {', '.join(GRID_KEYS)}; "
            "put fixed settings under base, per-task/method/model ones under tasks/methods/models"
        )
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ProgtuningError(f"grid.{key} must be a non-empty list, got {values!r}")
    for name, variant in variants.items():
        if not isinstance(variant, dict):
            raise ProgtuningError(f"variant {name!r} must be a mapping of schedule keys, got {variant!r}")
        extra = sorted(set(variant) - set(VARIANT_KEYS) - set(VARIANT_ROLE_KEYS))
        if extra:
            raise ProgtuningError(
                f"variant {name!r} sets {', '.join(extra)}: variants change the schedule and training length only "
                f"({', '.join(VARIANT_KEYS)}; plus {', '.join(VARIANT_ROLE_KEYS)}), since they share the baselines"
            )
        if not str(name).replace("-", "").replace("_", "").isalnum():
            raise ProgtuningError(f"variant name {name!r} must be letters, digits, - or _: it becomes a folder name")
    baseline_variants = {str(name) for name, v in variants.items() if _as_bool(v.get("baseline", False))}
    for name, variant in variants.items():
        target = variant.get("compare_with")
        if target is None:
            continue
        if str(name) in baseline_variants:
            raise ProgtuningError(f"variant {name!r} is a baseline: it is compared with base; drop its compare_with")
        if str(target) != "base" and str(target) not in baseline_variants:
            raise ProgtuningError(
                f"variant {name!r} compares with {target!r}, which is not a baseline variant: use base or one of "
                f"{', '.join(sorted(baseline_variants)) or '(none: mark a variant baseline: true)'}"
            )
    for group, table in overrides.items():
        for key, value in table.items():
            if not isinstance(value, dict):
                raise ProgtuningError(f"{group}.{key} must be a mapping of config keys, got {value!r}")
    forced = sorted(k for k in FORCED_KEYS if k in base)
    if forced:
        raise ProgtuningError(f"base sets {', '.join(forced)}: the sweep chooses each run's folder; remove them")

    def values(key: str) -> list:
        if key in grid:
            return list(grid[key])
        return [base.get(key, FIELDS[key].default)]

    runs: list[RunSpec] = []
    seen: set[str] = set()
    for seed, model, task, method in itertools.product(values("seed"), values("model"), values("task"), values("method")):
        modes: list[tuple[str, dict]] = []
        for prog in values("progtuning"):
            prog = _as_bool(prog)
            if not prog:
                modes.append(("base", {"progtuning": False}))
            else:
                modes.append(("prog", {"progtuning": True}))
                modes.extend(_variant_mode(str(name), variant) for name, variant in variants.items())
        for mode, mode_values in modes:
            config: dict[str, Any] = dict(base)
            config.update(overrides["models"].get(str(model), {}))
            config.update(overrides["tasks"].get(str(task), {}))
            config.update(overrides["methods"].get(str(method), {}))
            config.update({"model": model, "task": task, "method": method, "seed": seed})
            config.update(mode_values)
            parts = ([str(model)] if "model" in grid else []) + [str(task), str(method), mode, f"seed{seed}"]
            name = "/".join(parts)
            if name in seen:
                raise ProgtuningError(f"the grid gives run {name} twice: remove the duplicate value")
            seen.add(name)
            run_dir = output_dir.joinpath(*parts)
            config.update({"output_dir": str(run_dir), "overwrite": True, "resume": False})
            try:
                checked = load_config(None, config)
            except ProgtuningError as error:
                raise ProgtuningError(f"sweep run {name}: {error}")
            runs.append(RunSpec(name, run_dir, checked.to_dict()))  # every key: reproducible if defaults change
    return Sweep(output_dir=output_dir, parallel=parallel, runs=runs, source=data)


def _variant_mode(name: str, variant: dict) -> tuple[str, dict]:
    """A variant's folder name and config values (its mode in results.json follows from them)."""
    values = {k: v for k, v in variant.items() if k not in VARIANT_ROLE_KEYS}
    values.update({"progtuning": True, "variant": name})
    if _as_bool(variant.get("baseline", False)):
        return f"base-{name}", {**values, "variant_baseline": True}
    target = str(variant.get("compare_with") or "base")
    return f"prog-{name}", {**values, "compare_with": "base" if target == "base" else f"base-{target}"}


def _mapping(data: dict, key: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ProgtuningError(f"sweep key {key} must be a mapping, got {type(value).__name__}")
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("true", "yes", "1", "on", "prog")
    return bool(value)
