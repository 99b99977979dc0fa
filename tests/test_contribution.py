"""The contribution schedule's pure parts: policy, signal averages, scores and the decision rule.

No torch here: the rule takes numbers and returns how many of the lowest blocks are frozen. The
hand-computed cases use 4 blocks whose rungs save 0/10/20/30 parameters per step out of 100, over
a 100-step run, so every budget is easy to check by hand; a randomised run of the rule checks that
it realises its target (never below it, at most one block's worth above it).
"""

from __future__ import annotations

import json
import random

import pytest

from progtuning.core.contribution import (
    ContributionPolicy,
    SignalTracker,
    check_target_reachable,
    decide,
    max_reduction,
    saved_until,
    scores,
)
from progtuning.errors import ProgtuningError
from progtuning.runs.config import load_config

SAVINGS = [0, 10, 20, 30]  # parameters not updated per step with 0, 1, 2, 3 lowest blocks frozen
METHOD = 100
TOTAL = 100


def _decide(policy, step, frozen, block_scores, saved=0.0, next_decision=None):
    return decide(policy, step=step, total_steps=TOTAL, next_decision=next_decision or step + 10, frozen=frozen,
                  block_scores=block_scores, savings=SAVINGS, method_params=METHOD, saved=saved)


# -- policy --------------------------------------------------------------------------------------
def test_decision_steps_fall_every_interval_and_never_at_the_ends():
    assert ContributionPolicy(interval=0.1).decision_steps(100) == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert ContributionPolicy(interval=0.25).decision_steps(24) == [6, 12, 18]
    assert ContributionPolicy(interval=0.1).decision_steps(5) == [1, 2, 3, 4]  # no step twice, none at 0
    assert ContributionPolicy(interval=0.5).decision_steps(1) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_reduction": 1.5}, "target_reduction must lie in \\(0, 1\\)"),
        ({"target_reduction": 0.0}, "target_reduction must lie in \\(0, 1\\)"),
        ({"interval": 0.0}, "decision_interval must lie in \\(0, 1\\)"),
        ({"interval": 1.0}, "decision_interval must lie in \\(0, 1\\)"),
        ({"signal_every": 0}, "signal_every must be a whole number >= 1"),
        ({"threshold": -0.1}, "contribution_threshold must be a number >= 0"),
    ],
)
def test_impossible_knobs_are_one_line_errors(kwargs, message):
    with pytest.raises(ProgtuningError, match=message) as info:
        ContributionPolicy(**kwargs)
    assert "\n" not in str(info.value)


def test_policy_round_trips_through_json():
    policy = ContributionPolicy(target_reduction=0.25, threshold=0.5, interval=0.2, signal_every=3)
    assert ContributionPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert ContributionPolicy().effective_threshold == 0.3


# -- signals -------------------------------------------------------------------------------------
def test_tracker_averages_are_bias_corrected_and_skip_blocks_that_did_not_train():
    tracker = SignalTracker(3, decay=0.9)
    tracker.update([2.0, float("nan"), None], [1.0, float("nan"), None])
    assert tracker.mean_contribution(0) == pytest.approx(2.0)  # one measurement: its value, not 10% of it
    assert tracker.mean_contribution(1) is None and tracker.mean_grad_norm(2) is None
    tracker.update([4.0, 1.0, None], [3.0, 1.0, None])
    assert tracker.mean_contribution(0) == pytest.approx((0.09 * 2 + 0.1 * 4) / (1 - 0.81))
    assert tracker.counts == [2, 1, 0]
    tracker.mark_decision()
    tracker.update([4.0, 1.0, None], [6.0, 1.0, None])
    before = (0.09 * 1 + 0.1 * 3) / 0.19
    after = (0.081 * 1 + 0.09 * 3 + 0.1 * 6) / (1 - 0.729)
    assert tracker.grad_norm_change(0) == pytest.approx(abs(after - before) / before)
    assert tracker.grad_norm_change(2) is None


