"""The contribution schedule in the experiment runner: config → policy, the up-front target check,
``progtuning plan``'s bounds, and the lines the run summary prints about the decisions.

The engine lives in :mod:`progtuning.core.contribution` (the rule) and
:mod:`progtuning.core.contribution_freezer` (the signals on a model); this module only translates
between it and a :class:`~progtuning.runs.config.TrainConfig` / results.json.
"""

from __future__ import annotations

from typing import Any

from progtuning.core.contribution import ContributionPolicy, max_reduction


def contribution_policy(config: Any) -> ContributionPolicy | None:
    """The policy a config asks for; ``None`` for the fixed schedule and for the baseline run."""
    if not config.progtuning or config.schedule != "contribution":
        return None
    return ContributionPolicy(
        target_reduction=config.target_reduction,
        threshold=config.contribution_threshold,
        interval=config.decision_interval,
        signal_every=config.signal_every,
    )


def check_target_up_front(config: Any, model) -> None:
    """Refuse an unreachable ``target_reduction`` before anything is written.

    Uses the decision fraction itself (the run's length is not known yet); the first decision of a
    real run falls on a whole step at or before it, so a target passing here is reachable there too.
    The callback checks again, exactly, when training starts.
    """
    policy = contribution_policy(config)
    if policy is None or policy.target_reduction is None:
        return
    from progtuning.core.blocks import find_blocks
    from progtuning.core.contribution import check_target_reachable
    from progtuning.core.contribution_freezer import ContributionFreezer

    freezer = ContributionFreezer(model, policy, find_blocks(model, blocks=config.blocks),
                                  embeddings=config.embeddings, eval_frozen_blocks=False)
    try:
        check_target_reachable(policy, freezer.savings, freezer.method_params)
    finally:
        freezer.close()


def contribution_plan(
    model,
    layout,
    epochs: float,
    embeddings: str = "always",
    target_reduction: float | None = None,
    interval: float = 0.1,
    threshold: float | None = None,
) -> dict:
    """What ``progtuning plan`` can say about a contribution run before it happens: the bounds only.

    Every rung of the ladder (k lowest blocks frozen) with what it trains, and the reduction's range:
    from no freezing (the embedding policy alone) up to the target — or, without one, up to the most
    the policy can reach (all but the top block frozen from the first decision).
    """
    from progtuning.core.contribution import check_target_reachable
    from progtuning.core.contribution_freezer import ContributionFreezer

    policy = ContributionPolicy(target_reduction=target_reduction, threshold=threshold, interval=interval)
    freezer = ContributionFreezer(model, policy, layout, embeddings=embeddings, eval_frozen_blocks=False)
    try:
        check_target_reachable(policy, freezer.savings, freezer.method_params)
        method = freezer.method_params
        limit = policy.frozen_limit(layout.num_blocks)
        rungs = [
            {
                "frozen_blocks": k,
                "blocks": list(stage.blocks),
                "train_embeddings": stage.train_embeddings,
                "trainable_params": method - freezer.savings[k],
                "saved_per_step": freezer.savings[k],
            }
            for k, stage in enumerate(freezer.schedule.stages)
            if k <= limit
        ]
        best = max_reduction(policy, freezer.savings, method)
        return {
            "schedule": "contribution",
            "policy": policy.to_dict(),
            "threshold": policy.effective_threshold,
            "epochs": epochs,
            "rungs": rungs,
            "total_params": sum(p.numel() for p in model.parameters()),
            "method_trainable_params": method,
            "baseline_updated_params": round(epochs * method),
            "reduction_low": freezer.savings[0] / method if method else 0.0,
            "reduction_high": target_reduction if target_reduction is not None else best,
            "max_reduction": best,
            "note": "the contribution schedule decides from signals measured during training which blocks freeze and "
                    "when, so it cannot be planned in advance: these are its bounds",
        }
    finally:
        freezer.close()


def render_contribution_plan(plan: dict, console) -> None:
    from rich.table import Table

    policy = plan["policy"]
    title = (f"{plan['model']} ({plan['model_type']}, {plan['num_blocks']} blocks) · method {plan['method']} · "
             f"embeddings {plan['embeddings']} · schedule contribution")
    rungs = Table(title=title)
    for column in ("lowest blocks frozen", "blocks trained", "embeddings", "trainable params", "saved per step"):
        rungs.add_column(column, justify="right" if "params" in column or "saved" in column else "left")
    for rung in plan["rungs"]:
        blocks = rung["blocks"]
        rungs.add_row(str(rung["frozen_blocks"]), f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0]),
                      "yes" if rung["train_embeddings"] else "no", f"{rung['trainable_params']:,}",
                      f"{rung['saved_per_step']:,}")
    console.print(rungs)
    target = policy["target_reduction"]
    console.print(
        f"decisions every {policy['interval']:.0%} of the optimizer steps; a block is ready below "
        f"{plan['threshold']:g} of the best block's contribution per parameter"
        + (f"; target reduction {target:.1%}" if target is not None else "; no target: the signals alone decide")
    )
    console.print(
        f"reduction of updated parameters over {plan['epochs']} epochs (baseline {plan['baseline_updated_params']:,} "
        f"parameter-epochs): from {plan['reduction_low']:.1%} (no block frozen) to {plan['reduction_high']:.1%} "
        f"({'the target' if target is not None else 'the most reachable'}); at most {plan['max_reduction']:.1%} "
        "with all but the top block frozen from the first decision"
    )
    console.print(plan["note"])


def decision_lines(results: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the run summary: each decision that froze blocks, and the realised stages."""
    summary = results.get("contribution")
    if not summary:
        return []
    rows = []
    for decision in summary["decisions"]:
        if decision["froze_blocks"]:
            blocks = decision["froze_blocks"]
            shown = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
            rows.append((f"step {decision['step']}: froze block(s) {shown}", decision["reason"]))
    if not rows:
        rows.append(("contribution decisions", f"{len(summary['decisions'])}, none froze a block"))
    return rows
