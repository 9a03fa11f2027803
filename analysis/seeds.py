"""Statistics over seeds: mean and Student-t confidence interval, without scipy.

Why Student t: an experiment has a handful of seeds (2-5), and the normal interval
(mean +- 1.96 s/sqrt(n)) would be far too narrow at that size; the t quantile with n - 1
degrees of freedom is the textbook small-sample interval (it assumes the per-seed values
are roughly normal, which is the usual assumption for final PPLs).

Why no scipy: the project does not depend on it, and the quantile is a few lines: the t CDF
is a regularised incomplete beta function (continued fraction, Numerical Recipes 6.4), and
the quantile is found by bisection. tests/test_experiment.py checks the quantiles against
the standard table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (e.g. p = 0.975, df = 1 -> 12.706)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanCI:
    """Mean of the finite values, the half-width of its ``level`` interval (NaN for fewer
    than two values), their sample standard deviation and their count."""

    mean: float
    half: float
    sd: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def mean_ci(values: Iterable[float | None], level: float = LEVEL) -> MeanCI:
    """Mean and Student-t interval ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`` of the
    finite values (None and NaN are skipped: a seed that did not reach a target)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return MeanCI(mean, half, sd, n)


def fmt_ci(ci: MeanCI, fmt: str = ".3f") -> str:
    """``12.345 ± 0.678`` (n >= 2), ``12.345`` (one value), ``""`` (none). A signed format
    (``+.3f``, a difference) signs the mean only: ``-3.580 ± 1.824``."""
    if ci.n == 0 or not math.isfinite(ci.mean):
        return ""
    if ci.n == 1 or not math.isfinite(ci.half):
        return format(ci.mean, fmt)
    return f"{format(ci.mean, fmt)} ± {format(ci.half, fmt.lstrip('+'))}"


__all__ = ["LEVEL", "MeanCI", "betainc", "fmt_ci", "mean_ci", "t_cdf", "t_quantile"]
