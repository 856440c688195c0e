"""The statistics of governance/audit/behaviour.py: the Wilson score interval and the exact
McNemar test, against closed forms computed here, textbook numbers and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from governance.audit.behaviour import mcnemar_exact, wilson_interval

Z95 = 1.959964


def _wilson(x: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927) in counts: (x + z^2/2 -+ z sqrt(x (n - x) / n + z^2 / 4)) / (n + z^2)."""
    half = z * math.sqrt(x * (n - x) / n + z * z / 4)
    return (x + z * z / 2 - half) / (n + z * z), (x + z * z / 2 + half) / (n + z * z)


def _mcnemar(n01: int, n10: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial(n01 + n10, 1/2) tail, at most 1."""
    n, k = n01 + n10, min(n01, n10)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _paired(n11: int, n01: int, n10: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of A and B on questions: n11 both right, n01 only A, n10 only B, n00
    neither."""
    a = [True] * n11 + [True] * n01 + [False] * n10 + [False] * n00
    b = [True] * n11 + [False] * n01 + [True] * n10 + [False] * n00
    return np.array(a), np.array(b)


# -- Wilson ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("x", "n", "low", "high"), [
    (0, 10, 0.0, 0.2775),  # the upper end is z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
    (5, 10, 0.2366, 0.7634),
    (1, 10, 0.0179, 0.4042),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), example (c): 81/263
])
def test_wilson_textbook_values(x, n, low, high):
    got = wilson_interval(x, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 30, 263])
def test_wilson_matches_the_closed_form_and_brackets_the_proportion(n):
    for x in range(n + 1):
        low, high = wilson_interval(x, n)
        want_low, want_high = _wilson(x, n)
        assert low == pytest.approx(max(0.0, want_low), abs=1e-12)
        assert high == pytest.approx(min(1.0, want_high), abs=1e-12)
        assert 0.0 <= low <= x / n <= high <= 1.0
        # symmetric: x successes are n - x failures
        mirror_low, mirror_high = wilson_interval(n - x, n)
        assert low == pytest.approx(1.0 - mirror_high, abs=1e-12)
        assert high == pytest.approx(1.0 - mirror_low, abs=1e-12)


def test_wilson_at_the_ends_reaches_the_observed_proportion():
    """0/n starts at exactly 0 and n/n ends at exactly 1 (rounding alone would leave
    0.9999999999999999 at 10/10, under an observed accuracy of 1.0)."""
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    upper_at_zero = Z95**2 / (10 + Z95**2)
    assert wilson_interval(0, 10)[1] == pytest.approx(upper_at_zero, abs=1e-12)
    assert wilson_interval(10, 10)[0] == pytest.approx(1.0 - upper_at_zero, abs=1e-12)


def test_wilson_narrows_with_n_and_widens_with_z():
    widths = [np.subtract(*wilson_interval(n // 2, n)[::-1]) for n in (10, 40, 160, 640)]
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False))
    narrow, wide = wilson_interval(5, 10, z=1.0), wilson_interval(5, 10, z=2.575829)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_wilson_without_trials_is_undefined():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(("x", "n"), [(0, 10), (3, 10), (5, 10), (10, 10), (81, 263)])
def test_wilson_agrees_with_scipy(x, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(x, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(x, n) == pytest.approx((ci.low, ci.high), abs=1e-7)


# -- McNemar -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n11", "n00"), [(0, 0), (10, 0), (0, 10), (6, 4)])
def test_mcnemar_without_discordant_pairs_is_one(n11, n00):
    a, b = _paired(n11, 0, 0, n00)
    assert mcnemar_exact(a, b) == 1.0


@pytest.mark.parametrize(("n01", "n10", "p"), [
    (10, 0, 2 / 1024),  # all 10 discordant pairs one way: 2 * (1/2)^10
    (8, 2, 2 * (1 + 10 + 45) / 1024),
    (6, 0, 2 / 64),
    (1, 0, 1.0),  # one discordant pair proves nothing: 2 * 1/2, capped at 1
    (5, 5, 1.0),  # balanced: the doubled tail exceeds 1 and is capped
    (12, 3, 2 * (1 + 15 + 105 + 455) / 2**15),
])
def test_mcnemar_known_values(n01, n10, p):
    a, b = _paired(7, n01, n10, 4)
    assert mcnemar_exact(a, b) == pytest.approx(p, rel=1e-12)
    assert _mcnemar(n01, n10) == pytest.approx(p, rel=1e-12)


def test_mcnemar_lopsided_case_is_small():
    a, b = _paired(20, 12, 1, 7)
    p = mcnemar_exact(a, b)
    assert p == pytest.approx(2 * (1 + 13) / 2**13, rel=1e-12)
    assert p < 0.01


@pytest.mark.parametrize(("n01", "n10"), [(0, 3), (3, 0), (2, 9), (9, 2), (4, 4), (0, 20)])
def test_mcnemar_is_symmetric_and_ignores_concordant_pairs(n01, n10):
    a, b = _paired(5, n01, n10, 3)
    p = mcnemar_exact(a, b)
    assert mcnemar_exact(b, a) == p  # swapping the personas
    assert mcnemar_exact(~a, ~b) == p  # scoring "wrong" instead of "right"
    more = _paired(50, n01, n10, 40)
    assert mcnemar_exact(*more) == p  # only discordant pairs count
    order = np.random.default_rng(n01 * 31 + n10).permutation(len(a))
    assert mcnemar_exact(a[order], b[order]) == p  # pairs, not positions
    assert p == pytest.approx(_mcnemar(n01, n10), rel=1e-12)
    assert 0.0 < p <= 1.0


def test_mcnemar_takes_any_truthy_arrays():
    assert mcnemar_exact([1, 1, 1, 0], [0, 0, 0, 0]) == pytest.approx(2 / 8)
    assert mcnemar_exact([], []) == 1.0


@pytest.mark.parametrize(("n01", "n10"), [(10, 0), (8, 2), (12, 3), (7, 6), (30, 14), (1, 0)])
def test_mcnemar_agrees_with_scipy(n01, n10):
    stats = pytest.importorskip("scipy.stats")
    a, b = _paired(3, n01, n10, 2)
    want = stats.binomtest(min(n01, n10), n01 + n10, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(want, rel=1e-9)
