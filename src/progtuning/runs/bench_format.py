"""What ``progtuning bench`` prints: the costs a user can act on (from :func:`~progtuning.runs.bench.run_bench`).

Every measured case is named by the ``progtuning train`` options that give it, and compared with
full fine-tuning on the same model: the time of a whole run and what that saves, the peak memory
of the last stage, then each stage's step time and memory. The JSON (``--json``) keeps every number,
FLOP-model bounds included; the text leaves out what a user cannot act on.
"""

from __future__ import annotations

# bench variant -> the `progtuning train` options that run it
_OPTIONS = {
    "full": "full fine-tuning (--no-progtuning)",
    "prog-always": "Progtuning as it comes (--embeddings always)",
    "prog-first_stage": "--embeddings first_stage",
    "prog-never": "--embeddings never",
    "prog-never/dropout-on": "--embeddings never --no-eval-frozen-blocks",
    "lora": "LoRA alone (--method lora --no-progtuning)",
    "lora+prog": "--method lora",
    "lora+prog+cache": "--method lora --cache-frozen",
}


def option_text(variant: str) -> str:
    """The options of ``progtuning train`` that a bench variant measures."""
    if variant in _OPTIONS:
        return _OPTIONS[variant]
    if variant.startswith("prog-") and variant.endswith("+cache"):
        return f"--embeddings {variant[len('prog-'):-len('+cache')]} --cache-frozen"
    return variant


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


def format_results(results: dict) -> str:
    """The tables ``progtuning bench`` prints."""
    cfg, variants = results["config"], results["variants"]
    full = variants["full"]["stages"][0]
    width = max(len(option_text(name)) for name in variants) + 2
    clock = "CPU time" if results["clock"] == "cpu" else "wall time"
    lines = [
        f"{cfg['arch']}, hidden {cfg['hidden']}, {cfg['layers']} blocks, sequence {cfg['seq']}, batch {cfg['batch']}, "
        f"T={cfg['stages']} stages, on {results['device']} ({_count(results['threads'], 'thread')}, {clock}; "
        f"medians of {_count(cfg['rounds'], 'round')} x {_count(cfg['steps'], 'step')})",
        f"full fine-tuning: {results['full_step_s']:.3f} s per optimizer step"
        + (f", peak memory {full['peak_mb']:,.0f} MB at batch {cfg['memory_batch']}" if full.get("peak_mb") else ""),
        "",
        "a whole run of T equal epochs against full fine-tuning (cache building included):",
        f"  {'option (progtuning train ...)':<{width}}{'time':>7}{'saves':>8}{'last-stage memory':>19}",
    ]
    for name, variant in variants.items():
        if name == "full":
            continue
        ratio = variant["schedule_ratio"]
        memory = variant["stages"][-1].get("memory_ratio")
        vs_lora = variant.get("schedule_ratio_vs_lora")
        note = f"   ({_percent(vs_lora)} of LoRA alone)" if vs_lora and name != "lora" else ""
        lines.append(f"  {option_text(name):<{width}}{_percent(ratio):>7}{_percent(1 - ratio):>8}"
                     f"{_percent(memory):>19}{note}")
    stages = cfg["stages"]
    lines += ["", "each stage, as step time / peak memory against full fine-tuning:",
              f"  {'option':<{width}}" + "".join(f"{f'stage {t + 1}':>15}" for t in range(stages))]
    for name, variant in variants.items():
        if name == "full":
            continue
        cells = [f"{_percent(s['ratio'])} / {_percent(s.get('memory_ratio'))}" for s in variant["stages"]]
        lines.append(f"  {option_text(name):<{width}}" + "".join(f"{c:>15}" for c in cells))
    overhead = results.get("callback_overhead")
    if overhead:
        lines += ["", f"the ProgtuningCallback itself: a Trainer step took {overhead['callback_trainer_step_s']:.3f} s "
                      f"with it and {overhead['plain_trainer_step_s']:.3f} s without ({overhead['ratio'] - 1:+.1%})"]
    return "\n".join(lines)
