"""A grid of ``progtuning train`` runs, one folder each, resumable, N at a time.

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

Runs go in order seed → model → task → method → base, prog, variants: a sweep stopped early
has whole seeds, and with ``parallel: 2`` a run's baseline and Progtuning twin train side by side,
under the same load, which keeps their wall-time ratio fair.

Each run is ``python -m progtuning train CONFIG`` in a fresh process (a crash or a leak ends
with it); its resolved config and its log are kept in the run folder (``config.yaml``,
``train.log``) once it ends. A run folder holding ``results.json`` is finished and skipped, so a
killed sweep continues where it stopped; a run that failed is logged, the sweep goes on, and the
next invocation retries it. A finished run whose recorded config differs from what the YAML now
asks for stops the sweep before anything runs (an edited YAML is never met by an old result).
That same check lets several sweeps share one folder: a second YAML (say, ablations on two of
the tasks) that writes into a study's folder reuses the study's runs it has in common, setting
for setting, and runs only its new arms. One progress line is printed per run.
``OUTPUT_DIR/_sweep/`` keeps each sweep's YAML as ``<name>.yaml``, a lock (two sweeps never run
in one folder at once) and ``status.jsonl`` (one line per run ended).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from progtuning.errors import ProgtuningError
from progtuning.runs.config import FIELDS, load_config, read_yaml
from progtuning.runs.results import CONFIG_FILE, LOG_FILE, RESULTS_FILE, SWEEP_DIR
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
class RunOutcome:
    spec: RunSpec
    ok: bool
    seconds: float
    results: dict | None = None
    error: str | None = None
    skipped: bool = False


@dataclass
class Sweep:
    output_dir: Path
    parallel: int
    runs: list[RunSpec] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    name: str = "sweep"  # the YAML's stem: several sweeps may add arms to one folder, each kept as _sweep/<name>.yaml


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------
def load_sweep(path: str | Path, output_dir: str | None = None, parallel: int | None = None) -> Sweep:
    """Read a sweep YAML and expand it (see the module docstring)."""
    data = read_yaml(path)
    if output_dir is not None:
        data["output_dir"] = output_dir
    if parallel is not None:
        data["parallel"] = parallel
    sweep = expand_sweep(data)
    sweep.name = Path(path).stem
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


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
Runner = Callable[[RunSpec, Path], dict]


def subprocess_runner(spec: RunSpec, log_path: Path) -> dict:
    """Run one spec as ``python -m progtuning train CONFIG`` and return its results.json."""
    config_path = log_path.with_suffix(".yaml")
    if not config_path.is_file():
        write_run_config(spec, config_path)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the log
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    threads = spec.config.get("threads")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "progtuning", "train", str(config_path)]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        with _LIVE_LOCK:
            _LIVE.add(process)
            if _STOPPING.is_set():  # the sweep was interrupted while this run was being started
                process.terminate()
        try:
            process.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(process)
    results_path = spec.run_dir / RESULTS_FILE
    if process.returncode != 0 or not results_path.is_file():
        raise RuntimeError(f"exit code {process.returncode}: {_last_error(log_path)}")
    return json.loads(results_path.read_text())


# Runs in flight, so that an interrupted sweep can stop them (see run_sweep).
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _stop_live_runs() -> None:
    with _LIVE_LOCK:
        _STOPPING.set()
        for process in _LIVE:
            with contextlib.suppress(OSError):
                process.terminate()


def write_run_config(spec: RunSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The copy kept as RUN_DIR/config.yaml re-runs this one run in place.
    rerun = spec.run_dir / CONFIG_FILE
    text = f"# progtuning train {rerun}\n# sweep run {spec.name}\n" + yaml.safe_dump(spec.config, sort_keys=False)
    path.write_text(text)


def _load_prctl():
    with contextlib.suppress(Exception):
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    return None


# Loaded here, in the parent: the forked child must not import or dlopen (another thread may hold a lock).
_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # A sweep killed with SIGKILL must not leave its runs training on (and racing a restarted sweep).
    # PR_SET_PDEATHSIG fires when the forking *thread* ends; the pool's threads outlive their runs.
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _last_error(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "empty log"


def run_sweep(
    sweep: Sweep,
    runner: Runner = subprocess_runner,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[RunOutcome]:
    """Run every unfinished run of ``sweep``, ``sweep.parallel`` at a time; return all outcomes."""
    total = len(sweep.runs)
    check_finished_runs(sweep)
    todo = [spec for spec in sweep.runs if not spec.done]
    finished = total - len(todo)
    if dry_run:
        for spec in sweep.runs:
            echo(f"{'done' if spec.done else 'todo'}  {spec.name}")
        echo(f"{total} runs: {finished} finished, {len(todo)} to run, {sweep.parallel} at a time, in {sweep.output_dir}")
        return []
    state_dir = sweep.output_dir / SWEEP_DIR
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    with _lock(state_dir / "lock"):
        (state_dir / f"{sweep.name}.yaml").write_text(yaml.safe_dump(sweep.source, sort_keys=False))
        echo(
            f"sweep: {total} runs in {sweep.output_dir} ({finished} already finished, {len(todo)} to run, "
            f"{sweep.parallel} at a time)"
        )
        outcomes = [RunOutcome(spec, True, 0.0, skipped=True) for spec in sweep.runs if spec.done]
        started = time.perf_counter()
        count = {"ended": 0, "failed": 0}
        guard = threading.Lock()

        _STOPPING.clear()

        def one(spec: RunSpec) -> RunOutcome:
            if _STOPPING.is_set():  # interrupted: a worker thread may still pick up a queued run
                return RunOutcome(spec, False, 0.0, error="not started: the sweep was interrupted")
            log_path = state_dir / "logs" / (spec.name.replace("/", "__") + ".log")
            write_run_config(spec, log_path.with_suffix(".yaml"))
            t0 = time.perf_counter()
            try:
                results = runner(spec, log_path)
                outcome = RunOutcome(spec, True, time.perf_counter() - t0, results=results)
            except Exception as error:  # a failed run is logged; the sweep goes on
                outcome = RunOutcome(spec, False, time.perf_counter() - t0, error=f"{type(error).__name__}: {error}")
            except BaseException:  # an interrupt: before this thread can take the next run
                _STOPPING.set()
                raise
            _keep_with_run(spec, log_path)
            return outcome

        pool = ThreadPoolExecutor(max_workers=sweep.parallel)
        try:
            futures = [pool.submit(one, spec) for spec in todo]
            for future in as_completed(futures):
                outcome = future.result()
                with guard:
                    count["ended"] += 1
                    count["failed"] += not outcome.ok
                    outcomes.append(outcome)
                    elapsed = time.perf_counter() - started
                    left = len(todo) - count["ended"]
                    eta = elapsed / count["ended"] * left
                    echo(_progress_line(finished + count["ended"], total, outcome, elapsed, eta))
                    _append_status(state_dir / "status.jsonl", outcome)
        except BaseException:
            # Ctrl-C (or any error here): start nothing new and stop what runs; a rerun resumes.
            _stop_live_runs()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        echo(
            f"sweep finished: {total - count['failed']}/{total} runs have results, {count['failed']} failed "
            f"({_duration(time.perf_counter() - started)})"
            + (": run the same command again to retry the failed ones" if count["failed"] else "")
        )
    return outcomes


def check_finished_runs(sweep: Sweep) -> None:
    """Refuse, before anything runs, a sweep whose finished runs were made with other settings."""
    stale = [(spec, changed) for spec in sweep.runs if (changed := spec.changed_settings())]
    if stale:
        spec, changed = stale[0]
        more = f" (and {len(stale) - 1} more runs)" if len(stale) > 1 else ""
        raise ProgtuningError(
            f"run {spec.name} finished with other settings ({'; '.join(changed[:3])}){more}: "
            f"give the sweep another output_dir, or delete {spec.run_dir} to run it again"
        )


def _keep_with_run(spec: RunSpec, log_path: Path) -> None:
    """Put the run's config and log into its folder (train replaced the folder, so only now)."""
    if not spec.run_dir.is_dir():
        return
    with contextlib.suppress(OSError):
        config_path = log_path.with_suffix(".yaml")
        if config_path.is_file():
            shutil.copyfile(config_path, spec.run_dir / CONFIG_FILE)
        if log_path.is_file():
            shutil.copyfile(log_path, spec.run_dir / LOG_FILE)


