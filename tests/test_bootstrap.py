"""The paired bootstrap over seeds × examples, on hand-built outputs whose answer is known.

Outputs are logits that put 1 on the predicted class: "right" on an example means the label's
class, "wrong" the next class. With them Δ is exact arithmetic (a count of examples over n), and
where one arm is right on every example the other gets wrong, every resample's Δ is ≥ 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from progtuning.runs.bootstrap import BETTER, NO_DIFFERENCE, WORSE, Resampler, paired_bootstrap, verdict
from progtuning.tasks.metrics import classification_metric
from progtuning.tasks.resampled import resampled_scores
from progtuning.tasks.rescore import metric_for


def logits(labels: np.ndarray, right: np.ndarray, classes: int = 2) -> np.ndarray:
    """One-hot logits: the label's class where ``right``, the next class elsewhere."""
    predicted = np.where(right, labels, (labels + 1) % classes)
    return np.eye(classes)[predicted]


BINARY = classification_metric(2)


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return BINARY(outputs, labels)["accuracy"]


def fast(metric, name):
    """The metric's fast form over resample weights (the report uses it wherever there is one)."""
    return lambda outputs, labels, weights: resampled_scores(metric, name, outputs, labels, weights)


FAST_ACCURACY = fast(BINARY, "accuracy")


N = 200
LABELS = np.arange(N) % 2


