"""Decisions: what a comparison of two arms allows a researcher to conclude, at a stated error rate.

Plain numbers in, plain numbers out (numpy and scipy only), so the engine (which decides when
evaluation stops), the report and the simulator share one procedure.

**The evidence** (:func:`evidence`) for arm A − arm B on one task × optimizer, lower is better:

* the point estimate ``diff``: the mean over the evaluation seeds both arms completed of the
  paired difference between the two arms' picks;
* its variance, the sum of three parts:

  - *seeds*: the paired differences' variance / n (Student's t with n − 1 degrees of freedom);
  - *selection*: the pick is itself a random outcome of the race. Every race survivor is
    evaluated on the same seeds, the race seeds are resampled (a bootstrap), each arm re-picks
    the survivor with the lowest resampled race mean, and the variance of the re-picked
    difference is added (Bouthillier et al. 2021: the tuning pipeline is a main source of
    variance; the race bootstrap is the cheap, ``replicates: 1`` estimate of it);
  - *test examples*: the test split is a sample too. Where per-example outcomes are stored,
    the variance over examples of the paired per-example difference (seed-averaged) / N.

  The interval uses t with n − 1 degrees of freedom for the sum (conservative: the added parts
  have more degrees of freedom than the seed part).

**The decision** (:func:`decide`) at margin m (points for an error rate, MSE for a regression)
and level α: "A better" / "B better" (two-sided test of no difference), else "equivalent
within ±m" (Schuirmann's two one-sided tests, i.e. the 1 − 2α interval inside ±m), else "A no
worse than B by more than m" (one-sided non-inferiority), else "undecided", with the seeds an
upper confidence bound on the spread says would decide. Every p-value is Holm-adjusted within
its family (the spec's primary pairs of one task × optimizer; the other comparisons form a
secondary family) and compared with the level of the current look.

**Looks** (:func:`look_alphas`): evaluation runs in rounds and stops once the decisions are
reached. The level of look k is the increment of a Pocock-type α-spending function
α·ln(1 + (e − 1)·t) (Lan & DeMets 1983) at information fraction t = n_k / n_max; by the union
bound over looks the chance of any wrong "better" over the whole sequence stays ≤ α, whatever
rule decides when to stop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as st

BETTER_A, BETTER_B, EQUIVALENT, NONINF_A, NONINF_B, UNDECIDED = (
    "A better", "B better", "equivalent", "A no worse", "B no worse", "undecided")
#: decisions that end a comparison (``undecided`` keeps it open)
SETTLED = (BETTER_A, BETTER_B, EQUIVALENT)


@dataclass(frozen=True)
class ArmRuns:
    """One arm's race and evaluation runs, as plain numbers.

    ``race[c]``: candidate c's race values by race-seed position (NaN where missing);
    ``evals[c]``: candidate c's evaluation values by seed (survivors only; ``pick`` always);
    ``outcomes[c][seed]``: per-example test outcomes (error 0/1 or squared error), optional.
    """

    pick: int
    evals: Mapping[int, Mapping[int, float]]
    race: Mapping[int, Sequence[float]] = field(default_factory=dict)
    outcomes: Mapping[int, Mapping[int, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class Evidence:
    """A − B: the estimate and its variance parts (see the module docstring)."""

    n: int
    diff: float
    var_seeds: float
    var_selection: float
    var_test: float
    seeds: tuple[int, ...] = ()

    @property
    def se(self) -> float:
        return math.sqrt(self.var_seeds + self.var_selection + self.var_test)

    @property
    def df(self) -> int:
        return self.n - 1

    def interval(self, level: float) -> tuple[float, float]:
        """Two-sided ``level`` interval for the difference (NaN with fewer than 2 seeds)."""
        if self.n < 2:
            return (math.nan, math.nan)
        q = float(st.t.ppf(0.5 + level / 2, self.df))
        return (self.diff - q * self.se, self.diff + q * self.se)

    def p_values(self, margin: float) -> dict[str, float]:
        """One-sided and two-sided p-values of the hypotheses a decision rests on.

        ``difference``: two-sided, H0 diff = 0; ``equivalent``: TOST, H0 |diff| ≥ m;
        ``A no worse``: H0 diff ≥ m; ``B no worse``: H0 diff ≤ −m.
        """
        nan = math.nan
        if self.n < 2:
            return {"difference": nan, EQUIVALENT: nan, NONINF_A: nan, NONINF_B: nan}
        se, df, d = self.se, self.df, self.diff
        if se == 0:  # no spread at all: the data cannot say how sure it is; no test rejects
            return {"difference": 1.0, EQUIVALENT: 1.0, NONINF_A: 1.0, NONINF_B: 1.0}
        p_a = float(st.t.cdf((d - margin) / se, df))  # H0: d ≥ m  (A worse by m or more)
        p_b = float(st.t.sf((d + margin) / se, df))  # H0: d ≤ −m (B worse by m or more)
        return {"difference": float(2 * st.t.sf(abs(d) / se, df)), EQUIVALENT: max(p_a, p_b),
                NONINF_A: p_a, NONINF_B: p_b}


def evidence(a: ArmRuns, b: ArmRuns, *, boot: int = 1000, seed: int = 0) -> Evidence:
    """A − B on the evaluation seeds both picks completed (see the module docstring)."""
    ea, eb = a.evals.get(a.pick, {}), b.evals.get(b.pick, {})
    seeds = tuple(sorted(s for s in ea if s in eb and _finite(ea[s]) and _finite(eb[s])))
    n = len(seeds)
    if n == 0:
        return Evidence(0, math.nan, math.nan, math.nan, math.nan, seeds)
    d = np.array([ea[s] - eb[s] for s in seeds])
    diff = float(d.mean())
    var_seeds = float(d.var(ddof=1)) / n if n >= 2 else math.nan
    var_sel = selection_variance(a, b, seeds, boot=boot, seed=seed)
    return Evidence(n, diff, var_seeds, var_sel, test_variance(a, b, seeds), seeds)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def repick(race: Mapping[int, Sequence[float]], candidates: Sequence[int], idx: np.ndarray) -> np.ndarray:
    """For each bootstrap row of race-seed positions ``idx`` (boot × r), the candidate with the lowest
    resampled race mean among ``candidates`` (ties: the first listed)."""
    values = np.array([np.asarray(race[c], dtype=float) for c in candidates])  # (k, r)
    means = np.nanmean(values[:, idx], axis=2)  # (k, boot)
    means = np.where(np.isnan(means), np.inf, means)
    return np.asarray(candidates)[np.argmin(means, axis=0)]


def selection_variance(a: ArmRuns, b: ArmRuns, seeds: Sequence[int], *, boot: int = 1000, seed: int = 0) -> float:
    """Variance of A − B over re-picks of each arm's race (0 where an arm had no choice).

    Only survivors that completed every evaluation seed in ``seeds`` can be re-picked; each arm's
    race seeds are resampled independently (their runs are).
    """
    rng = np.random.default_rng(seed)
    means = []
    for arm in (a, b):
        cands = [c for c in sorted(arm.evals) if c in arm.race and all(_finite(arm.evals[c].get(s)) for s in seeds)]
        if arm.pick not in cands:
            cands = [arm.pick]
        if len(cands) < 2:
            picks = np.full(boot, arm.pick)
        else:
            r = len(arm.race[arm.pick])
            picks = repick(arm.race, cands, rng.integers(0, r, size=(boot, r)))
        table = {c: float(np.mean([arm.evals[c][s] for s in seeds])) for c in cands}
        means.append(np.array([table[c] for c in picks]))
    diffs = means[0] - means[1]
    return float(diffs.var(ddof=1)) if boot > 1 else 0.0


def test_variance(a: ArmRuns, b: ArmRuns, seeds: Sequence[int]) -> float:
    """Variance from the test split's sampling: var over examples of the seed-averaged paired
    per-example difference, / N (0 where per-example outcomes are not stored)."""
    oa, ob = a.outcomes.get(a.pick, {}), b.outcomes.get(b.pick, {})
    common = [s for s in seeds if s in oa and s in ob]
    if not common:
        return 0.0
    xa = np.mean([np.asarray(oa[s], float) for s in common], axis=0)
    xb = np.mean([np.asarray(ob[s], float) for s in common], axis=0)
    if xa.shape != xb.shape or xa.size < 2:
        return 0.0
    delta = xa - xb
    return float(delta.var(ddof=1)) / delta.size


# -- multiplicity and looks ----------------------------------------------------------------------

def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count in m)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), math.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ok) - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]


def spent(alpha: float, t: float) -> float:
    """Pocock-type α-spending function α·ln(1 + (e − 1)·t), t in [0, 1] (Lan & DeMets 1983)."""
    return alpha * math.log1p((math.e - 1) * min(max(t, 0.0), 1.0))


def look_alphas(alpha: float, looks: Sequence[int]) -> list[float]:
    """The level of each look at the seed counts ``looks`` (increasing, the last the maximum):
    the increments of :func:`spent`, which sum to ``alpha``."""
    n_max = looks[-1]
    out, before = [], 0.0
    for n in looks:
        now = spent(alpha, n / n_max)
        out.append(now - before)
        before = now
    return out


# -- decisions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    code: str  # one of BETTER_A, BETTER_B, EQUIVALENT, NONINF_A, NONINF_B, UNDECIDED
    level: float  # the α of this look the adjusted p-values were compared with
    p_adjusted: dict[str, float]
    seeds_needed: float  # total seeds that would decide at ±margin (NaN once decided)


def seeds_needed(ev: Evidence, margin: float, alpha: float, *, power: float = 0.8, confidence: float = 0.8) -> float:
    """Seeds (in total) at which the two one-sided tests would show equivalence within ±margin with
    probability ``power`` if the true difference were the observed one, from an upper ``confidence``
    bound on the per-seed spread (the spread of 5 seeds is itself uncertain). The selection and
    test parts are taken to shrink like the seed part. Infinite if |diff| ≥ margin."""
    if ev.n < 2 or not margin > 0:
        return math.nan
    sd = math.sqrt(ev.n) * ev.se
    sd_upper = sd * math.sqrt(ev.df / st.chi2.ppf(1 - confidence, ev.df)) if sd > 0 else 0.0
    room = margin - abs(ev.diff)
    if room <= 0:
        return math.inf
    if sd_upper == 0:
        return float(ev.n)
    z = st.norm.ppf(1 - alpha) + st.norm.ppf(power if abs(ev.diff) > 0 else 0.5 + power / 2)
    n = (z * sd_upper / room) ** 2
    for _ in range(20):  # t quantiles instead of normal ones, by fixed point
        df = max(n - 1, 1)
        z = st.t.ppf(1 - alpha, df) + st.t.ppf(power if abs(ev.diff) > 0 else 0.5 + power / 2, df)
        n = (z * sd_upper / room) ** 2
    return float(max(math.ceil(n), ev.n))


def decide(evidences: Sequence[Evidence], margin: float, level: float, *, alpha: float | None = None
           ) -> list[Decision]:
    """Decisions for one family of comparisons, each p-value type Holm-adjusted within the family,
    at the look's ``level``; ``alpha`` (default: ``level``) sizes ``seeds_needed``."""
    ps = [ev.p_values(margin) for ev in evidences]
    adjusted = {k: holm([p[k] for p in ps]) for k in ("difference", EQUIVALENT, NONINF_A, NONINF_B)}
    out = []
    for i, ev in enumerate(evidences):
        p = {k: adjusted[k][i] for k in adjusted}
        if p["difference"] < level:
            code = BETTER_A if ev.diff < 0 else BETTER_B
        elif p[EQUIVALENT] < level:
            code = EQUIVALENT
        elif p[NONINF_A] < level:
            code = NONINF_A
        elif p[NONINF_B] < level:
            code = NONINF_B
        else:
            code = UNDECIDED
        need = math.nan if code in SETTLED else seeds_needed(ev, margin, alpha or level)
        out.append(Decision(code, level, p, need))
    return out


