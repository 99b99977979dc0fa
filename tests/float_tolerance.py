"""How far apart two float32 computations may land when nothing is wrong: the tests' tolerances.

A comparison in this suite is bit-exact only where the same kernels run on the same data in one
process (a frozen weight that no step touches, a resume that replays the same ops, two ranks that
receive the same all-reduced gradient). Everywhere else the two sides run the same math in another
order — another BLAS kernel or vector width (AVX2 vs AVX-512, Intel vs AMD), another thread split,
another padded length or batch composition, separately loaded weights — and float32 rounds
differently. The tolerances below come from float32's unit roundoff and the magnitudes involved,
so they hold on any x86-64 CPU with 1 or 2 threads, while a real fault (a wrong example, a weight
that moved or did not, an unaveraged gradient) is orders of magnitude larger.

Checked by running the suite with ``ATEN_CPU_CAPABILITY=avx2|default`` and
``MKL_ENABLE_INSTRUCTIONS=AVX2`` (other vector kernels) and ``OMP_NUM_THREADS=1|2``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

F32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: the spacing of float32 numbers just above 1


def reordered_sum_tolerance(magnitude: float, terms: int, depth: int = 1) -> float:
    """Largest expected difference between two evaluations of one forward pass, summed in another order.

    A sum of n float32 products, reordered, moves by about sqrt(n)·eps·Σ|aᵢbᵢ| (rounding errors add
    like a random walk), and with mixed signs Σ|aᵢbᵢ| is about sqrt(n) times the result: so
    n·eps·|result| per reduction (``terms`` = the longest reduction, e.g. the FFN width). ``depth``
    reductions in series (layers) add up. ``magnitude`` is the largest value compared.
    """
    return depth * terms * F32_EPS * magnitude


def largest_weight(weights: Mapping[str, torch.Tensor]) -> float:
    return max(float(w.abs().max()) for w in weights.values() if w.is_floating_point() and w.numel())


def sgd_drift_tolerance(steps: int, weights: Mapping[str, torch.Tensor]) -> float:
    """How far two SGD runs whose gradients differ only by rounding may end apart.

    Each step ``w - lr·g`` rounds to float32 once: two runs whose updates differ by rounding can
    land one ulp apart (eps·|w|), and lr·(gradient rounding) is far below an ulp here; over
    ``steps`` steps these add up. Two ulps of the largest weight per step leave a margin.
    """
    return 2 * steps * F32_EPS * largest_weight(weights)


# Adam scales every gradient entry by its own running RMS, so what survives of a rounding
# difference is relative: a step changes by about lr × (relative rounding of that gradient entry).
# Entries whose terms nearly cancel carry relative rounding up to ~1e-4 (measured: 1 vs 2 DDP
# processes, 18 steps at lr 1e-3, end 3.9e-7 apart, i.e. 2e-5 of lr per step, with AVX-512 and AVX2
# kernels alike); 5e-4 leaves a margin. An entry whose gradient is zero by construction
# (an attention key bias: softmax ignores a shift of a whole row) is pure rounding noise, and
# Adam can turn that noise into a step of up to lr: compare such runs with SGD instead.
ADAM_RELATIVE_STEP_ROUNDING = 5e-4


def adam_drift_tolerance(steps: int, lr: float) -> float:
    """How far two Adam(W) runs whose gradients differ only by summation order may end apart."""
    return steps * lr * ADAM_RELATIVE_STEP_ROUNDING


def max_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0) for k in a)


def assert_close_to_rounding(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """``got`` equals ``expected`` up to ``tolerance`` (absolute), with the worst difference in the message."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    got, expected = got.detach(), expected.detach()
    worst = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
    assert math.isfinite(worst) and worst <= tolerance, f"differs by {worst:.3g} > tolerance {tolerance:.3g}"
