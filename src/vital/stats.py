"""Intervals for the quality figures the project reports: every rate is printed with its n and a 95% interval."""
from __future__ import annotations

import math

Z95 = 1.959964


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval of k successes in n trials (good at small n and at rates near 0 or 1)."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def rate(k: int, n: int) -> dict:
    """{n, k, rate, low, high}: a share with its 95% interval (low..high), all null when n is 0. Flat numbers, so
    that `dvc metrics show` and `dvc exp show` list the interval (they leave lists out)."""
    low, high = wilson(k, n) or (None, None)
    return {"n": n, "k": k, "rate": round(k / n, 4) if n else None, "low": low, "high": high}


def ties_half(k: int, ties: int, n: int) -> float | None:
    """The share right when each of `ties` counts half (n: the decided pairs): comparable across methods that
    tie often (integer ratings) and rarely (a learned score); `rate` leaves ties out."""
    return round((k + ties / 2) / (n + ties), 4) if n + ties else None


def auc_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> list[float] | None:
    """A 95% interval of a ROC AUC from its standard error (Hanley & McNeil, 1982)."""
    if n_pos < 1 or n_neg < 1:
        return None
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    half = z * math.sqrt(max(var, 0.0))
    return [round(max(0.0, auc - half), 4), round(min(1.0, auc + half), 4)]


BOOTSTRAP = 2000  # resamples: the interval's ends move by well under 0.01 between seeds at n >= 50


def _bootstrap(x, seed: int) -> dict:
    import numpy as np

    means = np.random.default_rng(seed).choice(x, (BOOTSTRAP, len(x))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"n": len(x), "value": round(float(x.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def mean_interval(values: list[float], seed: int = 0) -> dict:
    """{n, mean, low, high}: the mean of per-item values with a 95% percentile-bootstrap interval (a share that
    is not a count of successes: token recall, F1; a ratio of scores); all null when there are none."""
    import numpy as np

    if not len(values):
        return {"n": 0, "mean": None, "low": None, "high": None}
    out = _bootstrap(np.asarray(values, dtype=float), seed)
    return {"n": out["n"], "mean": out["value"], "low": out["low"], "high": out["high"]}


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> dict:
    """{n, diff, low, high}: mean(a) - mean(b) over the same items (a[i], b[i] one item), with a 95% paired
    bootstrap interval (items resampled, both sides together); all null when there are none."""
    import numpy as np

    if not len(a):
        return {"n": 0, "diff": None, "low": None, "high": None}
    out = _bootstrap(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), seed)
    return {"n": out["n"], "diff": out["value"], "low": out["low"], "high": out["high"]}
