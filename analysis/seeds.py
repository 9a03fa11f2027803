"""Statistics over seeds: mean and Student-t confidence interval, without scipy.

Why Student t: an experiment has a handful of seeds (2-5), and the normal interval
(mean +- 1.96 s/sqrt(n)) would be far too narrow at that size; the t quantile with n - 1
degrees of freedom is the textbook small-sample interval (it assumes the per-seed values
are roughly normal, which is the usual assumption for final PPLs).

Why no scipy: the project does not depend on it, and the quantile is a few lines: the t CDF
is a regularised incomplete beta function (continued fraction, Numerical Recipes 6.4), and
the quantile is found by bisection. tests/test_experiment.py checks the quantiles against
the standard table.

Ratios (a speed-up, one method's time over another's) are summarised on the log scale
(:func:`geo_mean_ci`), and a comparison is put into words from its interval
(:func:`verdict`); docs/experiments.md "How comparisons are computed".
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


@dataclass(frozen=True)
class GeoCI:
    """Geometric mean of positive ratios and its ``level`` interval ``[low, high]``
    (NaN for fewer than two values), with the count. The interval is the Student-t interval
    of the mean log-ratio, exponentiated: asymmetric around ``mean`` (``mean / low`` equals
    ``high / mean``), so it has ends, not a half-width."""

    mean: float
    low: float
    high: float
    n: int

    def inverse(self) -> GeoCI:
        """The statistic of the inverse ratios (B/A for A/B): ``1 / mean`` with the ends
        swapped and inverted: what :func:`geo_mean_ci` gives for ``1 / ratio`` (up to
        rounding)."""
        return GeoCI(1.0 / self.mean if self.n else math.nan,
                     1.0 / self.high if self.n >= 2 else math.nan,
                     1.0 / self.low if self.n >= 2 else math.nan, self.n)

    @property
    def log_mean(self) -> float:
        """The mean of the log-ratios (``log(mean)``)."""
        return math.log(self.mean) if self.n and self.mean > 0 else math.nan

    @property
    def log_half(self) -> float:
        """The interval's half-width on the log scale."""
        return (math.log(self.high) - math.log(self.low)) / 2.0 if self.n >= 2 else math.nan


def geo_mean_ci(ratios: Iterable[float | None], level: float = LEVEL) -> GeoCI:
    """Geometric mean over seeds of positive ratios with its Student-t interval: the mean
    ``m`` and half-width ``h`` of ``log(ratio)`` (:func:`mean_ci`), reported as
    ``exp(m)`` and ``[exp(m - h), exp(m + h)]``. None and NaN are skipped (a seed where one
    side did not reach the target).

    Why the log scale: a ratio of times is symmetric on it (twice as fast and half as fast
    are +log 2 and -log 2), so the statistic of B/A is exactly the inverse of that of A/B:
    the geometric mean inverts and the interval's ends swap and invert. The arithmetic mean
    of ratios is neither: it is biased upwards (it is at least the geometric mean, more so
    the more the seeds spread), and it is not invertible: mean(A/B) * mean(B/A) >= 1, equal
    only when every seed gives the same ratio, so which method sits in the denominator
    changes the answer. The log-ratios are also closer to normal than the ratios (a ratio
    is bounded below by 0, not above), which the t interval assumes.

    Raises:
        ValueError: a ratio is zero or negative (no logarithm; a time of 0 is not a time).
    """
    xs = [float(v) for v in ratios if v is not None and math.isfinite(float(v))]
    bad = [x for x in xs if x <= 0]
    if bad:
        raise ValueError(f"ratios must be positive, got {bad[0]}")
    ci = mean_ci([math.log(x) for x in xs], level)
    if ci.n == 0:
        return GeoCI(math.nan, math.nan, math.nan, 0)
    if ci.n == 1:
        return GeoCI(math.exp(ci.mean), math.nan, math.nan, 1)
    return GeoCI(math.exp(ci.mean), math.exp(ci.low), math.exp(ci.high), ci.n)


ONE_SEED = "one seed: no interval"
NO_DIFFERENCE = "no difference detected"


def verdict(ci: MeanCI | GeoCI, level: float = LEVEL) -> str:
    """A comparison put into words from its interval, for a difference (:class:`MeanCI`,
    null value 0) or a ratio (:class:`GeoCI`, null value 1: the interval of the log-ratio
    excludes 0 exactly when the ratio's excludes 1):

    * ``"lower: the 95 % interval excludes 0"`` (``... excludes 1`` for a ratio): the whole
      interval is below the null value;
    * ``"higher: the 95 % interval excludes 0"`` (``1``): the whole interval is above it;
    * ``"no difference detected"``: the interval contains it (not "no difference": with a
      handful of seeds the interval is wide, and a real difference can hide in it);
    * ``"one seed: no interval"``: one value has no interval, so nothing can be said;
    * ``""``: no value at all.

    Why words: a mean with an interval is easy to read as a result when the interval
    straddles the null value; the verdict says what the interval allows one to claim.
    """
    if ci.n == 0:
        return ""
    if ci.n == 1:
        return ONE_SEED
    pct = f"{100 * level:g} %"
    if isinstance(ci, GeoCI):
        null, low, high = "1", ci.low, ci.high
        below, above = high < 1.0, low > 1.0
    else:
        null, low, high = "0", ci.low, ci.high
        below, above = high < 0.0, low > 0.0
    if not (math.isfinite(low) and math.isfinite(high)):
        return NO_DIFFERENCE
    if below:
        return f"lower: the {pct} interval excludes {null}"
    if above:
        return f"higher: the {pct} interval excludes {null}"
    return NO_DIFFERENCE


def fmt_geo(ci: GeoCI, fmt: str = ".2f") -> str:
    """``1.25 [1.10, 1.42]`` (n >= 2: geometric mean [low, high]), ``1.25`` (one value),
    ``""`` (none)."""
    if ci.n == 0 or not math.isfinite(ci.mean):
        return ""
    if ci.n == 1 or not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        return format(ci.mean, fmt)
    return f"{format(ci.mean, fmt)} [{format(ci.low, fmt)}, {format(ci.high, fmt)}]"


def fmt_ci(ci: MeanCI, fmt: str = ".3f") -> str:
    """``12.345 ± 0.678`` (n >= 2), ``12.345`` (one value), ``""`` (none). A signed format
    (``+.3f``, a difference) signs the mean only: ``-3.580 ± 1.824``."""
    if ci.n == 0 or not math.isfinite(ci.mean):
        return ""
    if ci.n == 1 or not math.isfinite(ci.half):
        return format(ci.mean, fmt)
    return f"{format(ci.mean, fmt)} ± {format(ci.half, fmt.lstrip('+'))}"


__all__ = ["LEVEL", "NO_DIFFERENCE", "ONE_SEED", "GeoCI", "MeanCI", "betainc", "fmt_ci",
           "fmt_geo", "geo_mean_ci", "mean_ci", "t_cdf", "t_quantile", "verdict"]
