"""The decision procedure's error rate, proven by simulation through the real engine.

The quickstart's design (its sampler, budget, race, rounds and decision settings) runs on the
simulator's quickstart landscape, where the arms are identical (true effect 0): "better" for
either arm may come out in at most α + 2 Monte-Carlo standard errors of the studies. The same
studies judged by the procedure this replaced — the seed-paired t-test on one pick per arm —
exceed that bound: the test would fail without the fix.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from wdstudy import decide as D
from wdstudy.simulate import QUICKSTART, landscapes_from, run, summarize
from wdstudy.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
STUDIES = 100


@pytest.mark.integration
def test_at_no_true_difference_a_wrong_better_is_no_more_frequent_than_alpha():
    spec = load_spec(ROOT / "studies" / "quickstart.yaml")
    alpha = spec.decision.alpha
    rows = run(spec, landscapes_from(QUICKSTART), [0.0], STUDIES, workers=2)
    bound = alpha + 2 * math.sqrt(alpha * (1 - alpha) / STUDIES)
    table = summarize(rows, alpha, spec.decision.margin_for(True))
    for r in table:
        print(f"{r['task']}: wrong {100 * r['wrong']:.1f}% (bound {100 * bound:.1f}%), one-pick t-test "
              f"{100 * r['old_wrong']:.1f}%, seeds {r['seeds']:.1f}, runs {r['runs']:.0f}")
        assert r["studies"] == STUDIES
        assert r["wrong"] <= bound, r
        assert r[D.BETTER_A] + r[D.BETTER_B] == r["wrong"]  # at effect 0 only a "better" is wrong
    n = len(rows)
    pooled_bound = alpha + 2 * math.sqrt(alpha * (1 - alpha) / n)
    old = sum(r["old"] in (D.BETTER_A, D.BETTER_B) for r in rows) / n
    assert old > pooled_bound, f"the one-pick t-test was wrong in {100 * old:.1f}% only"
    # the rounds ran: some study took more than the first round's seeds, none more than max
    seeds = [r["seeds"] for r in rows]
    assert max(seeds) <= spec.evaluation.max_seeds and min(seeds) >= spec.evaluation.looks()[0]


def test_a_landscape_fitted_from_a_study_recovers_its_numbers():
    import optuna

    from wdstudy.simulate import fit_landscape, one_study

    spec = load_spec(ROOT / "studies" / "quickstart.yaml")
    storage = optuna.storages.InMemoryStorage()  # one simulated study stands in for a finished one
    one_study(spec, landscapes_from(QUICKSTART), 0.0, 7, storage=storage)
    fitted = fit_landscape(storage, "sim7")
    assert set(fitted) == set(QUICKSTART)
    for task, f in fitted.items():
        truth = QUICKSTART[task]
        assert abs(f["base"] - truth["base"]) < 0.03, (task, f)  # the picks sit near the optimum
        assert truth["seed_sd"] / 3 < f["seed_sd"] < 3 * truth["seed_sd"], (task, f)
        assert all(0 <= x <= 1 for x in f["optimum"])
    landscapes_from(fitted)  # and it is a landscape the simulator takes
