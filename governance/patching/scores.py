"""The restoration score and its bootstrap interval (docs/method.md, "The scores").

With centred option logits l(q) and the persona shift d_q = l_clean(q) - l_corr(q):

    S = sum_q (l_patched(q) - l_corr(q)) . d_q  /  sum_q d_q . d_q

Pure numpy on arrays of option logits: (question, option) and (patch, question, option).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def centre(logits: np.ndarray) -> np.ndarray:
    return logits - logits.mean(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Restoration:
    score: np.ndarray  # (patch,)
    ci_low: np.ndarray
    ci_high: np.ndarray


def _terms(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray):
    """Per-question numerator (patch, q) and denominator (q) of S."""
    d = centre(clean) - centre(corrupt)
    num = np.einsum("pqk,qk->pq", centre(patched) - centre(corrupt)[None], d)
    den = np.einsum("qk,qk->q", d, d)
    return num, den


def restoration(
    patched: np.ndarray,
    clean: np.ndarray,
    corrupt: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Restoration:
    """S per patch with a percentile bootstrap interval over questions.

    `patched` is (patch, question, option); `clean`, `corrupt` are (question, option).
    S is NaN where the personas shift nothing (denominator 0).
    """
    patched, clean, corrupt = (np.asarray(a, dtype=np.float64) for a in (patched, clean, corrupt))
    num, den = _terms(patched, clean, corrupt)
    total = den.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        score = num.sum(axis=1) / total if total > 0 else np.full(num.shape[0], np.nan)
    if n_boot <= 0 or num.shape[1] < 2:
        return Restoration(score, np.full_like(score, np.nan), np.full_like(score, np.nan))
    rng = np.random.default_rng(seed)
    n_q = num.shape[1]
    counts = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=n_boot).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (num @ counts.T) / (counts @ den)[None, :]  # (patch, boot)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(boot, [alpha, 1.0 - alpha], axis=1)
    return Restoration(score, low, high)


@dataclass(frozen=True)
class Shift:
    """How much a persona pair moves the option logits, and how much of it is constant."""

    mean_norm: float  # mean over questions of ||d_q||
    constant_share: float  # share of sum ||d_q||^2 that is the question-independent mean shift
    n_questions: int


def persona_shift(clean: np.ndarray, corrupt: np.ndarray) -> Shift:
    d = centre(np.asarray(clean, np.float64)) - centre(np.asarray(corrupt, np.float64))
    sq = float((d * d).sum())
    mean = d.mean(axis=0)
    share = float(len(d) * (mean @ mean) / sq) if sq > 0 else float("nan")
    return Shift(float(np.linalg.norm(d, axis=1).mean()), share, len(d))