def test_tracker_state_is_plain_json_and_round_trips_exactly():
    tracker = SignalTracker(2, decay=0.8)
    rng = random.Random(0)
    for _ in range(7):
        tracker.update([rng.random(), rng.random()], [rng.random(), rng.random()])
    tracker.mark_decision()
    copy = SignalTracker.from_dict(2, json.loads(json.dumps(tracker.to_dict())))
    assert copy == tracker  # floats survive JSON bit for bit


def test_scores_are_contribution_per_parameter_relative_to_the_best_trainable_block():
    tracker = SignalTracker(4, decay=0.0)  # decay 0: the average is the last value
    tracker.update([1.0, 8.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    assert scores(tracker, 0, [1, 2, 1, 1]) == [0.25, 1.0, 0.5, 1.0]  # block 1: 8 over 2 parameters
    assert scores(tracker, 2, [1, 2, 1, 1]) == [None, None, 0.5, 1.0]  # frozen blocks have no score
    assert scores(tracker, 0, [1, 2, 0, 1])[2] == 0.0  # nothing to train in a block: free to freeze
    tracker.update([-1.0, -2.0, 0.0, -0.5], [1.0, 1.0, 1.0, 1.0])
    assert scores(tracker, 0, [1, 1, 1, 1]) == [0.0, 0.0, 0.0, 0.0]  # nothing reduces the loss any more
    assert scores(SignalTracker(2), 0, [1, 1]) == [None, None]  # nothing measured yet


# -- the decision ----------------------------------------------------------------------------------
def test_without_a_target_the_ready_prefix_freezes():
    policy = ContributionPolicy(threshold=0.3)
    decision = _decide(policy, 10, 0, [0.1, 0.2, 0.9, 1.0])
    assert (decision.frozen_after, decision.reason, decision.ready) == (2, "signals", 2)
    assert decision.projected_reduction == pytest.approx(20 * 90 / (TOTAL * METHOD))


def test_a_contributing_low_block_keeps_the_blocks_above_it_training():
    # blocks 1 and 2 contribute nothing, but block 0 does: frozen blocks form a prefix, so none freezes
    decision = _decide(ContributionPolicy(threshold=0.3), 10, 0, [0.9, 0.01, 0.02, 1.0])
    assert (decision.frozen_after, decision.reason) == (0, "hold")


def test_the_top_block_never_freezes_and_frozen_blocks_stay_frozen():
    decision = _decide(ContributionPolicy(threshold=0.3), 10, 1, [None, 0.0, 0.0, 0.0])
    assert decision.frozen_after == 3  # all but the top block
    decision = _decide(ContributionPolicy(threshold=0.3), 20, 2, [None, None, 1.0, 1.0])
    assert decision.frozen_after == 2  # never fewer than before
    assert _decide(ContributionPolicy(threshold=0.3, max_frozen=1), 10, 0, [0.0, 0.0, 0.0, 1.0]).frozen_after == 1


def test_with_a_target_ready_blocks_freeze_only_as_far_as_the_target_needs():
    # budget 0.1 x 100 steps x 100 parameters = 1000; two blocks held for 90 steps save 1800, one 900
    decision = _decide(ContributionPolicy(target_reduction=0.1), 10, 0, [0.0, 0.0, 0.0, 1.0])
    assert (decision.frozen_after, decision.reason, decision.ready) == (2, "signals (capped by the target)", 3)
    decision = _decide(ContributionPolicy(target_reduction=0.1), 10, 0, [0.0, 0.9, 0.9, 1.0])
    assert (decision.frozen_after, decision.reason) == (1, "signals")
    # 1800 already projected: more ready blocks do not freeze
    decision = _decide(ContributionPolicy(target_reduction=0.1), 40, 2, [None, None, 0.0, 1.0], saved=20 * 30)
    assert (decision.frozen_after, decision.reason) == (2, "target reached")


def test_with_a_target_the_deadline_freezes_what_the_signals_would_not():
    policy = ContributionPolicy(target_reduction=0.1)
    keep = [1.0, 1.0, 1.0, 1.0]  # every block contributes
    # at step 50, freezing all three lower blocks at step 60 still saves 30 x 40 = 1200 >= 1000: wait
    assert _decide(policy, 50, 0, keep, next_decision=60).frozen_after == 0
    # at step 60, waiting until 70 leaves 30 x 30 = 900: one block now (10 x 10 + 900 = 1000) keeps it reachable
    decision = _decide(policy, 60, 0, keep, next_decision=70)
    assert (decision.frozen_after, decision.reason) == (1, "deadline")
    # the last decision: what is needed to the end, exactly (saved 100 so far, 10 more per step is 400 short)
    decision = _decide(policy, 70, 1, [None, 1.0, 1.0, 1.0], saved=100.0, next_decision=TOTAL)
    assert (decision.frozen_after, decision.reason) == (3, "deadline")


def test_saved_until_sums_each_rung_over_its_steps():
    history = [(0, 0), (10, 1), (30, 3)]
    assert saved_until(10, history, SAVINGS) == 0
    assert saved_until(20, history, SAVINGS) == 10 * 10
    assert saved_until(50, history, SAVINGS) == 20 * 10 + 20 * 30


def _simulate(policy, rng, total=TOTAL):
    frozen, history = 0, [(0, 0)]
    steps = policy.decision_steps(total)
    for i, step in enumerate(steps):
        block_scores = [None] * frozen + [rng.random() for _ in range(frozen, 4)]
        decision = decide(policy, step=step, total_steps=total,
                          next_decision=steps[i + 1] if i + 1 < len(steps) else total, frozen=frozen,
                          block_scores=block_scores, savings=SAVINGS, method_params=METHOD,
                          saved=saved_until(step, history, SAVINGS))
        assert decision.frozen_after >= frozen
        if decision.frozen_after != frozen:
            frozen = decision.frozen_after
            history.append((step, frozen))
    return saved_until(total, history, SAVINGS) / (total * METHOD)


@pytest.mark.parametrize("target", [0.02, 0.1, 0.15, 0.25])
def test_the_realised_reduction_meets_the_target_whatever_the_signals(target):
    rng = random.Random(1)
    for threshold in (0.0, 0.3, 0.9):
        for total in (37, 100, 1000):
            policy = ContributionPolicy(target_reduction=target, threshold=threshold)
            realised = _simulate(policy, rng, total)
            assert target - 1e-12 <= realised <= target + 10 / METHOD  # at most one block (10 parameters) over


def test_an_unreachable_target_is_refused_up_front():
    # the most: 3 blocks frozen from 10% of the run on: 30 x 0.9 = 27 of 100
    assert max_reduction(ContributionPolicy(), SAVINGS, METHOD) == pytest.approx(0.27)
    assert max_reduction(ContributionPolicy(), SAVINGS, METHOD, total_steps=25) == pytest.approx(30 * 23 / 25 / 100)
    check_target_reachable(ContributionPolicy(target_reduction=0.27), SAVINGS, METHOD)
    with pytest.raises(ProgtuningError, match="target_reduction 0.3 is out of reach.*at most 27.0%") as info:
        check_target_reachable(ContributionPolicy(target_reduction=0.3), SAVINGS, METHOD)
    assert "\n" not in str(info.value)


# -- config ------------------------------------------------------------------------------------------
def test_config_keys_for_the_contribution_schedule():
    config = load_config(None, {"schedule": "contribution", "target_reduction": "0.25", "decision_interval": "0.2"})
    assert (config.schedule, config.target_reduction, config.decision_interval) == ("contribution", 0.25, 0.2)
    for overrides, message in [
        ({"schedule": "adaptive"}, "unknown schedule 'adaptive'"),
        ({"target_reduction": "0.2"}, "target_reduction applies to the contribution schedule"),
        ({"schedule": "contribution", "stages": "2"}, "stages sets a fixed schedule"),
        ({"schedule": "contribution", "target_reduction": "2"}, "target_reduction must lie in"),
        ({"schedule": "contribution", "decision_interval": "1.5"}, "decision_interval must lie in"),
    ]:
        with pytest.raises(ProgtuningError, match=message):
            load_config(None, overrides)
