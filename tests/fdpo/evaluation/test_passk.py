"""Unbiased pass@k against hand-computed values and exact binomials."""
import math
from fractions import Fraction

import pytest

from fdpo.evaluation import runner as rn


@pytest.mark.parametrize("n,c,k,want", [
    (5, 2, 1, 0.4),            # c / n
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 0, 1, 0.0),
    (10, 0, 5, 0.0),
    (3, 3, 2, 1.0),
    (4, 1, 3, 0.75),           # 1 - C(3,3)/C(4,3) = 1 - 1/4
    (6, 2, 4, 14 / 15),        # 1 - C(4,4)/C(6,4) = 1 - 1/15
    (10, 9, 2, 1.0),           # n - c < k
])
def test_hand_computed(n, c, k, want):
    assert rn.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(200, 37, 100), (200, 1, 10), (1000, 3, 500), (20, 7, 10)])
def test_exact_binomials(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert rn.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_bad_arguments():
    with pytest.raises(ValueError):
        rn.pass_at_k(3, 1, 4)  # k > n
    with pytest.raises(ValueError):
        rn.pass_at_k(3, 4, 1)  # c > n
    with pytest.raises(ValueError):
        rn.pass_at_k(3, 1, 0)


def test_mean_skips_k_beyond_the_smallest_n():
    # tasks with n = 5 and n = 2 samples, 1 and 2 correct
    got = rn.mean_pass_at_k([5, 2], [1, 2], ks=(1, 2, 5))
    assert set(got) == {"pass@1", "pass@2"}
    assert got["pass@1"] == pytest.approx((0.2 + 1.0) / 2)
    assert got["pass@2"] == pytest.approx((1 - 6 / 10 + 1.0) / 2)  # C(4,2)/C(5,2) = 6/10
