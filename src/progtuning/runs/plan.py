"""``progtuning plan``: parts, stages and the parameter accounting of a run, before training it.

The model is built from its config alone on PyTorch's ``meta`` device — no weights are read or
allocated — so a folder holding only ``config.json`` is enough, and BERT-large plans in a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from progtuning.core.blocks import find_blocks
from progtuning.core.counting import plan_updates
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.core.schedule import explicit, progressive


def build_plan(
    model: str,
    epochs: int = 3,
    stages: int | None = None,
    embeddings: str = "always",
    unit: str = "epoch",
    method: str = "full",
    method_head: str = "classifier",
    num_labels: int = 2,
    stage_blocks: list | None = None,
    blocks: str | None = None,
    task_type: str = "seq_cls",
    schedule: str = "fixed",
    target_reduction: float | None = None,
    decision_interval: float = 0.1,
    contribution_threshold: float | None = None,
) -> dict:
    """The plan as one JSON-ready dict (see ``progtuning plan --json``).

    ``schedule="contribution"``: only the bounds (no freezing ↔ the target), since the stages are
    decided during the run (:func:`progtuning.runs.contribution.contribution_plan`).
    """
    from progtuning.methods.api import MethodConfig, apply_method

    config = _load_config(model)
    config.num_labels = num_labels
    with torch.device("meta"):
        net = _model_from_config(config, task_type)
        net = apply_method(net, MethodConfig(name=method, method_head=method_head), task_type=task_type)
    layout = find_blocks(net, blocks=blocks)
    if schedule == "contribution":
        from progtuning.runs.contribution import contribution_plan

        return {"model": model, "model_type": getattr(config, "model_type", None), "method": method,
                "num_blocks": layout.num_blocks, "block_paths": list(layout.block_paths), "embeddings": embeddings,
                **contribution_plan(net, layout, epochs, embeddings, target_reduction, decision_interval,
                                    contribution_threshold)}
    if schedule != "fixed":
        raise ProgtuningError(f"unknown schedule {schedule!r}: use fixed or contribution")
    # equal shares of the run, as `progtuning train` spreads the stages
    if stage_blocks:
        schedule = explicit(layout.num_blocks, stage_blocks, embeddings, unit, epochs=epochs)
    else:
        schedule = progressive(layout.num_blocks, stages or epochs, embeddings, unit, epochs=epochs)
    freezer = ProgressiveFreezer(net, schedule, layout, eval_frozen_blocks=False)
    accounting = plan_updates(freezer, epochs)
    groups = layout.summary(net)
    return {
        "model": model,
        "model_type": getattr(config, "model_type", None),
        "method": method,
        "method_head": method_head,
        "num_blocks": layout.num_blocks,
        "block_paths": list(layout.block_paths),
        "epochs": epochs,
        "embeddings": embeddings,
        "unit": schedule.unit,
        "parts": _parts(schedule),
        "stages": [
            {
                "stage": s.index,
                "blocks": list(s.blocks),
                "train_embeddings": s.train_embeddings,
                "start": schedule.stages[s.index].start,
                "epochs": s.epochs,
                "trainable_params": s.trainable_params,
                "trainable_block_params": s.trainable_block_params,
            }
            for s in accounting.stages
        ],
        "groups": groups,
        "total_params": accounting.total_params,
        "method_trainable_params": accounting.method_trainable_params,
        "updated_params": accounting.updated_params,
        "baseline_updated_params": accounting.baseline_updated_params,
        "reduction": accounting.reduction,
        "updated_block_params": accounting.updated_block_params,
        "baseline_updated_block_params": accounting.baseline_updated_block_params,
        "reduction_blocks_only": accounting.reduction_blocks_only,
    }


def render_plan(plan: dict) -> None:
    """Print the plan as two rich tables: stages, then the accounting."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if plan.get("schedule") == "contribution":
        from progtuning.runs.contribution import render_contribution_plan

        return render_contribution_plan(plan, console)
    method = plan["method"] if plan["method"] == "full" else f"{plan['method']} (head: {plan['method_head']})"
    title = f"{plan['model']} ({plan['model_type']}, {plan['num_blocks']} blocks) · method {method} · embeddings {plan['embeddings']}"
    stages = Table(title=title)
    for column in ("stage", "starts at", "blocks trained", "embeddings", "trainable params", "of them in blocks"):
        stages.add_column(column, justify="right" if "params" in column else "left")
    for s in plan["stages"]:
        start = f"epoch {s['start']:g}" if plan["unit"] == "epoch" else f"{s['start']:.0%} of steps"
        stages.add_row(
            str(s["stage"] + 1),
            start,
            _ranges(s["blocks"]),
            "yes" if s["train_embeddings"] else "no",
            f"{s['trainable_params']:,}",
            f"{s['trainable_block_params']:,}",
        )
    console.print(stages)
    totals = Table(title=f"updated parameters over {plan['epochs']} epochs (parameter-epochs)")
    for column in ("", "with Progtuning", "without", "reduction"):
        totals.add_column(column, justify="right")
    totals.add_row(
        "all trainable",
        f"{plan['updated_params']:,}",
        f"{plan['baseline_updated_params']:,}",
        f"{plan['reduction']:.1%}",
    )
    totals.add_row(
        "blocks only",
        f"{plan['updated_block_params']:,}",
        f"{plan['baseline_updated_block_params']:,}",
        f"{plan['reduction_blocks_only']:.1%}",
    )
    console.print(totals)
    console.print(
        f"model parameters: {plan['total_params']:,} · trained by {plan['method']}: {plan['method_trainable_params']:,}"
    )


def _parts(schedule) -> list[list[int]]:
    """Blocks that stop training after each stage (the paper's parts), for progressive schedules."""
    parts = []
    for current, following in zip(schedule.stages, schedule.stages[1:]):
        parts.append(sorted(set(current.blocks) - set(following.blocks)))
    parts.append(list(schedule.stages[-1].blocks))
    return parts


def _ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> "0-2, 5-6"."""
    if not blocks:
        return "-"
    runs = [[blocks[0], blocks[0]]]
    for block in blocks[1:]:
        if block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _load_config(model: str):
    from transformers import AutoConfig

    from progtuning.runs.models import resolve_model

    path = resolve_model(model)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = " (a folder needs a config.json)" if Path(path).is_dir() else ""
        raise ProgtuningError(f"cannot read the config of model {model!r}{hint}: {first[:160]}")


def _model_from_config(config, task_type: str):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    auto = AutoModelForQuestionAnswering if task_type == "qa" else AutoModelForSequenceClassification
    return auto.from_config(config)