def sentence(code: str, a: str, b: str, margin_text: str) -> str:
    """The decision in words, with the arms' names."""
    return {BETTER_A: f"{a} better", BETTER_B: f"{b} better", EQUIVALENT: f"equivalent within ±{margin_text}",
            NONINF_A: f"{a} no worse than {b} by more than {margin_text}",
            NONINF_B: f"{b} no worse than {a} by more than {margin_text}", UNDECIDED: "undecided"}[code]


# -- the race --------------------------------------------------------------------------------------

def race_survivors(race: Mapping[int, Sequence[float]], pick: int, margin: float, *,
                   diverged: Sequence[int] = (), alpha: float = 0.05, resolution: float = 0.0) -> list[int]:
    """The candidates the race could not show worse than the pick by more than ``margin / 2``.

    A candidate leaves when its mean race gap to the pick, less a one-sided ``1 − alpha`` bound
    of its noise, exceeds m/2, or when it diverged. The noise is the pooled residual spread of
    the candidate × seed table (a two-way layout: candidates and race seeds), with
    ``resolution`` (the metric's smallest step, e.g. one validation example) as its floor,
    so a gap that is the same on every seed is neither infinitely sure (the paired t-test with
    2 seeds) nor ignored.
    """
    cands = [c for c in sorted(race) if c not in diverged]
    if pick not in cands:
        return []
    table = np.array([np.asarray(race[c], dtype=float) for c in cands])
    if np.isnan(table).any():
        keep = ~np.isnan(table).any(axis=0)
        table = table[:, keep]
    k, r = table.shape
    if r == 0:
        return [pick]
    resid = table - table.mean(axis=1, keepdims=True) - table.mean(axis=0, keepdims=True) + table.mean()
    df = (k - 1) * (r - 1)
    sd = math.sqrt(float((resid**2).sum()) / df) if df > 0 else 0.0
    sd = max(sd, resolution)
    p = cands.index(pick)
    out = []
    for i, c in enumerate(cands):
        gap = float(table[i].mean() - table[p].mean())
        bound = (float(st.t.ppf(1 - alpha, df)) if df > 0 else st.norm.ppf(1 - alpha)) * sd * math.sqrt(2 / r)
        if c == pick or gap - bound <= margin / 2:
            out.append(c)
    return out
