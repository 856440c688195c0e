"""The restoration score S and the persona shift (governance/patching/scores.py) on hand-made
option logits: the end points S = 1 and S = 0, NaN where the personas shift nothing,
linearity, the bootstrap interval, and the question-independent share of the shift.

"No shift" is an exactly zero sum of squared centred shifts: a shift that cancels only up to
float rounding (1e-16) is a shift, so those tests use logits on which centring is exact."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from governance.patching.scores import centre, persona_shift, restoration

N_Q, N_OPT = 8, 4


@pytest.fixture
def runs():
    """(clean, corrupt) option logits (question, option) whose centred difference is not 0."""
    rng = np.random.default_rng(7)
    clean = rng.normal(size=(N_Q, N_OPT))
    corrupt = clean + rng.normal(scale=0.5, size=(N_Q, N_OPT))
    return clean, corrupt


def _between(clean, corrupt, t):
    """The run a fraction `t` of the way from the corrupted run to the clean one."""
    return corrupt + t * (clean - corrupt)


# -- centring ----------------------------------------------------------------------------------


def test_centre_removes_the_mean_over_options_only():
    logits = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    np.testing.assert_allclose(centre(logits), [[-2.0, -1.0, 0.0, 3.0], [-1.0, -1.0, -1.0, 3.0]])
    np.testing.assert_allclose(centre(logits).mean(axis=-1), 0.0, atol=1e-15)
    np.testing.assert_allclose(centre(logits + np.array([[5.0], [-2.0]])), centre(logits))


# -- the end points and linearity --------------------------------------------------------------


def test_a_patch_that_restores_the_clean_run_scores_one(runs):
    clean, corrupt = runs
    r = restoration(clean[None], clean, corrupt, n_boot=0)
    assert r.score.shape == (1,)
    assert r.score[0] == pytest.approx(1.0, abs=1e-12)


def test_a_patch_that_changes_nothing_scores_zero(runs):
    clean, corrupt = runs
    r = restoration(corrupt[None], clean, corrupt, n_boot=0)
    assert r.score[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("t", [-0.5, 0.0, 0.25, 0.5, 1.0, 1.5])
def test_score_is_linear_in_the_patched_logits(runs, t):
    """Half way from corrupt to clean is 0.5; beyond either end is allowed (over-restoring
    or pushing further away), not clipped."""
    clean, corrupt = runs
    r = restoration(_between(clean, corrupt, t)[None], clean, corrupt, n_boot=0)
    assert r.score[0] == pytest.approx(t, abs=1e-12)


def test_one_score_per_patch_in_the_order_given(runs):
    clean, corrupt = runs
    ts = [1.0, 0.0, 0.5, 0.25]
    patched = np.stack([_between(clean, corrupt, t) for t in ts])
    r = restoration(patched, clean, corrupt, n_boot=0)
    np.testing.assert_allclose(r.score, ts, atol=1e-12)


def test_a_constant_added_to_every_option_does_not_move_the_score(runs):
    """S is computed on centred logits: a per-question offset common to all options (the
    prompt made every option likelier) is not restoration."""
    clean, corrupt = runs
    offset = np.arange(N_Q, dtype=float)[:, None] * 3.0
    half = _between(clean, corrupt, 0.5)
    plain = restoration(half[None], clean, corrupt, n_boot=0).score[0]
    shifted = restoration((half + offset)[None], clean + offset, corrupt - offset, n_boot=0)
    assert plain == pytest.approx(0.5, abs=1e-12)
    assert shifted.score[0] == pytest.approx(plain, abs=1e-12)


def test_score_pools_questions_weighted_by_their_shift(runs):
    """S is a ratio of sums over questions, not a mean of per-question ratios: a question
    the personas move a lot counts for more."""
    clean, corrupt = runs
    patched = corrupt.copy()
    patched[0] = clean[0]  # restore question 0 fully, leave the others corrupted
    d = centre(clean) - centre(corrupt)
    expected = (d[0] @ d[0]) / (d * d).sum()
    r = restoration(patched[None], clean, corrupt, n_boot=0)
    assert r.score[0] == pytest.approx(expected, abs=1e-12)


# -- no shift at all: S is undefined -----------------------------------------------------------


def _quiet_restoration(*args, **kwargs):
    """restoration() where every bootstrap resample is 0/0: numpy warns 'All-NaN slice'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return restoration(*args, **kwargs)


@pytest.mark.parametrize("n_boot", [0, 50])
def test_no_shift_gives_nan_score_and_interval(runs, n_boot):
    clean, _ = runs
    patched = np.stack([clean, clean + 1.0, np.zeros_like(clean)])
    r = _quiet_restoration(patched, clean, clean, n_boot=n_boot)
    assert r.score.shape == (3,)
    assert np.isnan(r.score).all()
    assert np.isnan(r.ci_low).all() and np.isnan(r.ci_high).all()


def _dyadic(seed):
    """Logits that are multiples of 1/4: centring and offsets by halves are exact."""
    return np.random.default_rng(seed).integers(-16, 16, size=(N_Q, N_OPT)) / 4.0


def test_a_shift_common_to_every_option_is_no_shift():
    """clean and corrupt differing by a per-question constant are the same after centring.
    (Exact arithmetic: see the module docstring.)"""
    clean = _dyadic(4)
    corrupt = clean + (np.arange(N_Q) * 0.5 - 2.0)[:, None]
    r = _quiet_restoration(clean[None], clean, corrupt, n_boot=20)
    assert np.isnan(r.score).all() and np.isnan(r.ci_low).all() and np.isnan(r.ci_high).all()


# -- the bootstrap interval over questions -----------------------------------------------------


