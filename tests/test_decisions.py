"""The decision procedure (wdstudy.decide) against independent references.

TOST and non-inferiority against statsmodels' ``ttost_paired`` / ``ttest_rel``-style one-sided
tests, Holm against ``multipletests``, the α-spending against its closed form, the race's
survivors on the constant-gap case, and the interval's coverage by simulation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW, ttost_paired

from wdstudy import decide as D
from wdstudy import records as R


def arm(values: dict[int, float], pick: int = 0, **others) -> D.ArmRuns:
    evals = {pick: values, **others}
    return D.ArmRuns(pick, evals, race={c: [0.0, 0.0, 0.0] for c in evals})


@pytest.mark.parametrize("seed", range(6))
def test_tost_and_noninferiority_match_statsmodels_without_selection(seed):
    rng = np.random.default_rng(seed)
    n, m = 8, 0.01
    b = rng.normal(0.3, 0.01, n)
    a = b + rng.normal(rng.uniform(-0.01, 0.01), 0.006, n)
    ev = D.evidence(arm(dict(enumerate(a))), arm(dict(enumerate(b))))
    assert ev.var_selection == 0 and ev.var_test == 0 and ev.df == n - 1
    p = ev.p_values(m)
    ref_p, _, _ = ttost_paired(a, b, -m, m)
    assert p[D.EQUIVALENT] == pytest.approx(ref_p, rel=1e-9)
    d = DescrStatsW(a - b)
    assert p[D.NONINF_A] == pytest.approx(d.ttest_mean(m, alternative="smaller")[1], rel=1e-9)
    assert p[D.NONINF_B] == pytest.approx(d.ttest_mean(-m, alternative="larger")[1], rel=1e-9)
    assert p["difference"] == pytest.approx(d.ttest_mean(0.0)[1], rel=1e-9)
    lo, hi = ev.interval(0.95)
    ref_lo, ref_hi = d.tconfint_mean(0.05)
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), rel=1e-9)


def test_holm_matches_statsmodels_and_nan_does_not_count():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, rng.integers(1, 7)))
        assert D.holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert D.holm([0.01, math.nan, 0.04])[::2] == pytest.approx(list(multipletests([0.01, 0.04], method="holm")[1]))


def test_decisions_each_from_their_own_holm_family():
    # two comparisons, one clearly better, one clearly equivalent: each decision from its adjusted p
    n = 10
    base = np.linspace(0.30, 0.31, n)
    better = D.evidence(arm(dict(enumerate(base - 0.03 + 0.002 * np.sin(np.arange(n))))), arm(dict(enumerate(base))))
    same = D.evidence(arm(dict(enumerate(base + 0.0005 * np.cos(np.arange(n))))), arm(dict(enumerate(base))))
    out = D.decide([better, same], 0.01, 0.05)
    assert [d.code for d in out] == [D.BETTER_A, D.EQUIVALENT]
    raw = [better.p_values(0.01)[D.EQUIVALENT], same.p_values(0.01)[D.EQUIVALENT]]
    assert [d.p_adjusted[D.EQUIVALENT] for d in out] == pytest.approx(list(multipletests(raw, method="holm")[1]))


def test_a_zero_spread_is_no_evidence_and_no_zero_width_interval():
    ev = D.evidence(arm({1: 0.30, 2: 0.31}), arm({1: 0.29, 2: 0.30}))  # the same +1 pt on both seeds
    assert ev.se == 0
    assert all(v == 1.0 for v in ev.p_values(0.01).values())
    assert D.decide([ev], 0.01, 0.05)[0].code == D.UNDECIDED


def test_look_alphas_spend_alpha_pocock_style():
    looks = [5, 10, 15, 20, 25, 30]
    a = D.look_alphas(0.05, looks)
    assert sum(a) == pytest.approx(0.05)
    assert all(x > 0 for x in a) and a[0] == pytest.approx(0.05 * math.log(1 + (math.e - 1) / 6))
    assert D.look_alphas(0.05, [5]) == [pytest.approx(0.05)]


def test_survivors_use_the_margin_and_survive_a_constant_gap_of_a_few_examples():
    # the case: a candidate 1.00 pt behind the pick on both race seeds (4 of 400 examples)
    race = {0: [0.300, 0.310], 1: [0.310, 0.320], 2: [0.3225, 0.3325]}
    out = D.race_survivors(race, 0, 0.01, resolution=1 / 400)
    assert 1 in out  # 1 pt < what 2 seeds can show beyond m/2 at one-example resolution
    far = {0: [0.30, 0.31, 0.30], 1: [0.36, 0.37, 0.36]}  # 6 pts behind on 3 seeds
    assert D.race_survivors(far, 0, 0.01, resolution=1 / 400) == [0]
    assert 1 not in D.race_survivors(race, 0, 0.01, diverged=[1], resolution=1 / 400)  # a diverged run is out


def test_survivor_spread_removes_the_seed_noise():
    rng = np.random.default_rng(0)
    n, seeds = 400, range(400)
    shared = rng.normal(0, 0.02, n)
    evals = {c: {s: 0.30 + 0.01 * c + shared[s] + rng.normal(0, 0.01) for s in seeds} for c in range(3)}
    v, df = D.survivor_spread(D.ArmRuns(0, evals, race={c: [0.0] for c in range(3)}), list(seeds))
    assert df == 2
    assert v == pytest.approx(np.var([0.30, 0.31, 0.32], ddof=1), rel=0.1)


def test_seeds_needed_falls_with_the_spread_and_is_infinite_beyond_the_margin():
    def ev(sd, diff, sel=0.0):
        return D.Evidence(5, diff, sd**2 / 5, sel, 0.0, tuple(range(5)), 4.0)

    assert D.seeds_needed(ev(0.01, 0.0), 0.01, 0.05) < D.seeds_needed(ev(0.02, 0.0), 0.01, 0.05)
    assert D.seeds_needed(ev(0.01, 0.0, sel=0.01**2), 0.01, 0.05) == math.inf  # the pick's luck alone fills ±m
    assert D.seeds_needed(ev(0.01, 0.03), 0.01, 0.05, stronger_than=D.NONINF_B) < math.inf  # "better" is reachable


def test_coverage_of_the_interval_with_selection_luck_by_simulation():
    # true arm difference 0; each arm's pick is one of 3 survivors whose true errors differ
    rng = np.random.default_rng(1)
    covered, trials = 0, 400
    for _ in range(trials):
        n = 8
        seeds = list(range(n))
        arms = []
        for _arm in range(2):
            truths = rng.normal(0.30, 0.004, 3)
            truths -= truths.mean() - 0.30  # the arm's tuned performance is 0.30 in truth
            shared = rng.normal(0, 0.01, n)
            evals = {c: {s: truths[c] + shared[s] + rng.normal(0, 0.005) for s in seeds} for c in range(3)}
            arms.append(D.ArmRuns(int(rng.integers(3)), evals, race={c: [0.0] for c in range(3)}))
        lo, hi = D.evidence(*arms).interval(0.90)
        covered += lo <= 0 <= hi
    rate = covered / trials
    assert rate >= 0.90 - 2 * math.sqrt(0.9 * 0.1 / trials), rate


def test_per_example_outcomes_round_trip_compactly():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, 10_000)
    text = R.encode_outcomes(bits, True)
    assert len(text) < 2_000  # CIFAR-10's test split in under 2 kB
    assert (R.decode_outcomes(text) == bits).all()
    sq = rng.uniform(0, 3, 50)
    assert R.decode_outcomes(R.encode_outcomes(sq, False)) == pytest.approx(sq, rel=1e-3)


def test_test_split_variance_is_the_paired_per_example_variance():
    rng = np.random.default_rng(2)
    a = {s: rng.integers(0, 2, 1000).astype(float) for s in range(3)}
    b = {s: rng.integers(0, 2, 1000).astype(float) for s in range(3)}
    A = D.ArmRuns(0, {0: {s: a[s].mean() for s in a}}, outcomes={0: a})
    B = D.ArmRuns(0, {0: {s: b[s].mean() for s in b}}, outcomes={0: b})
    delta = np.mean([a[s] for s in a], axis=0) - np.mean([b[s] for s in b], axis=0)
    assert D.test_variance(A, B, [0, 1, 2]) == pytest.approx(delta.var(ddof=1) / 1000)
