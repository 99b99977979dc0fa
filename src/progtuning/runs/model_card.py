"""The model card of a run: ``OUTPUT_DIR/README.md``, built from its ``results.json`` alone.

It says what a reader of the hub page needs: the base model, the task and its data, the method,
the Progtuning schedule stage by stage, the updated parameters against the same run without
Progtuning, the scores, how to load the model, and the ``progtuning train`` command that
reproduces it. The metadata block at the top is huggingface_hub's ``ModelCardData`` (``base_model``,
``library_name``, ``pipeline_tag``, ``tags``, ``datasets``, ``metrics``), which the hub indexes.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

from progtuning.runs.publish import base_model_reference, is_hub_id

PAPER = "https://arxiv.org/abs/2506.21119"
# config keys that do not change what is trained (where it goes, whether it is published)
_NOT_REPRODUCED = ("output_dir", "overwrite", "resume", "push_to_hub", "hub_model_id", "hub_private", "report_to")
# Trainer bookkeeping among a split's metrics
_NOT_SCORES = ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch")
_PIPELINES = {"classification": "text-classification", "regression": "text-classification",
              "extractive_qa": "question-answering"}
_AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                 "regression": "AutoModelForSequenceClassification",
                 "extractive_qa": "AutoModelForQuestionAnswering"}
_METHODS = {"full": "full fine-tuning", "lora": "LoRA", "adapter": "bottleneck adapters", "bitfit": "BitFit",
            "peft": "a peft method"}


def reproduce_command(config: dict) -> str:
    """``progtuning train`` with every key that differs from its default (outputs and publishing left out)."""
    from progtuning.runs.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    words = ["progtuning", "train"]
    for key, value in config.items():
        if key in _NOT_REPRODUCED or key not in defaults or value == defaults[key] or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            for name, item in value.items():
                words += [f"{flag}.{name}", _text(item)]
        else:
            words += [flag, _text(value)]
    return " ".join(shlex.quote(w) for w in words)


def _text(value: Any) -> str:
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def model_card(results: dict, repo_id: str | None = None) -> str:
    """The card's Markdown (metadata block included) for a run's ``results.json``."""
    from huggingface_hub import ModelCardData

    config, task, schedule = results["config"], results["task"], results["schedule"]
    method = config["method"]
    merged = method == "lora" and config.get("merge_lora")
    base = base_model_reference(config["model"])
    hub_base = base if is_hub_id(base) else None
    library = "peft" if method in ("lora", "peft") and not merged else "transformers"
    scores = {split: {k: v for k, v in m.items() if k not in _NOT_SCORES} for split, m in results["metrics"].items()}
    metadata = ModelCardData(
        base_model=hub_base,
        library_name=library,
        pipeline_tag=_PIPELINES.get(task["kind"]),
        tags=["progtuning", "progressive-fine-tuning", method, *(["lora"] if merged else [])],
        datasets=[config["dataset"]] if config.get("dataset") else None,
        metrics=sorted({k for m in scores.values() for k in m}) or None,
    )
    title = repo_id or Path(config["output_dir"]).name
    blocks, stages = results["model"]["num_blocks"], schedule["stages"]
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {title}", "",
        f"{_link(base)} fine-tuned on **{task['name']}** ({task['kind']}) with {_method_text(config)} and "
        f"[Progtuning]({PAPER}), progressive fine-tuning: the model's {blocks} blocks were split into "
        f"{len(stages)} parts, and each stage stopped updating the lowest part still training, so the higher "
        "blocks trained longest. Written by `progtuning train`.",
        "",
        "## Results", "",
        *_scores_table(scores, results.get("main_metric")),
        "",
        "## Training", "",
        f"- **Base model**: {_link(base)}" + (f" (alias `{config['model']}`)" if base != config["model"] else ""),
        f"- **Task**: {task['name']}, {task['kind']}" + _labels_text(task) + _sizes_text(task),
        f"- **Method**: {_method_text(config)}" + (", merged into the base weights" if merged else ""),
        f"- **Schedule**: {_schedule_text(config, schedule)}",
        f"- **Updated parameters**: {results['updated_params']:,} parameter-epochs; "
        f"{results['baseline_updated_params']:,} without Progtuning: "
        f"{results['reduction']:.1%} fewer ({results['reduction_blocks_only']:.1%} of block parameters)",
        f"- **Optimisation**: {_number(config['epochs'])} epochs ({results['steps']} optimizer steps), "
        f"learning rate {config['learning_rate']:g}, batch size {config['batch_size']}, seed {config['seed']}",
        "",
        *_stages_table(results),
        "",
        "## Use", "",
        *_usage(task, method, merged, repo_id, hub_base, config["output_dir"]),
        "",
        "## Reproduce", "",
        "```bash", reproduce_command(config), "```", "",
        f"Library versions: {', '.join(f'{k} {v}' for k, v in results.get('versions', {}).items())}.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(results: dict, path: str | Path, repo_id: str | None = None) -> Path:
    """Write the card to ``path`` through a hidden sibling (``.README.md.*``, a name the run folder's
    manifest owns), so a full disk never leaves half a card."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(model_card(results, repo_id))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _link(model: str) -> str:
    return f"[{model}](https://huggingface.co/{model})" if is_hub_id(model) else f"`{model}`"


