"""A paired bootstrap over seeds × examples: is an arm better than its baseline, and by how much?

The two arms of a comparison are paired twice: by seed (seed k of the arm against seed k of the
baseline) and by example (every run of a task is scored on the same test set, in the same
order). The difference is ``Δ = median over seeds of (score(arm, seed) − score(baseline, seed))``,
each score the task's own metric over the test set's outputs. One bootstrap resample draws the
seeds with replacement and, independently, the test examples with replacement; it rescores every
drawn run on the drawn examples (the same examples for both arms and every seed, which keeps the
pairs paired) and takes the median of the paired differences. The 95% interval is the 2.5th and
97.5th percentile of those medians; the verdict follows from it alone:

* ``better``: the whole interval lies above 0;
* ``worse``: the whole interval lies below 0;
* ``no difference``: the interval contains 0 (the data cannot tell the arms apart).

Rescoring is the expensive part: the task's metric function once per run and resample.
:class:`Resampler` draws the example indices once per test-set size and keeps each run's scores
(a baseline compared with several arms is rescored once), and where the metric has a fast form
over resample weights (:mod:`progtuning.tasks.resampled`) it scores all resamples at once, after
checking that form against the metric function on the run's whole split; otherwise it calls the
function per resample. Everything is seeded: a report gives the same intervals every time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

# (outputs, labels) -> the main metric of the task (one float)
Score = Callable[[np.ndarray, np.ndarray], float]
# (outputs, labels, weights (B, n)) -> the same score on each of B weightings of the examples, or None
FastScore = Callable[[np.ndarray, np.ndarray, np.ndarray], "np.ndarray | None"]
# how far the fast form may be from the metric function on a whole split (float rounding of sums)
FAST_TOLERANCE = 1e-9

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference"


@dataclass(frozen=True)
class PairedDelta:
    """Δ = arm − baseline (median over seeds) with its bootstrap interval."""

    delta: float  # on the full test set
    low: float
    high: float
    verdict: str  # better | worse | no difference
    seeds: int
    examples: int
    resamples: int
    level: float


def verdict(low: float, high: float) -> str:
    """What an interval says about Δ: ``better`` / ``worse`` only where it excludes 0."""
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_DIFFERENCE


class Resampler:
    """Seeded example resamples, and each run's score on every resample (computed once per run)."""

    def __init__(self, score: Score, resamples: int = 1000, seed: int = 0, fast: FastScore | None = None):
        if resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {resamples}")
        self.score, self.resamples, self.seed, self.fast = score, resamples, seed, fast
        self._draws: dict[int, np.ndarray] = {}
        self._scores: dict[Hashable, np.ndarray] = {}

    def draws(self, n: int) -> np.ndarray:
        """``(resamples, n)`` example indices drawn with replacement, the same for every run of ``n`` examples."""
        if n not in self._draws:
            rng = np.random.default_rng([self.seed, n])
            self._draws[n] = rng.integers(0, n, size=(self.resamples, n), dtype=np.int64)
        return self._draws[n]

    def scores(self, key: Hashable, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The run's score on each resample of its examples (``key`` names the run, for the cache)."""
        if key not in self._scores:
            outputs, labels = np.asarray(outputs), np.asarray(labels)
            scores = self._fast_scores(outputs, labels)
            if scores is None:
                scores = np.array([self.score(outputs[i], labels[i]) for i in self.draws(len(labels))])
            self._scores[key] = scores
        return self._scores[key]

    def _fast_scores(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        from progtuning.tasks.resampled import draw_counts

        if self.fast is None:
            return None
        n = len(labels)
        whole = self.fast(outputs, labels, np.ones((1, n)))
        if whole is None or not abs(float(whole[0]) - self.score(outputs, labels)) <= FAST_TOLERANCE:
            return None  # no fast form for this score, or one that disagrees with the function: the slow way
        return self.fast(outputs, labels, draw_counts(self.draws(n), n))


def paired_bootstrap(
    baseline: Sequence[np.ndarray],
    arm: Sequence[np.ndarray],
    labels: np.ndarray,
    score: Score,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    resampler: Resampler | None = None,
    keys: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
    fast: FastScore | None = None,
) -> PairedDelta:
    """Δ of ``score`` between ``arm`` and ``baseline`` outputs (one array per seed, paired by position).

    ``labels`` are the test set's labels (the same for every run); ``fast`` the score's form over
    resample weights, if it has one. Pass a shared ``resampler`` and ``keys`` (one per run,
    baseline's and arm's) to reuse scores across comparisons.
    """
    if len(baseline) != len(arm) or not baseline:
        raise ValueError(f"need the same number (> 0) of baseline and arm runs, got {len(baseline)} and {len(arm)}")
    labels = np.asarray(labels)
    resampler = resampler or Resampler(score, resamples, seed, fast)
    if keys is None:
        keys = ([("baseline", i) for i in range(len(baseline))], [("arm", i) for i in range(len(arm))])
    full = [score(np.asarray(a), labels) - score(np.asarray(b), labels) for b, a in zip(baseline, arm)]
    # (seeds, resamples): each seed's paired difference on each resample of the examples
    differences = np.stack([
        resampler.scores(ka, a, labels) - resampler.scores(kb, b, labels)
        for kb, ka, b, a in zip(keys[0], keys[1], baseline, arm)
    ])
    seeds = len(baseline)
    picks = np.random.default_rng([resampler.seed, seeds, 1]).integers(0, seeds, size=(resampler.resamples, seeds))
    medians = np.median(differences[picks, np.arange(resampler.resamples)[:, None]], axis=1)
    tail = (1 - level) / 2
    low, high = (float(x) for x in np.quantile(medians, [tail, 1 - tail]))
    return PairedDelta(
        delta=float(np.median(full)), low=low, high=high, verdict=verdict(low, high),
        seeds=seeds, examples=len(labels), resamples=resampler.resamples, level=level,
    )
