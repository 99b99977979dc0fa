"""Running a sweep (:mod:`progtuning.runs.sweep_grid` expands the YAML): resumable, N runs at a time.

    progtuning sweep configs/sweep/minilm-cpu.yaml [--parallel 2] [--output-dir DIR] [--dry-run]

Runs go in order seed → model → task → method → base, prog, variants: a sweep stopped early
has whole seeds, and with ``parallel: 2`` a run's baseline and Progtuning twin train side by side,
under the same load, which keeps their wall-time ratio fair. Where an arm is to train after its
baseline finished (a resumed or extended sweep), the sweep says so before it starts.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from progtuning.errors import ProgtuningError
from progtuning.runs.results import CONFIG_FILE, LOG_FILE, RESULTS_FILE, SWEEP_DIR, run_mode
from progtuning.runs.sweep_grid import RunSpec, Sweep


@dataclass
class RunOutcome:
    spec: RunSpec
    ok: bool
    seconds: float
    results: dict | None = None
    error: str | None = None
    skipped: bool = False


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
        unpaired = runs_without_their_baseline(todo)
        if unpaired:
            spec, baseline = unpaired[0]
            echo(
                f"note: {len(unpaired)} of the runs to train will be timed against a baseline that already finished "
                f"(e.g. {spec.name} with {baseline.parent.name}/{baseline.name}): their time ratios will pair two "
                "sittings; for a fair one, train both again side by side (--output-dir NEW --only ...)"
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


def runs_without_their_baseline(todo: list[RunSpec]) -> list[tuple[RunSpec, Path]]:
    """The Progtuning runs about to train whose baseline's folder already holds results.

    Such a run trains in another sitting than its baseline, under other load: on a shared or
    hyperthreaded machine its paired time ratio then measures the sittings as much as the arm.
    """
    unpaired = []
    for spec in todo:
        mode = run_mode(spec.config)
        if mode["baseline"]:
            continue
        baseline = spec.run_dir.parent.parent / mode["compared_with"] / spec.run_dir.name
        if (baseline / RESULTS_FILE).is_file():
            unpaired.append((spec, baseline))
    return unpaired


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