def _progress_line(done: int, total: int, outcome: RunOutcome, elapsed: float, eta: float) -> str:
    width = len(str(total))
    head = f"[{done:>{width}}/{total}] {outcome.spec.name:<44}"
    tail = f"{_duration(outcome.seconds):>7}  (elapsed {_duration(elapsed)}, eta {_duration(eta)})"
    if not outcome.ok:
        return f"{head} FAILED {outcome.error}  {tail}"
    r = outcome.results or {}
    metric = r.get("main_metric", "score")
    val, test = r.get("validation_score"), r.get("test_score")
    scores = f"{metric} val {_fmt(val)} test {_fmt(test)}"
    reduction = r.get("reduction")
    if reduction:
        scores += f"  reduction {reduction:.1%}"
    return f"{head} ok  {scores}  {tail}"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _append_status(path: Path, outcome: RunOutcome) -> None:
    r = outcome.results or {}
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run": outcome.spec.name,
        "ok": outcome.ok,
        "seconds": round(outcome.seconds, 1),
        "validation_score": r.get("validation_score"),
        "test_score": r.get("test_score"),
        "error": outcome.error,
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def _lock(path: Path):
    """One sweep per folder: an OS lock that dies with its process (no stale lock after a kill)."""
    import fcntl

    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ProgtuningError(f"another sweep is running in {path.parent.parent}: wait for it, or stop it first")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def summarize(outcomes: Iterable[RunOutcome]) -> dict:
    outcomes = list(outcomes)
    return {
        "runs": len(outcomes),
        "skipped": sum(o.skipped for o in outcomes),
        "ran": sum(not o.skipped for o in outcomes),
        "failed": [o.spec.name for o in outcomes if not o.ok],
    }
