"""Answers that hold: paired statistics, Holm correction, verdicts that name every caveat,
and the audit of what a pruner did. Statistics are checked against scipy and statsmodels on
fixed inputs; verdicts on generated storages (no training) in the report's own code path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial
from scipy import stats as st

from wdstudy import records as R
from wdstudy.cells import distributions, ensure_studies
from wdstudy.config import validate
from wdstudy.report import compute_tables, load_report_data
from wdstudy.spec import StudySpec
from wdstudy.stats import detectable_difference, holm, paired
from wdstudy.storage import open_storage
from wdstudy.synthetic import add_evaluation, add_trials, fill

from .conftest import write_spec

A = [0.312, 0.334, 0.301, 0.351, 0.322, 0.309]
B = [0.331, 0.342, 0.330, 0.362, 0.318, 0.329]


def test_paired_comparison_matches_scipy():
    r = paired(A, B)
    d = np.subtract(A, B)
    assert r.n == 6 and r.mean_diff == pytest.approx(d.mean(), abs=1e-15)
    lo, hi = st.t.interval(0.95, df=5, loc=d.mean(), scale=st.sem(d))
    assert (r.low, r.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    ref = st.ttest_rel(A, B)
    assert r.t == pytest.approx(ref.statistic, rel=1e-12) and r.p_t == pytest.approx(ref.pvalue, rel=1e-10)
    assert r.p_wilcoxon == pytest.approx(st.wilcoxon(d, method="exact").pvalue, rel=1e-12)
    perm = st.permutation_test((A, B), lambda x, y: np.mean(x - y), permutation_type="samples",
                               n_resamples=np.inf, alternative="two-sided")
    assert r.p_signflip == pytest.approx(perm.pvalue, rel=1e-12)
    assert r.effect_dz == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-12)
    assert math.isnan(paired([0.1], [0.2]).p_t) and paired([], []).n == 0


def test_detectable_difference_and_holm_match_statsmodels():
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.power import TTestPower

    for n in (2, 3, 5, 10):
        effect = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
        assert detectable_difference(0.02, n) == pytest.approx(0.02 * effect, rel=1e-6)
    ps = [0.01, 0.04, 0.03, 0.2, 0.004]
    assert holm(ps) == pytest.approx(list(multipletests(ps, method="holm")[1]), rel=1e-12)
    assert math.isnan(holm([0.01, math.nan])[1]) and holm([0.01, math.nan])[0] == pytest.approx(0.01)


# -- verdicts on generated studies -----------------------------------------------------------


def _spec(tmp_path: Path, **search) -> StudySpec:
    return validate(StudySpec, {
        "name": "ans",
        "tasks": [{"name": "mlp-mnist1d"}],
        "optimizers": ["adam"],
        "regularizers": ["none", "l2", "decoupled"],
        "search": {"lr": {"low": 1e-4, "high": 1e-1},
                   "weight_decay": {"l2": {"low": 1e-6, "high": 1e-1}, "decoupled": {"low": 1e-3, "high": 100.0}},
                   "sampler": "random", "trials": 12, **search},
        "evaluation": {"seeds": 5},
        "output": str(tmp_path / "out"),
    })


def _data(storage):
    d = load_report_data(storage, "ans", "test")
    compute_tables(d)
    return d


def _row(d, arm, ref):
    c = d.comparison
    return c[(c.arm == arm) & (c.reference == ref)].iloc[0]


def test_every_arm_is_compared_with_l2_and_none_on_paired_seeds_with_holm(tmp_path):
    spec = _spec(tmp_path)
    storage = open_storage(str(tmp_path / "j.journal"))
    fill(spec, storage, trials=12, seeds=5)
    d = _data(storage)
    pairs = {(r.arm, r.reference) for r in d.comparison.itertuples()}
    assert pairs == {("decoupled", "l2"), ("l2", "none"), ("decoupled", "none")}
    r = _row(d, "decoupled", "l2")
    seeds = {}
    for reg in ("decoupled", "l2"):
        e = d.evals[(d.evals.regularizer == reg) & (d.evals.state == "COMPLETE")].sort_values("seed")
        seeds[reg] = e.test_error.to_numpy()
    assert r.n_pairs == 5 and r.p_naive == pytest.approx(st.ttest_rel(seeds["decoupled"], seeds["l2"]).pvalue)
    fam = d.comparison.set_index(["arm", "reference"]).family
    assert fam[("decoupled", "l2")] == "primary" and set(fam.drop(("decoupled", "l2"))) == {"secondary"}
    # no race here: the interval is the seeds' and the test split's (none stored) alone, so the primary
    # comparison's p (a family of one) is the paired t-test's
    assert r.var_selection == 0 and r.p_difference == pytest.approx(r.p_naive)
    assert r.verdict.startswith(("decoupled better", "L2 better", "equivalent", "decoupled no worse", "L2 no worse",
                                 "undecided", "inconclusive"))


def test_a_diverged_seed_is_named_in_the_verdict(tmp_path):
    spec = _spec(tmp_path)
    storage = open_storage(str(tmp_path / "j.journal"))
    rng = np.random.default_rng(0)
    ensure_studies(spec, storage)
    for cell in spec.cells():
        add_trials(spec, cell, storage, 12, 3, rng)
        add_evaluation(spec, cell, storage, 4 if cell.regularizer == "decoupled" else 5, 3, rng)
    dec = next(c for c in spec.cells() if c.regularizer == "decoupled")
    ev = optuna.load_study(study_name=dec.eval_name, storage=storage)
    ev.add_trial(create_trial(state=TrialState.PRUNED, params=ev.user_attrs[R.BEST_PARAMS],
                              distributions=distributions(spec, dec),
                              user_attrs={R.SEED: 1004, R.OUTCOME: "diverged", R.REASON: "loss is nan"}))
    d = _data(storage)
    r = _row(d, "decoupled", "l2")
    assert r.n_pairs == 4
    assert "decoupled diverged on 1 of 5 seeds" in r.verdict
    summary = d.summary.set_index("regularizer")
    assert summary.loc["decoupled", "diverged_seeds"] == 1


def test_an_optimum_at_the_edge_of_its_range_is_inconclusive(tmp_path):
    spec = _spec(tmp_path)
    storage = open_storage(str(tmp_path / "j.journal"))
    rng = np.random.default_rng(1)
    ensure_studies(spec, storage)
    for cell in spec.cells():
        add_trials(spec, cell, storage, 11, 3, rng)
        if cell.regularizer == "decoupled":  # the best trial sits on the high edge of λ
            study = optuna.load_study(study_name=cell.name, storage=storage)
            study.add_trial(create_trial(params={"lr": 1e-3, "weight_decay": 100.0}, distributions=distributions(spec, cell),
                                         value=0.001, user_attrs={R.GENERATION: 5, R.SLOT: 3}))
        else:
            add_trials(spec, cell, storage, 1, 3, rng)
        add_evaluation(spec, cell, storage, 5, 3, rng)
    d = _data(storage)
    assert d.summary.set_index("regularizer").loc["decoupled", "weight_decay_edge"] == "high edge"
    r = _row(d, "decoupled", "l2")
    assert r.outcome == "inconclusive: widen the range" and r.verdict.startswith("inconclusive: ")
    assert "decoupled λ at the high edge" in r.caveats
    assert "better" not in r.verdict


def test_pruning_audit_flags_pruning_that_fell_on_high_lambda(tmp_path):
    spec = _spec(tmp_path, pruner="median")
    storage = open_storage(str(tmp_path / "j.journal"))
    ensure_studies(spec, storage)
    rng = np.random.default_rng(2)
    for cell in spec.cells():
        study = optuna.load_study(study_name=cell.name, storage=storage)
        dists = distributions(spec, cell)
        wd = spec.weight_decay_range(cell.regularizer)
        for i in range(24):
            params = {"lr": float(10 ** rng.uniform(-4, -1))}
            pruned = i % 2 == 1
            if wd is not None:  # pruned trials in the upper 40% of the λ range, completed ones anywhere
                lo, hi = math.log10(wd.low), math.log10(wd.high)
                frac = rng.uniform(0.6, 1.0) if pruned else rng.uniform(0.0, 1.0)
                params["weight_decay"] = float(10 ** (lo + frac * (hi - lo)))
            study.add_trial(create_trial(
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE, params=params, distributions=dists,
                value=None if pruned else float(rng.uniform(0.3, 0.4)), intermediate_values={0: 0.5},
                user_attrs={R.OUTCOME: "pruned" if pruned else "complete", R.GENERATION: i // 4, R.SLOT: i % 4}))
    d = _data(storage)
    audit = d.pruning.set_index("cell")
    for reg in ("l2", "decoupled"):
        row = audit.loc[f"ans/mlp-mnist1d/adam/{reg}"]
        assert row.pruned == 12 and "pruning fell mostly on high λ" in row.warning
    assert any("pruning fell mostly on high λ" in line for line in d.status_lines)


def test_pruning_audit_is_quiet_when_pruning_is_even(tmp_path):
    spec = _spec(tmp_path, pruner="median")
    storage = open_storage(str(tmp_path / "j.journal"))
    fill(spec, storage, trials=12, seeds=2)
    for cell in spec.cells():  # prune every third trial in order of λ: spread over the whole range
        study = optuna.load_study(study_name=cell.name, storage=storage)
        for t in sorted(study.get_trials(), key=lambda t: t.params.get("weight_decay", 0))[1::3]:
            study.add_trial(create_trial(state=TrialState.PRUNED, params=t.params, distributions=t.distributions,
                                         intermediate_values={0: 0.5}, user_attrs={R.OUTCOME: "pruned"}))
    d = _data(storage)
    assert len(d.pruning) == 2 and not d.pruning.warning.any()


# -- the decoupled arm searched over its per-step shrink η·λ ------------------------------------


@pytest.mark.integration
def test_decoupled_searched_over_the_shrink_trains_with_lambda_equal_shrink_over_lr(tmp_path):
    from wdstudy.analysis import evaluations_frame, trials_frame
    from wdstudy.spec import load_spec
    from wdstudy.tasks import task_config
    from wdstudy.train import optimizer_config, train_run
    from wdstudy.worker import Worker

    spec = load_spec(write_spec(tmp_path, regularizers=["decoupled"],
                                search={"sampler": "grid", "grid_points": 2, "trials": None,
                                        "weight_decay": {"low": 1e-5, "high": 1e-3, "axis": "shrink"}},
                                evaluation={"seeds": 1}))
    cell = spec.cells()[0]
    assert set(distributions(spec, cell)) == {"lr", "shrink"}
    url = str(tmp_path / "out" / "optuna.journal")
    ensure_studies(spec, open_storage(url))
    Worker(spec, url, poll=0.1, log=lambda m: None).run()
    storage = open_storage(url)
    record = optuna.load_study(study_name=cell.name, storage=storage).user_attrs[R.CELL]
    # λ reachable with η in [1e-3, 1e-2] and η·λ in [1e-5, 1e-3]: [1e-3, 1]
    assert record["weight_decay_range"] == pytest.approx([1e-3, 1.0])
    assert record[R.DECAY_AXIS] == {"axis": "shrink", "range": [1e-5, 1e-3]}
    df = trials_frame(storage, "tiny")
    shrinks = {round(r.lr * r.weight_decay, 12) for r in df.itertuples()}
    assert shrinks == {1e-5, 1e-3}  # λ is stored as shrink / η, and the grid's endpoints are exact
    # the evaluation trained with λ = shrink / η: the same weights as a direct run with that λ
    ev = evaluations_frame(storage, "tiny").iloc[0]
    direct = train_run(task_config("mlp-mnist1d", width=16, max_train=400, epochs=2), optimizer_config("adam"),
                       "decoupled", ev.lr, ev.weight_decay, seed=int(ev.seed), accelerator="cpu")
    assert direct.metrics["weight_norm"] == pytest.approx(ev.weight_norm, rel=1e-6)
    d = load_report_data(storage, "tiny", "test")
    compute_tables(d)
    row = d.summary.iloc[0]
    assert row.weight_decay_range == "η·λ 1e-05–0.001" and row.decay_axis == "shrink"
    # the grid's every point is on an edge of the shrink range, so the pick is too
    assert row.weight_decay_edge in ("low edge", "high edge")


def test_a_shrink_axis_is_refused_for_an_arm_other_than_decoupled():
    from wdstudy.errors import WdstudyError

    spec = {"name": "a", "tasks": ["mlp-mnist1d"], "optimizers": ["adam"], "regularizers": ["l2", "decoupled"],
            "search": {"lr": {"low": 1e-4, "high": 1e-1}, "sampler": "random", "trials": 4,
                       "weight_decay": {"l2": {"low": 1e-6, "high": 1e-1, "axis": "shrink"},
                                        "decoupled": {"low": 1e-7, "high": 1e-2, "axis": "shrink"}}}}
    with pytest.raises(WdstudyError, match=r"search\.weight_decay\.l2\.axis: 'shrink' applies to the decoupled arm"):
        validate(StudySpec, spec, "a.yaml")
    spec["search"]["weight_decay"]["l2"]["axis"] = "lambda"
    assert validate(StudySpec, spec).weight_decay_range("decoupled").axis == "shrink"
