"""Replicates: the whole pipeline (search, race, evaluation) run R times on its own seeds, the
decision resting on the spread between replicates (a cluster-level analysis).

The arithmetic is checked against scipy's one-sample t-test of the replicate differences; the
engine runs each replicate on its own seeds; and by simulation through the real engine, at no
true difference, "better" comes out no more often than α allows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from wdstudy import decide as D
from wdstudy.errors import WdstudyError
from wdstudy.simulate import QUICKSTART, landscapes_from, run, summarize
from wdstudy.spec import REPLICA_STRIDE, StudySpec, load_spec, validate

ROOT = Path(__file__).resolve().parents[1]


def arm(values: dict[int, float], outcomes=None) -> D.ArmRuns:
    return D.ArmRuns(0, {0: values}, {}, {0: outcomes} if outcomes else {})


def test_replicate_evidence_is_the_t_test_of_the_replicate_differences():
    rng = np.random.default_rng(3)
    pairs, diffs = [], []
    for r in range(4):
        seeds = range(1000 + r * REPLICA_STRIDE, 1005 + r * REPLICA_STRIDE)
        a = {s: 0.30 + rng.normal(0, 0.01) for s in seeds}
        b = {s: 0.31 + rng.normal(0, 0.01) for s in seeds}
        pairs.append((arm(a), arm(b)))
        diffs.append(np.mean([a[s] - b[s] for s in seeds]))
    ev = D.replicate_evidence(pairs)
    ref = st.ttest_1samp(diffs, 0.0)
    assert ev.unit == "replicates" and ev.n == 4 and ev.df == 3
    assert math.isclose(ev.diff, np.mean(diffs), rel_tol=1e-12)
    assert math.isclose(ev.p_values(0.01)["difference"], ref.pvalue, rel_tol=1e-9)
    lo, hi = ev.interval(0.95)
    ci = ref.confidence_interval(0.95)
    assert math.isclose(lo, ci.low, rel_tol=1e-9) and math.isclose(hi, ci.high, rel_tol=1e-9)
    # TOST at margin m: the larger of the two one-sided t-tests against ±m
    m = 0.02
    p_lo = st.ttest_1samp(diffs, -m, alternative="greater").pvalue
    p_hi = st.ttest_1samp(diffs, m, alternative="less").pvalue
    assert math.isclose(ev.p_values(m)["equivalent"], max(p_lo, p_hi), rel_tol=1e-9)


def test_the_shared_test_split_adds_its_sampling_variance():
    rng = np.random.default_rng(5)
    n_ex = 400
    pairs, deltas = [], []
    for _r in range(3):
        oa = {s: (rng.random(n_ex) < 0.3).astype(float) for s in (1, 2, 3)}
        ob = {s: (rng.random(n_ex) < 0.3).astype(float) for s in (1, 2, 3)}
        pairs.append((arm({s: oa[s].mean() for s in oa}, oa), arm({s: ob[s].mean() for s in ob}, ob)))
        deltas.append(np.mean([oa[s] - ob[s] for s in oa], axis=0))
    ev = D.replicate_evidence(pairs)
    delta = np.mean(deltas, axis=0)
    assert math.isclose(ev.var_test, delta.var(ddof=1) / n_ex, rel_tol=1e-12)
    assert ev.var_selection == 0 and ev.var_seeds > 0
    # more replicates do not shrink the test part: seeds_needed treats it as a floor
    assert D.seeds_needed(ev, margin=math.sqrt(ev.var_test), alpha=0.05) == math.inf


SMALL = {
    "name": "reps", "tasks": [{"name": "mlp-mnist1d", "epochs": 1}], "optimizers": ["adam"],
    "regularizers": ["l2", "decoupled"], "replicates": 3,
    "search": {"lr": {"low": 1e-4, "high": 1.0}, "sampler": "random", "trials": 4, "batch": 2,
               "weight_decay": {"l2": {"low": 1e-8, "high": 1e-1}, "decoupled": {"low": 1e-9, "high": 1e-2}}},
    "selection": {"top_k": 2, "seeds": 2}, "evaluation": {"seeds": 3},
}


def test_each_replicate_is_a_cell_of_its_own_with_its_own_seeds():
    import optuna

    from wdstudy import records as R
    from wdstudy.simulate import one_study

    spec = StudySpec.model_validate(SMALL)
    names = [c.name for c in spec.cells()]
    assert names[:3] == ["reps/mlp-mnist1d/adam/l2", "reps/mlp-mnist1d/adam/l2/r2", "reps/mlp-mnist1d/adam/l2/r3"]
    storage = optuna.storages.InMemoryStorage()
    one_study(spec, landscapes_from(QUICKSTART), 0.0, 1, storage=storage)
    seeds, params = {}, {}
    for c in spec.cells():
        if c.regularizer != "l2":
            continue
        ev = optuna.load_study(study_name=c.name.replace("reps/", "sim1/") + "/eval", storage=storage)
        seeds[c.replicate] = sorted(t.user_attrs[R.SEED] for t in ev.get_trials() if t.user_attrs.get(
            R.CANDIDATE, ev.user_attrs[R.PICK]) == ev.user_attrs[R.PICK])
        search = optuna.load_study(study_name=c.name.replace("reps/", "sim1/"), storage=storage)
        params[c.replicate] = [t.params["lr"] for t in search.get_trials()]
    for r in range(3):
        first = spec.evaluation.first_seed + r * REPLICA_STRIDE
        assert seeds[r] == [first, first + 1, first + 2]
    assert len({tuple(p) for p in params.values()}) == 3  # each replicate's search drew its own proposals


def test_rounds_with_replicates_are_refused_naming_the_field():
    with pytest.raises(WdstudyError, match=r"evaluation\.seeds: rounds .* need replicates: 1"):
        validate(StudySpec, {**SMALL, "evaluation": {"seeds": {"min": 3, "max": 9, "step": 3}}}, where="s.yaml")


STUDIES = 100


@pytest.mark.integration  # about a minute of simulated studies
def test_at_no_true_difference_replicates_decide_better_no_more_often_than_alpha():
    base = load_spec(ROOT / "studies" / "quickstart.yaml").model_dump(mode="json")
    base["tasks"] = [{"name": "mlp-mnist1d", "epochs": 15}]
    base["regularizers"] = ["l2", "decoupled"]
    base["search"]["weight_decay"] = {k: v for k, v in base["search"]["weight_decay"].items() if k != "none"}
    base.update(replicates=3, evaluation={"seeds": 5})
    spec = StudySpec.model_validate(base)
    alpha = spec.decision.alpha
    rows = run(spec, landscapes_from(QUICKSTART), [0.0, 4 * spec.decision.margin_for(True)], STUDIES, workers=2)
    bound = alpha + 2 * math.sqrt(alpha * (1 - alpha) / STUDIES)
    null, effect = summarize(rows, alpha, spec.decision.margin_for(True))
    print(f"replicates 3 × 5 seeds: wrong {100 * null['wrong']:.1f}% (bound {100 * bound:.1f}%); "
          f"at +4 pts: B better {100 * effect[D.BETTER_B]:.1f}%")
    assert null["studies"] == STUDIES and null["wrong"] <= bound
    assert effect[D.BETTER_B] > 0.5  # and it does decide when there is something to find


@pytest.mark.integration
def test_a_study_with_replicates_reports_one_decision_on_the_replicates_spread(tmp_path):
    """The example study with 2 replicates, launched for real: each replicate is a cell of the
    report, and the comparison pairs the arms by replicate (2 replicates: 1 degree of freedom)."""
    import subprocess
    import sys

    import pandas as pd
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "my_study.yaml").read_text())
    data["tasks"][0]["factory"] = str(ROOT / "examples" / "my_task.py") + ":build"
    data.update(replicates=2, output=str(tmp_path / "out"))
    spec = tmp_path / "reps.yaml"
    spec.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(spec), "--quiet"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = pd.read_csv(tmp_path / "out" / "tables" / "summary.csv")
    assert sorted(summary.cell.str.rsplit("/", n=1).str[-1]) == ["decoupled", "l2", "r2", "r2"]
    comp = pd.read_csv(tmp_path / "out" / "tables" / "comparison.csv")
    row = comp.iloc[0]
    assert (row.arm, row.reference, row.n_pairs, row.df) == ("decoupled", "l2", 2, 1.0)
    assert row.selection_included == "replicates: 2 per arm, decided on their spread"
    assert "2 replicates)" in row.verdict
    evals = pd.read_csv(tmp_path / "out" / "evaluations.csv")
    seeds = evals.groupby(evals.cell.str.endswith("/r2")).seed.apply(set)
    assert not seeds[True] & seeds[False]  # each replicate on its own evaluation seeds
