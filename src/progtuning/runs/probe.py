"""The paper's Figure 1: how much does each block contribute? Train the embeddings plus one block.

    progtuning probe configs/probe/rotten-tomatoes-minilm-l6.yaml [--seeds 0,1,2] [--blocks 0,5]
                     [--no-full] [--parallel 2] [--out DIR] [--key value ...]

For every block i the run trains the embeddings, block i and the head, every other block frozen,
with the budget of the given train config (the paper: BERT-base on SST-2, where higher blocks
scored better, which is why Progtuning trains the top blocks longest). It is the ordinary
``progtuning train`` machinery with an explicit one-stage schedule ``stage_blocks: [[i]]`` and
``embeddings: always`` (``progtuning probe``'s default, unless the config says otherwise), so the freezing, the accounting and
the results.json are the same as everywhere else. As a reference line the same budget also trains
every block without Progtuning (``full``; skip with ``--no-full``). A head-only reference is not
offered: a schedule stage needs at least one block.

Each run is a sweep run (:mod:`progtuning.runs.sweep`): a fresh process, its own folder
``OUT/block<i>/seed<k>`` (and ``OUT/full/seed<k>``), skipped when finished, so an interrupted probe
continues. The score is the task's main metric on the **validation** split (as the paper's dev
set); test scores are kept too. ``OUT/probe.json`` holds every number and ``OUT/probe.png`` the
plot: the median over seeds per block, whiskers min–max, each seed a dot.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from progtuning.errors import ProgtuningError
from progtuning.runs.config import TrainConfig, load_config
from progtuning.runs.results import PROBE_FILE, PROBE_PLOT, RESULTS_FILE
from progtuning.runs.sweep import Runner, run_sweep, subprocess_runner
from progtuning.runs.sweep_grid import RunSpec, Sweep


def num_blocks_of(config: TrainConfig) -> int:
    """The model's block count, from its config alone (no weights loaded)."""
    from progtuning.runs.plan import build_plan

    return int(build_plan(config.model, epochs=1, stages=1, method=config.method, blocks=config.blocks)["num_blocks"])


