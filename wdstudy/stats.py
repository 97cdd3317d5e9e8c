"""The statistics a report states: intervals, paired comparisons of two arms, and coupling
(the decisions themselves are :mod:`wdstudy.decide`'s).

* :func:`mean_ci`: mean and two-sided Student-t interval of a small sample (seeds).
* :func:`paired`: two arms on the same seeds: mean difference and interval, paired t,
  Wilcoxon and sign-flip checks, effect size and the smallest detectable difference.
* :func:`holm`: Holm's correction across the comparisons of one report.
* :func:`binomial_se`: the noise floor of an error rate measured on n examples.
* :func:`coupling`: how strongly the best λ depends on the learning rate among a cell's
  best trials: the OLS slope of log10 λ on log10 η and Spearman's ρ, each with a 95%
  interval (t-based for the slope, percentile bootstrap for ρ).
"""

from __future__ import annotations

import functools
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


@dataclass(frozen=True)
class Paired:
    """Arm A against arm B on the seeds both completed (A − B; negative = A lower)."""

    n: int
    mean_diff: float
    low: float
    high: float
    t: float
    p_t: float
    p_wilcoxon: float
    p_signflip: float
    effect_dz: float
    mde: float  # smallest |mean difference| detectable at α = 0.05 with 80% power, given n and the spread


def paired(a, b, *, alpha: float = 0.05, power: float = 0.8) -> Paired:
    """Paired comparison of two arms measured on the same seeds (``a[i]`` and ``b[i]``: seed i).

    * mean difference with its two-sided Student-t interval, and the paired t-test;
    * two checks that do not assume normal differences: the exact Wilcoxon signed-rank test
      and the exact sign-flip permutation test of the mean difference (all 2^n sign patterns);
    * effect size d_z = mean / sd of the differences;
    * ``mde``: the smallest true mean difference that a two-sided paired t-test at ``alpha``
      would detect with probability ``power`` given n and the observed spread
      (:func:`detectable_difference`).
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("paired samples must have the same length")
    d = x - y
    n = len(d)
    nan = math.nan
    if n == 0:
        return Paired(0, nan, nan, nan, nan, nan, nan, nan, nan, nan)
    mean = float(d.mean())
    if n < 2:
        return Paired(1, mean, nan, nan, nan, nan, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    q = float(st.t.ppf(1 - alpha / 2, df=n - 1))
    if sd == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p_t = 1.0 if mean == 0 else 0.0
        low = high = mean
    else:
        sem = sd / math.sqrt(n)
        t = mean / sem
        p_t = float(2 * st.t.sf(abs(t), df=n - 1))
        low, high = mean - q * sem, mean + q * sem
    nonzero = d[d != 0]
    p_w = float(st.wilcoxon(d, zero_method="wilcox", method="exact").pvalue) if len(nonzero) else 1.0
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * n)).reshape(n, -1).T  # every sign pattern
    flipped = np.abs((signs * np.abs(d)).mean(axis=1))
    p_sf = float(np.mean(flipped >= abs(mean) - 1e-15))
    dz = mean / sd if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    mde = detectable_difference(sd, n, alpha=alpha, power=power)
    return Paired(n, mean, float(low), float(high), float(t), p_t, p_w, p_sf, float(dz), float(mde))


def detectable_difference(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided one-sample (paired) t-test detects with ``power``.

    Exact, from the noncentral t distribution: the δ at which
    P(|T| > t_{1−α/2, n−1}) = power for T ~ t'(n − 1, δ·√n / sd).
    """
    if n < 2 or not sd > 0:
        return math.nan if n < 2 else 0.0
    return _detectable_effect(n, alpha, power) * sd


@functools.lru_cache(maxsize=256)
def _detectable_effect(n: int, alpha: float, power: float) -> float:
    """The detectable δ/sd for n pairs (depends on n, α and the power only: computed once each)."""
    from scipy.optimize import brentq

    df = n - 1
    crit = float(st.t.ppf(1 - alpha / 2, df))

    from scipy.integrate import quad
    from scipy.special import ndtr

    # the χ²(df) density, written out: scipy.stats' generic pdf costs ~100× more per call
    k = df / 2
    log_norm = -k * math.log(2.0) - math.lgamma(k)

    def chi2_pdf(v: float) -> float:
        return math.exp(log_norm + (k - 1) * math.log(v) - v / 2) if v > 0 else (0.5 if df == 2 else 0.0)

    def gap(effect: float) -> float:  # effect = δ / sd
        # P(|Z + nc| > crit·√(V/df)) with V ~ χ²(df), integrated over V (stable where scipy's nct is not)
        nc = effect * math.sqrt(n)

        def inner(v: float) -> float:
            c = crit * math.sqrt(v / df)
            return (ndtr(nc - c) + ndtr(-c - nc)) * chi2_pdf(v)

        return quad(inner, 0, math.inf, limit=200)[0] - power

    return float(brentq(gap, 1e-9, 60.0, xtol=1e-12))


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (family-wise error); NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), math.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]


def binomial_se(error: float, n: int) -> float:
    """Standard error of an error rate measured on ``n`` independent examples."""
    if n is None or not n > 0 or error is None or math.isnan(error):
        return math.nan
    return math.sqrt(error * (1 - error) / n)


def tuning_curve(values, ns, *, confidence: float = 0.8, low: float = 0.0, high: float = 1.0):
    """Median tuning curve of a random search and its simultaneous confidence band.

    ``values`` are the objective values of independent draws from the search space (lower
    is better; a diverged run counts as ``high``); the curve at n is the median of the best
    of n draws. Returns (curve, band_low, band_high) at ``ns``, from opda's exact,
    distribution-free ``ld_equal_tailed`` bands for the CDF (the upper CDF band bounds the
    curve from below). ``low``/``high`` bound the objective (0 and 1 for an error rate).
    Error rates on a finite split can tie; the bands are then close to, not exactly, 80%.
    """
    import warnings

    from opda.nonparametric import EmpiricalDistribution

    with warnings.catch_warnings():  # error rates on a finite split tie; opda warns that exactness needs no ties
        warnings.filterwarnings("ignore", message="Duplicates detected")
        lo_cdf, point, hi_cdf = EmpiricalDistribution.confidence_bands(
            np.asarray(values, dtype=float), confidence, a=low, b=high, method="ld_equal_tailed",
            generator=np.random.default_rng(0), n_jobs=1)
    ns = np.asarray(ns)
    return (point.quantile_tuning_curve(ns, minimize=True), hi_cdf.quantile_tuning_curve(ns, minimize=True),
            lo_cdf.quantile_tuning_curve(ns, minimize=True))
