"""Decisions: what a comparison of two arms allows a researcher to conclude, at a stated error rate.

Plain numbers in, plain numbers out (numpy and scipy only), so the engine (which decides when
evaluation stops), the report and the simulator share one procedure.

**The evidence** (:func:`evidence`) for arm A − arm B on one task × optimizer, lower is better:

* the point estimate ``diff``: the mean over the evaluation seeds both arms completed of the
  paired difference between the two arms' picks;
* its variance, the sum of three parts:

  - *seeds*: the paired differences' variance / n (Student's t with n − 1 degrees of freedom);
  - *selection*: the pick is itself a random outcome of the race. Every race survivor is
    evaluated on the same seeds and the pick is treated as one draw among them: the spread of
    their true errors (:func:`survivor_spread`) is added, with Satterthwaite's degrees of freedom
    (Bouthillier et al. 2021: the tuning pipeline is a main source of variance);
  - *test examples*: the test split is a sample too. Where per-example outcomes are stored,
    the variance over examples of the paired per-example difference (seed-averaged) / N.

  The interval uses t with Satterthwaite's degrees of freedom for the seed and selection parts.

  With ``replicates`` (:func:`replicate_evidence`) the whole pipeline ran R times on its own
  seeds; the spread of the R replicate differences replaces the seed and selection parts.

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
    df: float = math.nan  # Satterthwaite's, for the seed and selection parts together
    unit: str = "seeds"  #: what ``n`` counts: paired seeds, or (with replicates) paired replicates

    @property
    def se(self) -> float:
        return math.sqrt(self.var_seeds + self.var_selection + self.var_test)

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


def evidence(a: ArmRuns, b: ArmRuns) -> Evidence:
    """A − B on the evaluation seeds both picks completed (see the module docstring)."""
    ea, eb = a.evals.get(a.pick, {}), b.evals.get(b.pick, {})
    seeds = tuple(sorted(s for s in ea if s in eb and _finite(ea[s]) and _finite(eb[s])))
    n = len(seeds)
    if n == 0:
        return Evidence(0, math.nan, math.nan, math.nan, math.nan, seeds)
    d = np.array([ea[s] - eb[s] for s in seeds])
    diff = float(d.mean())
    var_seeds = float(d.var(ddof=1)) / n if n >= 2 else math.nan
    var_sel, df_sel = selection_variance(a, b, seeds)
    var_test = test_variance(a, b, seeds)
    parts = [(var_seeds, n - 1), (var_sel, df_sel)]
    total = var_seeds + var_sel
    denom = sum(v**2 / d for v, d in parts if v > 0 and d > 0 and math.isfinite(d))
    df = min(total**2 / denom, 1e6) if denom > 0 else n - 1  # Satterthwaite; the test part has N − 1 ≫ df
    return Evidence(n, diff, var_seeds, var_sel, var_test, seeds, max(df, 1.0) if n >= 2 else math.nan)


def replicate_evidence(pairs: Sequence[tuple[ArmRuns, ArmRuns]]) -> Evidence:
    """A − B from R replicates of the whole pipeline (search, race, evaluation on their own seeds),
    paired by replicate: a cluster-level (summary-measure) analysis.

    Each replicate r gives d_r, the mean over its evaluation seeds of the paired difference
    between the two arms' picks. The d_r are independent draws of everything that varies from
    one run of the pipeline to the next — seeds, the search's and the race's luck — so their
    spread, var(d_r)/R with R − 1 degrees of freedom (Student's t), is the variance of the
    estimate with the luck of the pick included, without a model of it (the analysis of
    cluster means, e.g. Donner & Klar 2000; for balanced replicates it equals the mixed model
    with seeds nested in replicates). The test split is the same in every replicate, so its
    sampling variance (the seed- and replicate-averaged per-example difference / N) is added.
    """
    per = [(ev, a, b) for ev, (a, b) in ((evidence(a, b), (a, b)) for a, b in pairs)
           if ev.n >= 1 and _finite(ev.diff)]
    n = len(per)
    if n == 0:
        return Evidence(0, math.nan, math.nan, math.nan, math.nan, unit="replicates")
    d = np.array([ev.diff for ev, _, _ in per])
    var_between = float(d.var(ddof=1)) / n if n >= 2 else math.nan
    deltas = []
    for ev, a, b in per:
        oa, ob = a.outcomes.get(a.pick, {}), b.outcomes.get(b.pick, {})
        common = [s for s in ev.seeds if s in oa and s in ob]
        if common:
            deltas.append(np.mean([np.asarray(oa[s], float) - np.asarray(ob[s], float) for s in common], axis=0))
    var_test = 0.0
    if len(deltas) == n and len({x.shape for x in deltas}) == 1 and deltas[0].size >= 2:
        delta = np.mean(deltas, axis=0)
        var_test = float(delta.var(ddof=1)) / delta.size
    seeds = tuple(sorted({s for ev, _, _ in per for s in ev.seeds}))
    return Evidence(n, float(d.mean()), var_between, 0.0, var_test, seeds,
                    float(n - 1) if n >= 2 else math.nan, unit="replicates")


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def survivor_spread(arm: ArmRuns, seeds: Sequence[int]) -> tuple[float, int]:
    """(variance, degrees of freedom) of the true error among an arm's race survivors.

    The race could not tell its survivors apart, so which of them became the pick is luck: the
    pick's true error is treated as one draw among theirs. Every survivor ran the same evaluation
    seeds, so the spread of their means, less what the seeds' own noise contributes (the
    candidate × seed residual / n), estimates the spread of their true errors. (0, 0) with one
    survivor.
    """
    cands = [c for c in sorted(arm.evals) if all(_finite(arm.evals[c].get(s)) for s in seeds)]
    if arm.pick not in cands or len(cands) < 2 or len(seeds) < 2:
        return 0.0, 0
    table = np.array([[arm.evals[c][s] for s in seeds] for c in cands])  # (k, n)
    k, n = table.shape
    means = table.mean(axis=1)
    resid = table - means[:, None] - table.mean(axis=0)[None, :] + table.mean()
    noise = float((resid**2).sum()) / ((k - 1) * (n - 1)) / n
    return max(float(means.var(ddof=1)) - noise, 0.0), k - 1


def selection_variance(a: ArmRuns, b: ArmRuns, seeds: Sequence[int]) -> tuple[float, float]:
    """The pick's luck in A − B: the two arms' survivor spreads added (independent races), with
    their Satterthwaite degrees of freedom."""
    (va, da), (vb, db) = survivor_spread(a, seeds), survivor_spread(b, seeds)
    v = va + vb
    denom = (va**2 / da if da else 0.0) + (vb**2 / db if db else 0.0)
    return v, (v**2 / denom if denom > 0 else math.inf)


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


def seeds_needed(ev: Evidence, margin: float, alpha: float, *, power: float = 0.8, confidence: float = 0.8,
                 stronger_than: str | None = None) -> float:
    """Seeds (replicates, for replicate evidence) in total at which a decision would come out with
    probability ``power`` if the true difference were the observed one: the fewest over "better" (two-sided), "equivalent" (two
    one-sided tests) and "no worse" (one-sided). The per-seed spread (seed and test parts) is
    taken at an upper ``confidence`` bound (a spread from 5 seeds is itself uncertain; 0.5 gives
    the point estimate) and shrinks as 1/n; the pick's luck (the selection part) does not, so a
    distance it alone covers is never reached (infinite). Normal quantiles; ``stronger_than``
    (a non-inferiority code) leaves the non-inferiority decisions out."""
    if ev.n < 2 or not margin > 0:
        return math.nan
    df = ev.n - 1
    # what more units shrink: seeds shrink the seed and (seed-averaged) test parts; replicates share
    # one test split, so with replicates its part stays, like the pick's luck does with more seeds
    shrinks = ev.var_seeds + (ev.var_test if ev.unit == "seeds" else 0.0)
    floor = ev.var_selection + (ev.var_test if ev.unit != "seeds" else 0.0)
    sd2 = ev.n * shrinks
    sd2 = sd2 * df / st.chi2.ppf(1 - confidence, df)
    z = st.norm.ppf

    def n_for(distance: float, side_alpha: float, pw: float) -> float:
        if distance <= 0:
            return math.inf
        room = (distance / (z(1 - side_alpha) + z(pw))) ** 2 - floor
        if room <= 0:
            return math.inf
        return max(sd2 / room, 2.0)

    d = abs(ev.diff)
    options = [n_for(d, alpha / 2, power), n_for(margin - d, alpha, 0.5 + power / 2)]
    if stronger_than is None:
        options += [n_for(margin - ev.diff, alpha, power), n_for(margin + ev.diff, alpha, power)]
    best = min(options)
    return float(max(math.ceil(best), ev.n)) if best < math.inf else math.inf


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
