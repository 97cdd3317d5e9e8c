"""The statistics a report states: intervals, the L2-vs-decoupled test, and coupling.

* :func:`mean_ci`: mean and two-sided Student-t interval of a small sample (seeds).
* :func:`welch_test`: Welch's unequal-variance t-test of two samples, two-sided.
* :func:`coupling`: how strongly the best λ depends on the learning rate among a cell's
  best trials: the OLS slope of log10 λ on log10 η and Spearman's ρ, each with a 95%
  interval (t-based for the slope, percentile bootstrap for ρ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as st


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(values, confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with a two-sided Student-t interval; NaN bounds for n < 2."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    q = float(st.t.ppf(0.5 + confidence / 2, df=n - 1))
    return Interval(mean, mean - q * sem, mean + q * sem, n)


@dataclass(frozen=True)
class TestResult:
    statistic: float
    df: float
    p_value: float
    difference: float  # mean(a) - mean(b)


def welch_test(a, b) -> TestResult:
    """Welch's two-sided t-test of mean(a) = mean(b) (unequal variances)."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    if len(x) < 2 or len(y) < 2:
        return TestResult(math.nan, math.nan, math.nan, diff)
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se2 = vx + vy
    if se2 == 0:
        p = 1.0 if diff == 0 else 0.0
        return TestResult(math.copysign(math.inf, diff) if diff else 0.0, math.nan, p, diff)
    t = diff / math.sqrt(se2)
    df = se2**2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    p = float(2 * st.t.sf(abs(t), df))
    return TestResult(float(t), float(df), p, diff)


@dataclass(frozen=True)
class Coupling:
    n: int
    slope: float
    slope_low: float
    slope_high: float
    rho: float
    rho_low: float
    rho_high: float
    intercept: float


def coupling(log_lr, log_wd, *, boot: int = 2000, seed: int = 0) -> Coupling:
    """Slope of log10 λ on log10 η (t interval) and Spearman ρ (bootstrap interval)."""
    x = np.asarray(log_lr, dtype=float)
    y = np.asarray(log_wd, dtype=float)
    n = len(x)
    nan = math.nan
    if n < 3 or np.ptp(x) == 0:
        return Coupling(n, nan, nan, nan, nan, nan, nan, nan)
    fit = st.linregress(x, y)
    q = float(st.t.ppf(0.975, df=n - 2))
    rho = float(st.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(boot, n))
    rx = st.rankdata(x[idx], axis=1)  # Spearman's rho = Pearson's r of the ranks
    ry = st.rankdata(y[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    ok = denom > 0
    rhos = (rx * ry).sum(axis=1)[ok] / denom[ok]
    lo, hi = (np.percentile(rhos, [2.5, 97.5]) if len(rhos) else (nan, nan))
    return Coupling(n, float(fit.slope), float(fit.slope - q * fit.stderr), float(fit.slope + q * fit.stderr),
                    rho, float(lo), float(hi), float(fit.intercept))
