"""Behaviour: what personas do to the answers (docs/method.md, "Behaviour").

Accuracy per persona with a Wilson 95% interval, deltas against the no-persona and neutral
baselines, flip rate of the argmax answer and mean total-variation distance between two
personas' answer distributions, and an exact McNemar test on paired correctness. Pure numpy
on option logits of shape (question, option).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 and n the interval ends exactly at the observed proportion (rounding would leave
    # 1 - 2^-53 at n, just under an accuracy of 1.0)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value on paired correctness (binomial on the discordant)."""
    a = np.asarray(correct_a, bool)
    b = np.asarray(correct_b, bool)
    n01 = int((a & ~b).sum())
    n10 = int((~a & b).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Comparison:
    """Persona A against persona B on the same questions."""

    accuracy_delta: float  # acc(A) - acc(B)
    flip_rate: float  # share of questions whose argmax answer differs
    tv: float  # mean total-variation distance between answer distributions
    mcnemar_p: float


def accuracy(logits: np.ndarray, answers: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, ci_low, ci_high) of argmax answers."""
    correct = np.argmax(logits, axis=-1) == np.asarray(answers)
    low, high = wilson_interval(int(correct.sum()), len(correct))
    return float(correct.mean()), low, high


def compare(logits_a: np.ndarray, logits_b: np.ndarray, answers: np.ndarray) -> Comparison:
    answers = np.asarray(answers)
    pick_a, pick_b = np.argmax(logits_a, axis=-1), np.argmax(logits_b, axis=-1)
    correct_a, correct_b = pick_a == answers, pick_b == answers
    tv = 0.5 * np.abs(softmax(logits_a) - softmax(logits_b)).sum(axis=-1)
    return Comparison(
        accuracy_delta=float(correct_a.mean() - correct_b.mean()),
        flip_rate=float((pick_a != pick_b).mean()),
        tv=float(tv.mean()),
        mcnemar_p=mcnemar_exact(correct_a, correct_b),
    )
