"""The bench's targets and its printed tables (from the results dict :func:`~progtuning.runs.bench.run_bench` returns)."""

from __future__ import annotations

from typing import Any

from progtuning.runs.bench_config import BenchConfig


def targets(result: dict, config: BenchConfig) -> dict:
    variants = result["variants"]
    targets: dict[str, Any] = {}

    def check(name: str, value, limit: float, smaller: bool = True):
        if value is None:
            return
        targets[name] = {"value": value, "limit": limit, "met": value <= limit if smaller else value >= limit}

    if "prog-never" in variants:
        check("schedule, embeddings frozen, no cache <= 0.72", variants["prog-never"]["schedule_ratio"], 0.72)
    cached = [v for n, v in variants.items() if n.startswith("prog-") and n.endswith("+cache")]
    if cached:
        best = min(v["schedule_ratio"] for v in cached)
        check("schedule, cache incl. build <= 0.60", best, 0.60)
    overhead = result.get("callback_overhead")
    if overhead:
        check("stage 1 via Trainer + callback within 2% of a plain Trainer step", overhead["ratio"], 1.02)
    last = [v["stages"][-1].get("memory_ratio") for n, v in variants.items() if n.startswith("prog-")]
    last = [x for x in last if x is not None]
    if last:
        check(f"last-stage peak memory <= 0.5 x full (batch {config.memory_batch})", min(last), 0.5)
    return targets


def format_results(results: dict) -> str:
    """The per-stage and whole-schedule tables as plain text."""
    lines = []
    cfg = results["config"]
    lines.append(
        f"{cfg['arch']} hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, intermediate "
        f"{cfg['intermediate']}, seq {cfg['seq']}, batch {cfg['batch']}, T={cfg['stages']} on {results['device']} "
        f"({results['threads']} threads, {results['clock']} time); full step {results['full_step_s']:.3f}s; medians over "
        f"{cfg['rounds']} rounds x {cfg['steps']} steps"
    )
    header = f"{'variant':<26}{'stage':>6}{'step s':>9}{'ratio':>8}{'FLOP':>7}{'build s':>9}{'peak MB':>9}{'mem':>7}{'act MB':>8}"
    lines.append(header)
    lines.append("-" * len(header))
    for name, variant in results["variants"].items():
        for s in variant["stages"]:
            build = f"{s['build_s']:.3f}" if s.get("build_s") is not None else "-"
            peak = f"{s['peak_mb']:.0f}" if s.get("peak_mb") is not None else "-"
            mem = f"{s['memory_ratio']:.2f}" if s.get("memory_ratio") is not None else "-"
            act = f"{s['activations_mb']:.0f}" if s.get("activations_mb") is not None else "-"
            lines.append(
                f"{name if s['stage'] == 0 else '':<26}{s['stage'] + 1:>6}{s['step_s']:>9.3f}{s['ratio']:>8.3f}"
                f"{s['flop_ratio']:>7.3f}{build:>9}{peak:>9}{mem:>7}{act:>8}"
            )
    lines.append("")
    lines.append(f"{'whole schedule':<26}{'ratio':>8}{'steps only':>12}{'FLOP':>8}{'vs LoRA':>9}{'FLOP vs LoRA':>14}")
    for name, variant in results["variants"].items():
        vs = variant.get("schedule_ratio_vs_lora")
        vs_flop = variant.get("schedule_flop_ratio_vs_lora")
        lines.append(
            f"{name:<26}{variant['schedule_ratio']:>8.3f}{variant['schedule_ratio_steps_only']:>12.3f}"
            f"{variant['schedule_flop_ratio']:>8.3f}{(f'{vs:.3f}' if vs else '-'):>9}"
            f"{(f'{vs_flop:.3f}' if vs_flop else '-'):>14}"
        )
    overhead = results.get("callback_overhead")
    if overhead:
        lines.append("")
        lines.append(
            f"callback overhead (HF Trainer, stage 1): plain {overhead['plain_trainer_step_s']:.3f}s, with "
            f"ProgtuningCallback {overhead['callback_trainer_step_s']:.3f}s, ratio {overhead['ratio']:.3f}"
        )
    if results.get("targets"):
        lines.append("")
        for name, target in results["targets"].items():
            lines.append(f"[{'met' if target['met'] else 'NOT met'}] {name}: {target['value']}")
    return "\n".join(lines)