def _number(value: float) -> str:
    return f"{value:g}"


def _method_text(config: dict) -> str:
    method = config["method"]
    if method == "lora":
        return f"LoRA (r={config['lora_r']}, alpha={config['lora_alpha']})"
    if method == "adapter":
        return f"{config['adapter_type'].capitalize()} bottleneck adapters (reduction {config['adapter_reduction_factor']})"
    return _METHODS.get(method, method)


def _labels_text(task: dict) -> str:
    labels = task.get("num_labels")
    return f", {labels} labels" if task["kind"] == "classification" and labels else ""


def _sizes_text(task: dict) -> str:
    sizes = task.get("sizes") or {}
    return f" ({', '.join(f'{split} {n:,}' for split, n in sizes.items())} examples)" if sizes else ""


def _schedule_text(config: dict, schedule: dict) -> str:
    if not config["progtuning"]:
        return "none (the baseline: every stage trains everything)"
    unit = "epoch" if schedule["unit"] == "epoch" else "fraction of the optimizer steps"
    return (f"{len(schedule['stages'])} stages by {unit}, embeddings trained `{schedule['embeddings']}`"
            f" ({schedule['name']})")


def _scores_table(scores: dict, main: str | None) -> list[str]:
    names = sorted({k for m in scores.values() for k in m}, key=lambda k: (k != main, k))
    if not names:
        return ["No scores were recorded."]
    lines = ["| split | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for split, values in scores.items():
        cells = [f"{values[n]:.4f}" if isinstance(values.get(n), (int, float)) else "" for n in names]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return lines


def _stages_table(results: dict) -> list[str]:
    from progtuning.core.stage_log import block_ranges

    starts = results.get("planned_stage_starts") or []
    ran = {s["stage"]: s for s in results.get("stages", [])}
    lines = ["| stage | from step | blocks trained | embeddings | trainable parameters |",
             "| --- | --- | --- | --- | --- |"]
    for index, stage in enumerate(results["schedule"]["stages"]):
        trainable = ran.get(index, {}).get("trainable_params")
        start = starts[index] if index < len(starts) else ""
        lines.append(f"| {index + 1} | {start} | {block_ranges(stage['blocks']) or 'none'} | "
                     f"{'yes' if stage['train_embeddings'] else 'no'} | "
                     f"{f'{trainable:,}' if trainable is not None else 'not reached'} |")
    return lines


def _usage(task: dict, method: str, merged: bool, repo_id: str | None, hub_base: str | None,
           output_dir: str) -> list[str]:
    where = repo_id or f"{output_dir}/model"
    auto = _AUTO_CLASSES.get(task["kind"], "AutoModel")
    if method in ("lora", "peft") and not merged:
        auto_peft = auto.replace("AutoModel", "AutoPeftModel")
        code = [f"from peft import {auto_peft}", "from transformers import AutoTokenizer", "",
                f'model = {auto_peft}.from_pretrained("{where}")  # loads the base model it names, then the adapter',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
    elif method in ("adapter", "bitfit"):
        code = ["from progtuning import load_method", "from transformers import AutoTokenizer", "",
                f'model = load_method("{hub_base or "BASE_MODEL"}", "{where}")  # the base, then what {method} trained',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
    else:
        code = [f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
    return ["```python", *code, "```", "",
            f"Or, from the run folder: `progtuning predict {output_dir} --file new.csv` (CSV, TSV or JSONL)."]
