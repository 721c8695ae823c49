"""Tolerances for comparing floating-point computations, derived from what is compared.

Float32 rounding in a sum is relative to the magnitude of the terms summed, not to the
result: a logit of 0.003 computed from activations of size ~5 carries an absolute error
of ~5 x eps32 x (a few), which is a 1e-4 relative error *of that logit* on one machine and
1e-3 on another that sums in another order (another instruction set, thread count or
sharding). Element-wise relative tolerances therefore measure cancellation, not bugs. The
rules used here instead:

* `assert_close_at_scale`: errors measured against the scale of the compared values (the
  largest magnitude along an axis, e.g. one row of logits).
* `assert_as_accurate_as`: against a float64 reference, a re-ordered computation (sharded,
  other thread count) must be about as accurate as the baseline computation, i.e. its error
  is bounded by the baseline's own rounding error, whatever that is on this machine.
"""
from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def _scale(x: np.ndarray, axis) -> np.ndarray:
    return np.max(np.abs(x), axis=axis, keepdims=axis is not None)


def assert_close_at_scale(actual, desired, rtol: float, *, axis=-1, what: str = "") -> None:
    """|actual - desired| <= rtol x max|desired| along `axis` (None: over everything)."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
    err = np.abs(actual - desired)
    bound = rtol * _scale(desired, axis)
    worst = float(np.max(err / np.maximum(bound, np.finfo(np.float64).tiny)))
    assert np.all(err <= bound), (
        f"{what}: error up to {worst:.3g}x the bound rtol={rtol:g} x max|desired| "
        f"(max error {float(err.max()):.3g})")


def assert_as_accurate_as(candidate, baseline, exact, *, factor: float = 4.0,
                          axis=-1, what: str = "") -> None:
    """Against `exact` (float64), `candidate`'s error is at most `factor` x `baseline`'s
    error plus a few float32 ulps of the scale, along `axis`. Both are float32 results of
    the same computation summed in different orders; their rounding errors are of the
    same size, so a factor of a few separates reordering from a bug (which is off by
    orders of magnitude more)."""
    candidate, baseline, exact = (np.asarray(x, np.float64) for x in (candidate, baseline,
                                                                      exact))
    scale = _scale(exact, axis)
    base_err = _scale(baseline - exact, axis)
    cand_err = _scale(candidate - exact, axis)
    bound = factor * base_err + 8 * EPS32 * scale
    assert np.all(cand_err <= bound), (
        f"{what}: error {float(np.max(cand_err)):.3g} against the float64 reference, "
        f"baseline's {float(np.max(base_err)):.3g} (allowed {factor:g}x + 8 ulps of scale)")