def _noisy_patches(clean, corrupt, seed=1):
    """Three patches that restore different, question-dependent amounts."""
    rng = np.random.default_rng(seed)
    out = []
    for t in (0.2, 0.5, 0.9):
        ts = np.clip(t + rng.normal(scale=0.3, size=(N_Q, 1)), -0.5, 1.5)
        out.append(corrupt + ts * (clean - corrupt))
    return np.stack(out)


def test_interval_contains_the_point_estimate(runs):
    clean, corrupt = runs
    r = restoration(_noisy_patches(clean, corrupt), clean, corrupt, n_boot=500)
    assert r.ci_low.shape == r.ci_high.shape == r.score.shape == (3,)
    assert np.isfinite(r.ci_low).all() and np.isfinite(r.ci_high).all()
    assert (r.ci_low <= r.score).all() and (r.score <= r.ci_high).all()
    assert (r.ci_low < r.ci_high).all()  # the questions disagree: a real interval


def test_interval_is_reproducible_from_its_seed_and_narrows_with_the_level(runs):
    clean, corrupt = runs
    patched = _noisy_patches(clean, corrupt)
    a = restoration(patched, clean, corrupt, n_boot=300, seed=3)
    b = restoration(patched, clean, corrupt, n_boot=300, seed=3)
    np.testing.assert_array_equal(a.ci_low, b.ci_low)
    np.testing.assert_array_equal(a.ci_high, b.ci_high)
    narrow = restoration(patched, clean, corrupt, n_boot=300, seed=3, level=0.5)
    assert (narrow.ci_low >= a.ci_low).all() and (narrow.ci_high <= a.ci_high).all()
    np.testing.assert_array_equal(narrow.score, a.score)  # the point estimate is not resampled


def test_interval_is_degenerate_when_every_question_is_identical():
    """Every resample of identical questions is the same ratio: low = S = high."""
    rng = np.random.default_rng(11)
    clean_q, corrupt_q = rng.normal(size=N_OPT), rng.normal(size=N_OPT)
    clean, corrupt = np.tile(clean_q, (N_Q, 1)), np.tile(corrupt_q, (N_Q, 1))
    patched = np.stack([_between(clean, corrupt, t) for t in (0.3, 1.0)])
    r = restoration(patched, clean, corrupt, n_boot=200)
    np.testing.assert_allclose(r.score, [0.3, 1.0], atol=1e-12)
    np.testing.assert_allclose(r.ci_low, r.score, atol=1e-12)
    np.testing.assert_allclose(r.ci_high, r.score, atol=1e-12)


@pytest.mark.parametrize("n_boot, n_q", [(0, N_Q), (-1, N_Q), (100, 1)])
def test_no_interval_without_resamples_or_with_one_question(runs, n_boot, n_q):
    clean, corrupt = (a[:n_q] for a in runs)
    r = restoration(_between(clean, corrupt, 0.5)[None], clean, corrupt, n_boot=n_boot)
    assert r.score[0] == pytest.approx(0.5, abs=1e-12)
    assert np.isnan(r.ci_low).all() and np.isnan(r.ci_high).all()


# -- the persona shift and its question-independent share --------------------------------------


def test_a_constant_shift_is_all_question_independent():
    rng = np.random.default_rng(5)
    corrupt = rng.normal(size=(N_Q, N_OPT))
    v = np.array([1.0, -2.0, 0.5, 0.5])  # the same move on every question
    shift = persona_shift(corrupt + v, corrupt)
    assert shift.constant_share == pytest.approx(1.0, abs=1e-12)
    assert shift.mean_norm == pytest.approx(np.linalg.norm(centre(v)), abs=1e-12)
    assert shift.n_questions == N_Q


def test_shifts_that_cancel_out_have_no_question_independent_share():
    rng = np.random.default_rng(5)
    corrupt = rng.normal(size=(N_Q, N_OPT))
    v = np.array([1.0, -2.0, 0.5, 0.5])
    signs = np.where(np.arange(N_Q) % 2 == 0, 1.0, -1.0)[:, None]
    shift = persona_shift(corrupt + signs * v, corrupt)  # +v, -v, +v, ...: mean 0
    assert shift.constant_share == pytest.approx(0.0, abs=1e-12)
    assert shift.mean_norm == pytest.approx(np.linalg.norm(centre(v)), abs=1e-12)

    d = rng.normal(size=(N_Q, N_OPT))
    d -= d.mean(axis=0)  # random per-question shifts with a zero mean
    assert persona_shift(corrupt + d, corrupt).constant_share == pytest.approx(0.0, abs=1e-12)


def test_question_independent_share_is_the_mean_shifts_part():
    """share = n |mean d|^2 / sum |d_q|^2, between 0 and 1 (what the mean leaves over is the
    question-dependent part)."""
    rng = np.random.default_rng(9)
    clean, corrupt = rng.normal(size=(N_Q, N_OPT)), rng.normal(size=(N_Q, N_OPT))
    d = centre(clean) - centre(corrupt)
    mean = d.mean(axis=0)
    shift = persona_shift(clean, corrupt)
    assert shift.constant_share == pytest.approx(N_Q * (mean @ mean) / (d * d).sum(), abs=1e-12)
    assert 0.0 < shift.constant_share < 1.0
    assert shift.mean_norm == pytest.approx(np.linalg.norm(d, axis=1).mean(), abs=1e-12)


def test_no_shift_has_zero_norm_and_an_undefined_share():
    clean = _dyadic(2)
    for corrupt in (clean, clean + 4.0):  # identical, or identical once centred
        shift = persona_shift(clean, corrupt)
        assert shift.mean_norm == 0.0
        assert np.isnan(shift.constant_share)
        assert shift.n_questions == N_Q
