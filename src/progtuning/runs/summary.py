"""The table ``progtuning train`` prints at the end of one run (read from its results)."""

from __future__ import annotations


def print_run_summary(results: dict) -> None:
    """The table ``progtuning train`` prints at the end of a run."""
    from rich.console import Console
    from rich.table import Table

    config = results["config"]
    mode = "Progtuning" if config["progtuning"] else "baseline (no Progtuning)"
    table = Table(title=f"{config['task']} · {config['model']} · {config['method']} · {mode}")
    table.add_column("")
    table.add_column("value", justify="right")
    for split, metrics in results["metrics"].items():
        for name, value in metrics.items():
            if name in ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch"):
                continue
            table.add_row(f"{split} {name}", f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("updated parameters", f"{results['updated_params']:,}")
    table.add_row("without Progtuning", f"{results['baseline_updated_params']:,}")
    table.add_row("reduction (all trainable)", f"{results['reduction']:.1%}")
    table.add_row("reduction (blocks only)", f"{results['reduction_blocks_only']:.1%}")
    from progtuning.runs.contribution import decision_lines

    for label, value in decision_lines(results):
        table.add_row(label, value)
    contribution = bool(results.get("contribution"))
    for stage in results["stages"]:
        name = f"{stage['stage']} lowest blocks frozen" if contribution else f"stage {stage['stage'] + 1}"
        table.add_row(
            f"{name} (steps {stage['start_step']}-{stage['end_step']})",
            f"{stage['trainable_params']:,} params · {stage['wall_time_s']:.1f} s",
        )
    table.add_row("wall time", f"{results['wall_time_s']:.1f} s (training {results['train_time_s']:.1f} s)")
    table.add_row("peak memory (RSS)", f"{results['peak_rss_mb']:,.0f} MiB")
    Console().print(table)
