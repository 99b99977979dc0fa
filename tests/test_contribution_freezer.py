"""The contribution schedule on tiny models: signals, decisions, methods, counting, exact resume.

The constructed case: a forward hook turns chosen blocks into near-identities,
``out = x + 1e-3 (block(x) - x)``, so their parameters' gradients (and so their contribution to
the loss decrease) are 1000x smaller than the other blocks'. Damping the lowest two blocks must
freeze exactly them; damping two middle blocks must freeze nothing (the lowest block still
contributes, and frozen blocks form a prefix) unless a target forces it, and then later.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_batch, tiny_model

from progtuning.core.contribution import ContributionPolicy
from progtuning.core.contribution_freezer import ContributionFreezer, prefix_ladder
from progtuning.core.counting import count_updates
from progtuning.methods.api import MethodConfig, apply_method

TOTAL = 12
LR = 1e-3


def damp(model, blocks, factor=1e-3):
    def hook(module, args, output):
        x = args[0]
        h = output[0] if isinstance(output, tuple) else output
        y = x + factor * (h - x)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    layers = _layers(model)
    return [layers[i].register_forward_hook(hook) for i in blocks]


def _layers(model):
    return model.get_submodule(next(n for n, m in model.named_modules() if n.endswith("encoder.layer")))


def run_loop(model, policy, total=TOTAL, start=0, freezer=None, optimizer=None, scheduler=None, stop=None):
    """The plain loop of the module docstring; batches depend on the step only, so a resume sees the same ones."""
    freezer = freezer or ContributionFreezer(model, policy)
    optimizer = optimizer or torch.optim.AdamW(freezer.trainable_parameters(), lr=LR)
    for step in range(start, stop if stop is not None else total):
        freezer.apply_for_step(step, 3, total, optimizer)
        model(**tiny_batch(8, seed=step)).loss.backward()
        freezer.before_optimizer_step(step)
        optimizer.step()
        freezer.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)
    return freezer, optimizer


def test_the_signal_is_gradient_times_update_without_a_copy_of_the_weights():
    model = tiny_model("bert", 4)
    freezer = ContributionFreezer(model, ContributionPolicy(ema_decay=0.0))  # decay 0: the average is the last step
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=LR)
    freezer.apply_for_step(0, 5, TOTAL, optimizer)
    model(**tiny_batch(8)).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freezer.before_optimizer_step(0)
    optimizer.step()
    freezer.after_optimizer_step(0)
    for i, names in enumerate(freezer._block_names):
        params = dict(model.named_parameters())
        direct = -sum((params[n].grad.double() * (params[n].detach().double() - before[n].double())).sum().item()
                      for n in names)
        norm = sum(params[n].grad.double().pow(2).sum().item() for n in names) ** 0.5
        # <g, W_before> - <g, W_after> are two float32 dots of k terms each: each is off by at most
        # k x 2^-24 x sum |g W| (the textbook bound for a float32 sum of k products), so their difference by twice that
        k = max(params[n].numel() for n in names)
        bound = 2 * k * 2**-24 * sum((params[n].grad.double() * params[n].detach().double()).abs().sum().item()
                                     for n in names)
        assert direct > 0 and bound < 0.05 * direct  # the bound is tight enough to mean something
        assert freezer.tracker.mean_contribution(i) == pytest.approx(direct, abs=bound)
        assert freezer.tracker.mean_grad_norm(i) == pytest.approx(norm, rel=k * 2**-24)


def test_blocks_whose_gradients_vanish_freeze_first_and_stay_untouched():
    model = tiny_model("bert", 4)
    damp(model, [0, 1])
    freezer, optimizer = run_loop(model, ContributionPolicy(interval=0.25), stop=4)  # decisions at steps 3, 6, 9
    first = freezer.decisions[0]
    assert (first["step"], first["frozen_after"], first["reason"], first["froze_blocks"]) == (3, 2, "signals", [0, 1])
    assert max(first["scores"][:2]) < 0.01 < 0.5 < min(first["scores"][2:])
    names = {i: freezer._block_names[i] for i in range(4)}
    params = dict(model.named_parameters())
    assert all(not params[n].requires_grad and params[n].grad is None for i in (0, 1) for n in names[i])
    assert all(params[n].requires_grad for i in (2, 3) for n in names[i])
    frozen_now = {n: params[n].detach().clone() for i in (0, 1) for n in names[i]}
    run_loop(model, None, start=4, freezer=freezer, optimizer=optimizer)
    assert all(torch.equal(params[n], value) for n, value in frozen_now.items())
    assert freezer.realised_stages(TOTAL) == [
        {"stage": 0, "frozen_blocks": 0, "blocks": [0, 1, 2, 3], "train_embeddings": True, "start_step": 0, "end_step": 3},
        {"stage": 2, "frozen_blocks": 2, "blocks": [2, 3], "train_embeddings": True, "start_step": 3, "end_step": 12},
    ]


def test_a_contributing_lowest_block_keeps_everything_training_unless_a_target_forces_it():
    model = tiny_model("bert", 4)
    damp(model, [1, 2])  # the middle blocks do nothing; block 0 still does
    freezer, _ = run_loop(model, ContributionPolicy(interval=0.25))
    assert [d["frozen_after"] for d in freezer.decisions] == [0, 0, 0]
    assert all(d["scores"][1] < 0.01 and d["scores"][0] > 0.3 for d in freezer.decisions)

    # with a target the deadline freezes the prefix: as late as the target allows, not at the first decision
    forced, _ = run_loop(tiny_model("bert", 4), ContributionPolicy(target_reduction=0.1, interval=0.25))
    model = tiny_model("bert", 4)
    damp(model, [0, 1])
    willing, _ = run_loop(model, ContributionPolicy(target_reduction=0.1, interval=0.25))
    first_forced = next(d for d in forced.decisions if d["froze_blocks"])
    first_willing = next(d for d in willing.decisions if d["froze_blocks"])
    assert first_willing["step"] == 3 and first_willing["reason"].startswith("signals")
    assert first_forced["step"] > 3 and first_forced["reason"] == "deadline"
    for freezer in (forced, willing):
        accounting = count_updates(freezer, freezer.level_lengths(TOTAL))
        assert 0.1 <= accounting.reduction <= 0.1 + max(freezer.block_params) / freezer.method_params


def test_counting_follows_the_realised_stages():
    model = tiny_model("bert", 4)
    damp(model, [0])
    freezer, _ = run_loop(model, ContributionPolicy(interval=0.25))
    stages = freezer.realised_stages(TOTAL)
    assert [s["frozen_blocks"] for s in stages] == [0, 1]
    trainable = {k: freezer.method_params - freezer.savings[k] for k in range(4)}
    updated = sum((s["end_step"] - s["start_step"]) * trainable[s["stage"]] for s in stages)
    accounting = count_updates(freezer, freezer.level_lengths(TOTAL), epochs=4)
    assert accounting.updated_params == round(updated * 4 / TOTAL)  # parameter-epochs: 3 steps per epoch
    assert accounting.baseline_updated_params == 4 * freezer.method_params
    assert accounting.reduction == pytest.approx(1 - updated / (TOTAL * freezer.method_params))
    assert sum(freezer.level_lengths(TOTAL)) == TOTAL


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit"])
def test_peft_methods_measure_and_freeze_their_own_parameters_only(method):
    model = apply_method(tiny_model("bert", 4), MethodConfig(name=method, lora_r=4))
    damp(model, [0, 1])
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    freezer, _ = run_loop(model, ContributionPolicy(interval=0.25))
    assert freezer.decisions[0]["froze_blocks"] == [0, 1]
    groups = freezer.layout.groups
    trainable_now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_now == {n for n in trainable_before if groups[n] not in (0, 1)}  # inside the method's set
    assert all(freezer.block_params[i] == sum(p.numel() for n, p in model.named_parameters()
                                             if n in trainable_before and groups[n] == i) for i in range(4))


def test_a_resumed_loop_makes_the_same_decisions_and_weights_bit_for_bit():
    policy = ContributionPolicy(target_reduction=0.3, interval=0.25, signal_every=2)

    def fresh():
        model = tiny_model("bert", 4, hidden_dropout_prob=0.1)
        damp(model, [0])
        return model

    torch.manual_seed(1)
    reference_model = fresh()
    reference, _ = run_loop(reference_model, policy)

    torch.manual_seed(1)
    model = fresh()
    first, optimizer = run_loop(model, policy, stop=6)  # resumes right at a decision (3, 6, 9)
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's JSON holds
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer_state = optimizer.state_dict()
    rng = torch.get_rng_state()

    resumed_model = fresh()
    with torch.no_grad():
        for n, p in resumed_model.named_parameters():
            p.copy_(weights[n])
    second = ContributionFreezer(resumed_model, policy)
    second.load_state_dict(saved)
    optimizer = torch.optim.AdamW(second.trainable_parameters(), lr=LR)
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng)
    run_loop(resumed_model, policy, start=6, freezer=second, optimizer=optimizer)

    assert second.decisions == reference.decisions and len(reference.decisions) == 3
    assert all(d["froze_blocks"] for d in reference.decisions[1:])  # blocks freeze after the resume too
    assert second.history == reference.history
    final, expected = dict(resumed_model.named_parameters()), dict(reference_model.named_parameters())
    assert all(torch.equal(final[n], expected[n]) for n in expected)


def test_a_checkpoint_of_another_policy_is_refused():
    freezer, _ = run_loop(tiny_model("bert", 4), ContributionPolicy(target_reduction=0.1), stop=3)
    other = ContributionFreezer(tiny_model("bert", 4), ContributionPolicy(target_reduction=0.2))
    with pytest.raises(Exception, match="another contribution policy"):
        other.load_state_dict(freezer.state_dict())


def test_the_ladder_is_every_frozen_prefix():
    ladder = prefix_ladder(4, embeddings="first_stage")
    assert [s.blocks for s in ladder.stages] == [(0, 1, 2, 3), (1, 2, 3), (2, 3), (3,)]
    assert [s.train_embeddings for s in ladder.stages] == [True, False, False, False]
    assert ladder.name == "contribution"