def test_identical_arms_differ_by_exactly_nothing():
    rng = np.random.default_rng(0)
    runs = [logits(LABELS, rng.random(N) < 0.8) for _ in range(3)]
    result = paired_bootstrap(runs, [r.copy() for r in runs], LABELS, accuracy, resamples=200, fast=FAST_ACCURACY)
    assert (result.delta, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.verdict == NO_DIFFERENCE
    assert (result.seeds, result.examples, result.resamples) == (3, N, 200)


def test_an_arm_right_wherever_the_baseline_is_wrong_is_better_by_exactly_the_baselines_errors():
    # the baseline gets 50, 40 and 60 of the 200 examples wrong in seeds 0, 1, 2; the arm gets none wrong
    wrong_counts = (50, 40, 60)
    baseline = [logits(LABELS, np.arange(N) >= k) for k in wrong_counts]
    arm = [logits(LABELS, np.ones(N, bool)) for _ in wrong_counts]
    result = paired_bootstrap(baseline, arm, LABELS, accuracy, resamples=500, fast=FAST_ACCURACY)
    assert result.delta == 50 / N  # the median of 0.25, 0.20, 0.30
    assert 0 < result.low <= result.delta <= result.high < 1
    assert result.verdict == BETTER
    # and the other way round
    flipped = paired_bootstrap(arm, baseline, LABELS, accuracy, resamples=500, fast=FAST_ACCURACY)
    assert flipped.delta == -50 / N and flipped.high < 0 and flipped.verdict == WORSE
    assert (flipped.low, flipped.high) == pytest.approx((-result.high, -result.low))


def test_seeds_that_disagree_give_no_verdict_however_many_examples():
    # seed 0: the arm fixes 60 errors; seed 1: it makes 60 new ones; seed 2: identical
    right = np.arange(N) >= 60
    baseline = [logits(LABELS, right), logits(LABELS, np.ones(N, bool)), logits(LABELS, right)]
    arm = [logits(LABELS, np.ones(N, bool)), logits(LABELS, right), logits(LABELS, right)]
    result = paired_bootstrap(baseline, arm, LABELS, accuracy, resamples=1000, fast=FAST_ACCURACY)
    assert result.delta == 0.0
    assert result.low < 0 < result.high  # resampling the seeds draws the +0.3 and the -0.3 seed alone
    assert result.verdict == NO_DIFFERENCE


def test_the_verdict_needs_the_whole_interval_on_one_side():
    assert verdict(0.001, 0.2) == BETTER and verdict(-0.2, -0.001) == WORSE
    assert verdict(0.0, 0.2) == NO_DIFFERENCE and verdict(-0.1, 0.1) == NO_DIFFERENCE


def test_each_run_is_rescored_once_per_resample_and_the_result_is_seeded():
    calls = []

    def counting(outputs, labels):
        calls.append(len(labels))
        return accuracy(outputs, labels)

    rng = np.random.default_rng(1)
    baseline = [logits(LABELS, rng.random(N) < 0.7) for _ in range(2)]
    arm = [logits(LABELS, rng.random(N) < 0.75) for _ in range(2)]
    resampler = Resampler(counting, resamples=20, seed=3)
    keys = (["b0", "b1"], ["a0", "a1"])
    first = paired_bootstrap(baseline, arm, LABELS, counting, resampler=resampler, keys=keys)
    rescored = len(calls) - 4  # 4 full-set scores (2 pairs x 2 runs)
    assert rescored == 4 * 20 and set(calls) == {N}
    # the same baseline against another arm: only the new arm's resamples are scored
    calls.clear()
    paired_bootstrap(baseline, [a.copy() for a in arm], LABELS, counting, resampler=resampler, keys=(keys[0], ["c0", "c1"]))
    assert len(calls) == 4 + 2 * 20
    again = paired_bootstrap(baseline, arm, LABELS, accuracy, resamples=20, seed=3)
    assert (again.delta, again.low, again.high) == (first.delta, first.low, first.high)


def test_the_tasks_own_metric_scores_the_resamples_f1_for_sms_spam():
    metric = metric_for({"name": "sms-spam", "kind": "classification", "num_labels": 2})
    f1 = lambda outputs, labels: metric(outputs, labels)["f1"]  # noqa: E731
    labels = (np.arange(N) % 5 == 0).astype(int)  # 40 spam messages of 200
    never_spam = np.eye(2)[np.zeros(N, int)]  # F1 of the spam class: 0
    perfect = np.eye(2)[labels]  # F1: 1
    result = paired_bootstrap([never_spam] * 3, [perfect] * 3, labels, f1, resamples=300, fast=fast(metric, "f1"))
    # accuracy would say 0.2; the task's metric says 1.0
    assert result.delta == 1.0 and result.verdict == BETTER


def test_regression_tasks_are_rescored_with_their_correlation():
    metric = metric_for({"name": "rotten-tomatoes-rating", "kind": "regression", "num_labels": 1})
    pearson = lambda outputs, labels: metric(outputs, labels)["pearson"]  # noqa: E731
    rng = np.random.default_rng(2)
    labels = rng.normal(size=N)
    noisy = [labels + rng.normal(scale=1.0, size=N) for _ in range(3)]
    exact = [labels * 2.0 + 1.0 for _ in range(3)]  # a perfect linear fit: Pearson 1
    result = paired_bootstrap(noisy, exact, labels, pearson, resamples=300, fast=fast(metric, "pearson"))
    assert result.delta == pytest.approx(1.0 - float(np.median([np.corrcoef(n, labels)[0, 1] for n in noisy])))
    assert result.verdict == BETTER


def test_metric_for_follows_the_task():
    assert metric_for({"name": "trec6"})(np.eye(6)[[0, 1, 2]], np.array([0, 1, 0]))["accuracy"] == pytest.approx(2 / 3)
    assert "macro_f1" in metric_for({"name": "my-files", "kind": "classification", "num_labels": 3})(
        np.eye(3)[[0, 1]], np.array([0, 1]))
    assert metric_for({"name": "squad", "kind": "extractive_qa"}) is None


def test_the_fast_form_gives_the_interval_of_the_metric_function():
    rng = np.random.default_rng(4)
    baseline = [logits(LABELS, rng.random(N) < 0.7) for _ in range(3)]
    arm = [logits(LABELS, rng.random(N) < 0.76) for _ in range(3)]
    slow = paired_bootstrap(baseline, arm, LABELS, accuracy, resamples=100, seed=5)
    quick = paired_bootstrap(baseline, arm, LABELS, accuracy, resamples=100, seed=5, fast=FAST_ACCURACY)
    assert quick.delta == slow.delta
    assert (quick.low, quick.high) == pytest.approx((slow.low, slow.high), abs=1e-9)


def test_a_fast_form_that_disagrees_with_the_metric_is_not_used():
    wrong = lambda outputs, labels, weights: np.full(len(weights), 0.5)  # noqa: E731
    resampler = Resampler(accuracy, resamples=20, seed=0, fast=wrong)
    outputs = logits(LABELS, np.arange(N) < 150)  # accuracy 0.75 on the whole split, not 0.5
    scores = resampler.scores("run", outputs, LABELS)
    assert not np.all(scores == 0.5)
    assert scores.tolist() == [accuracy(outputs[i], LABELS[i]) for i in resampler.draws(N)]