def probe_specs(
    config: TrainConfig,
    out_dir: str | Path,
    num_blocks: int,
    blocks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    full: bool = True,
) -> list[RunSpec]:
    """The runs of a probe: one per (block, seed), plus the all-blocks reference per seed."""
    out_dir = Path(out_dir)
    blocks = list(range(num_blocks)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if bad:
        raise ProgtuningError(f"block(s) {bad} out of range: the model has blocks 0..{num_blocks - 1}")
    seeds = [config.seed] if not seeds else [int(s) for s in seeds]
    base = config.to_dict()
    specs = []
    for seed in seeds:
        runs: list[tuple[str, dict]] = [
            (f"block{b}", {"progtuning": True, "stage_blocks": [[b]], "stages": None, "stage_unit": "epoch"})
            for b in blocks
        ]
        if full:
            runs.append(("full", {"progtuning": False, "stage_blocks": None}))
        for name, values in runs:
            run_dir = out_dir / name / f"seed{seed}"
            settings = {**base, **values, "seed": seed, "output_dir": str(run_dir), "overwrite": True, "resume": False}
            checked = load_config(None, settings)
            specs.append(RunSpec(f"{name}/seed{seed}", run_dir, checked.to_dict()))
    return specs


def run_probe(
    config: TrainConfig,
    blocks: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    seeds: Sequence[int] | None = None,
    full: bool = True,
    parallel: int = 1,
    runner: Runner = subprocess_runner,
    num_blocks: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run (or finish) the probe and return the ``probe.json`` dict; also writes ``probe.png``."""
    out_dir = Path(out_dir or f"runs/probe/{config.task}/{config.model}-{config.method}")
    num_blocks = num_blocks or num_blocks_of(config)
    specs = probe_specs(config, out_dir, num_blocks, blocks, seeds, full)
    source = {"probe": config.to_dict(), "blocks": blocks, "seeds": seeds, "full": full}
    outcomes = run_sweep(Sweep(out_dir, parallel, specs, source), runner=runner, echo=echo)
    failed = [o.spec.name for o in outcomes if not o.ok]
    summary = summarize_probe(specs, config, num_blocks)
    summary["failed"] = failed
    (out_dir / PROBE_FILE).write_text(json.dumps(summary, indent=2))
    from progtuning.runs.report_plots import plot_probe

    summary["plot"] = str(plot_probe(summary, out_dir / PROBE_PLOT))
    echo(render_probe(summary))
    return summary


def summarize_probe(specs: Sequence[RunSpec], config: TrainConfig, num_blocks: int) -> dict:
    """Collect the finished runs' scores: per block (and the full reference), over seeds."""
    groups: dict[str, list[dict]] = {}
    for spec in specs:
        path = spec.run_dir / RESULTS_FILE
        if path.is_file():
            groups.setdefault(spec.name.split("/")[0], []).append(json.loads(path.read_text()))
    metric = next((r["main_metric"] for rs in groups.values() for r in rs), None)

    def entry(results: list[dict]) -> dict[str, Any]:
        val = [r["validation_score"] for r in results if r.get("validation_score") is not None]
        test = [r["test_score"] for r in results if r.get("test_score") is not None]
        first_stage = results[0]["stages"][0] if results and results[0].get("stages") else {}
        return {
            "seeds": [r["seed"] for r in results],
            "validation": val,
            "test": test,
            "validation_median": statistics.median(val) if val else None,
            "validation_min": min(val) if val else None,
            "validation_max": max(val) if val else None,
            "test_median": statistics.median(test) if test else None,
            "trainable_params": first_stage.get("trainable_params"),
            "train_time_s": statistics.median(r["train_time_s"] for r in results) if results else None,
        }

    rows = []
    for name in sorted((n for n in groups if n.startswith("block")), key=lambda n: int(n[5:])):
        rows.append({"block": int(name[5:]), **entry(groups[name])})
    ranked = [r for r in rows if r["validation_median"] is not None]
    signal = None
    if len(ranked) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr([r["block"] for r in ranked], [r["validation_median"] for r in ranked])[0]
        signal = None if rho != rho else float(rho)  # nan (all scores equal) → None
    return {
        "task": config.task,
        "model": config.model,
        "method": config.method,
        "metric": metric,
        "split": "validation",
        "num_blocks": num_blocks,
        "embeddings": config.embeddings,
        "budget": {
            "epochs": config.epochs,
            "max_train_examples": config.max_train_examples,
            "max_eval_examples": config.max_eval_examples,
            "max_length": config.max_length,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
        },
        "blocks": rows,
        "full": entry(groups["full"]) if "full" in groups else None,
        "best_block": max(ranked, key=lambda r: r["validation_median"])["block"] if ranked else None,
        "spearman_block_vs_score": signal,
    }


def render_probe(summary: dict) -> str:
    metric = summary["metric"] or "score"
    lines = [
        f"probe: {summary['task']} · {summary['model']} · {summary['method']} · embeddings {summary['embeddings']} + one block "
        f"({metric}, validation, median [min–max] over seeds)"
    ]
    for row in summary["blocks"]:
        lines.append(
            f"  block {row['block']:>2}: {_cell(row)}   test {_f(row['test_median'])}   "
            f"trainable {row['trainable_params'] or 0:,}   seeds {row['seeds']}"
        )
    if summary["full"]:
        lines.append(f"  all blocks (no Progtuning): {_cell(summary['full'])}   test {_f(summary['full']['test_median'])}")
    if summary["best_block"] is not None:
        lines.append(f"  best block: {summary['best_block']}")
    if summary["spearman_block_vs_score"] is not None:
        lines.append(f"  Spearman(block index, score) = {summary['spearman_block_vs_score']:+.2f} (+1: higher blocks always better)")
    if summary.get("failed"):
        lines.append(f"  failed runs: {', '.join(summary['failed'])} (run the same command again to retry)")
    return "\n".join(lines)


def _cell(entry: dict) -> str:
    if entry["validation_median"] is None:
        return "—"
    return f"{entry['validation_median']:.4f} [{entry['validation_min']:.4f}–{entry['validation_max']:.4f}]"


def _f(value) -> str:
    return "—" if value is None else f"{value:.4f}"
