"""The post-selection race: a cell's best candidates re-run on new seeds pick its configuration.

The engine path is real (storage, reservation, race units, evaluation of the pick); where a
test needs a known landscape, the training call is replaced by a function of (η, λ, seed),
so that a lucky single run is known to be lucky.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from wdstudy import records as R
from wdstudy.analysis import evaluations_frame, progress_frame, race_frame, trials_frame
from wdstudy.cells import ensure_studies
from wdstudy.errors import WdstudyError
from wdstudy.proposals import race_standings
from wdstudy.report import compute_tables, load_report_data
from wdstudy.spec import load_spec
from wdstudy.storage import open_storage
from wdstudy.worker import Worker

LUCKY_LR = 5e-3  # the search's single run at lr above this is 0.25 better than the truth


def fake_train(spec, worse: dict[str, float] | None = None, lucky_test: float = 0.0):
    """Validation error: a bowl in log η with its bottom at 10^-2.5, plus a lucky search run;
    test error per arm (decoupled best) with a seed-to-seed wobble shared by the arms."""
    worse = worse or {}

    def train(cell, lr, wd, seed, callbacks, with_test):
        reg = cell.regularizer
        val = 0.5 + 0.1 * abs(math.log10(lr) + 2.5) + 0.001 * (seed % 7) + worse.get(reg, 0.0)
        if seed == spec.search.seed and lr > LUCKY_LR:
            val -= 0.25  # a lucky draw on the search seed
        test = {"none": 0.35, "l2": 0.40, "decoupled": 0.30}[reg] + 0.01 * (seed % 5) + 1e-4 * (seed % 3)
        test += 0.002 * ((seed * len(reg)) % 5)  # each arm's own wobble: the paired differences have a spread
        if reg == "decoupled":  # with lucky_test, which survivor is the pick moves the test error a lot
            test += lucky_test * ((round(math.log10(lr) * 1000) % 3) - 1)
        m = {"val_error": val, "val_loss": val, "train_error": 0.1, "train_loss": 0.1, "val_size": 400,
             "wall_time_s": 0.01, "device": "cpu", "epochs": 1, "weight_norm": 1.0}
        if with_test:  # as train_run: the test split is measured only when asked for
            m.update(test_error=test, test_loss=test, gap_error=test - 0.1, gap_loss=test - 0.1)
        return SimpleNamespace(metrics=m, history=[])

    return train


def write_spec(tmp_path, **over):
    import yaml

    spec = {"name": "tiny", "tasks": [{"name": "mlp-mnist1d", "width": 16, "max_train": 400, "epochs": 1}],
            "optimizers": ["adam"], "output": str(tmp_path / "out"), **over}
    wd = ({"low": 1e-5, "high": 1e-2} if spec["regularizers"] == ["none"]  # (unused by the none arm)
          else {"l2": {"low": 1e-5, "high": 1e-2}, "decoupled": {"low": 1e-2, "high": 10}})
    spec["search"] = {**spec["search"], "weight_decay": wd}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(tmp_path, worse=None, lucky_test=0.0, **over):
    spec = load_spec(write_spec(tmp_path, **over))
    url = str(tmp_path / "out" / "optuna.journal")
    ensure_studies(spec, open_storage(url))
    Worker(spec, url, poll=0.01, log=lambda m: None, train=fake_train(spec, worse, lucky_test)).run()
    return spec, url, open_storage(url)


GRID = dict(regularizers=["none"], search={"sampler": "grid", "grid_points": 3, "lr": {"low": 1e-3, "high": 1e-2}},
            selection={"top_k": 3, "seeds": 2}, evaluation={"seeds": 2})


def test_the_race_overturns_a_lucky_single_run(tmp_path):
    spec, url, storage = _run(tmp_path, **GRID)
    sel = race_frame(storage, "tiny")
    assert len(sel) == 3 and sel.chosen.sum() == 1
    first = sel[sel.search_rank == 1].iloc[0]
    assert first.lr > LUCKY_LR and not first.chosen  # the search's best was the lucky run ...
    pick = sel[sel.chosen].iloc[0]
    assert pick.lr == pytest.approx(10 ** -2.5) and pick.race_mean == sel.race_mean.min()  # ... the race saw through it
    ev = optuna.load_study(study_name=spec.cells()[0].eval_name, storage=storage)
    assert ev.user_attrs[R.BEST_PARAMS] == {"lr": pick.lr} and ev.user_attrs[R.BEST_TRIAL] == pick.trial
    t = trials_frame(storage, "tiny")
    assert t[t.chosen].trial.tolist() == [pick.trial]  # the report's chosen trial is the race's pick
    evals = optuna.load_study(study_name=spec.cells()[0].eval_name, storage=storage).trials
    assert {tr.params["lr"] for tr in evals} == {pick.lr}


def test_race_seeds_are_new_and_counted_in_the_progress(tmp_path):
    spec, url, storage = _run(tmp_path, **GRID)
    race = optuna.load_study(study_name=spec.cells()[0].race_name, storage=storage)
    seeds = {t.user_attrs[R.SEED] for t in race.trials}
    assert seeds == {2000, 2001}
    assert not seeds & ({spec.search.seed} | set(range(spec.evaluation.first_seed,
                                                        spec.evaluation.first_seed + spec.evaluation.seeds)))
    assert all(t.state == TrialState.COMPLETE for t in race.trials) and len(race.trials) == 3 * 2
    assert all("test_error" not in t.user_attrs for t in race.trials)  # the race never touches the test split
    row = progress_frame(storage, "tiny").iloc[0]
    assert row.race_done == row.race_total == 6


def test_race_seeds_that_repeat_evaluation_seeds_are_refused(tmp_path):
    path = write_spec(tmp_path, **{**GRID, "selection": {"top_k": 2, "seeds": 3, "first_seed": 999}})
    with pytest.raises(WdstudyError, match=r"selection\.first_seed.*1000"):
        load_spec(path)


def test_a_worker_stopped_mid_race_resumes_with_exact_budgets(tmp_path):
    spec = load_spec(write_spec(tmp_path, **GRID))
    url = str(tmp_path / "out" / "optuna.journal")
    ensure_studies(spec, open_storage(url))
    train = fake_train(spec)
    Worker(spec, url, poll=0.01, log=lambda m: None, train=train).run(max_units=3 + 2)  # the search, two race runs
    storage = open_storage(url)
    row = progress_frame(storage, "tiny").iloc[0]
    assert row.done == 3 and row.race_done == 2 and row.eval_done == 0
    Worker(spec, url, poll=0.01, log=lambda m: None, train=train).run()  # a new worker finishes the race
    race = optuna.load_study(study_name=spec.cells()[0].race_name, storage=open_storage(url))
    keys = [(t.user_attrs[R.CANDIDATE], t.user_attrs[R.SEED]) for t in race.trials]
    assert sorted(keys) == sorted({(c, s) for c in range(3) for s in (2000, 2001)})  # each exactly once
    row = progress_frame(open_storage(url), "tiny").iloc[0]
    assert (row.race_done, row.eval_done) == (6, 2)


def test_a_race_run_whose_worker_vanished_is_retried_once(tmp_path):
    """A race run left RUNNING by a dead worker (its lease expired): failed, re-run, counted once."""
    import time

    from wdstudy.cells import Cells
    from wdstudy.storage import StudyLock

    spec = load_spec(write_spec(tmp_path, **GRID))
    url = str(tmp_path / "out" / "optuna.journal")
    storage = open_storage(url)
    ensure_studies(spec, storage)
    train = fake_train(spec)
    Worker(spec, url, poll=0.01, log=lambda m: None, train=train).run(max_units=3)  # the search
    with StudyLock(url, spec.name):
        unit, _ = Cells(spec, storage).reserve()  # a race run, taken by a worker that then dies
    assert unit.kind == "race"
    storage.set_trial_system_attr(unit.trial._trial_id, R.OWNER, "elsewhere:4242")
    storage.set_trial_system_attr(unit.trial._trial_id, R.LEASE, time.time() - 3600)
    Worker(spec, url, poll=0.01, log=lambda m: None, train=train).run()
    race = optuna.load_study(study_name=spec.cells()[0].race_name, storage=open_storage(url))
    done = [(t.user_attrs[R.CANDIDATE], t.user_attrs[R.SEED]) for t in race.trials if t.state == TrialState.COMPLETE]
    failed = [t for t in race.trials if t.state == TrialState.FAIL]
    assert sorted(done) == sorted({(c, s) for c in range(3) for s in (2000, 2001)})
    assert len(failed) == 1 and failed[0].number == unit.trial.number
    assert failed[0].system_attrs[R.FAIL_KIND] == R.LOST


def _trial(candidate: int, seed: int, value: float | None, state=TrialState.COMPLETE):
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None, params={},
                        distributions={}, user_attrs={R.CANDIDATE: candidate, R.SEED: seed})


def test_race_standings_rules():
    cands = [{"trial": 7, "params": {"lr": 1.0}, "value": 0.1}, {"trial": 3, "params": {"lr": 2.0}, "value": 0.2},
             {"trial": 5, "params": {"lr": 3.0}, "value": 0.3}]
    trials = [_trial(0, 1, 0.4), _trial(0, 2, 0.4), _trial(1, 1, 0.3), _trial(1, 2, 0.3),
              _trial(2, 1, 0.1), _trial(2, 2, None, TrialState.PRUNED)]
    out = race_standings(cands, trials)
    assert [c["chosen"] for c in out] == [False, True, False]  # the diverged candidate is never picked
    assert out[2]["diverged"] and out[1]["race_mean"] == pytest.approx(0.3) and out[0]["race_n"] == 2
    tie = race_standings(cands[:2], [_trial(0, 1, 0.3), _trial(1, 1, 0.3)])
    assert [c["chosen"] for c in tie] == [True, False]  # a tie goes to the better search rank


ARMS = dict(regularizers=["l2", "decoupled"], selection={"top_k": 3, "seeds": 3}, evaluation={"seeds": 3},
            search={"sampler": "random", "trials": 4, "lr": {"low": 1e-3, "high": 1e-2}})


def _comparison(storage) -> pd.Series:
    d = load_report_data(storage, "tiny", "test")
    compute_tables(d)
    return d.comparison.set_index(["arm", "reference"]).loc[("decoupled", "l2")]


@pytest.mark.integration
def test_every_survivor_is_evaluated_and_a_clear_difference_is_decided(tmp_path):
    spec, url, storage = _run(tmp_path, **ARMS)
    every = evaluations_frame(storage, "tiny", survivors=True)
    sel = load_report_data(storage, "tiny", "test").selection
    for cell, g in sel.groupby("cell"):
        done = every[(every.cell == cell) & (every.state == "COMPLETE")]
        # each survivor ran every evaluation seed once; a candidate that did not survive ran none
        assert sorted(done.candidate.unique()) == sorted(g[g.survivor].search_rank - 1)
        assert (done.groupby("candidate").seed.nunique() == 3).all()
    r = _comparison(storage)
    assert r.test_error_diff < 0 and r.family == "primary"
    assert r.decision_code == "A better" and r.decision == "decoupled better"  # 10 pts on every seed


@pytest.mark.integration
def test_the_luck_of_the_pick_widens_the_interval_and_weakens_the_decision(tmp_path):
    # decoupled's survivors differ by up to 15 pts on test: every seed favours its pick over L2 by
    # 25 pts and the one-pick t-test is sure of it, but which survivor was picked is luck (a
    # survivor 9 pts better than L2 was as likely): "no worse", not "better"
    spec, url, storage = _run(tmp_path, lucky_test=0.15, **ARMS)
    r = _comparison(storage)
    assert r.var_selection > 0 and "survivors evaluated: decoupled 3" in r.selection_included
    assert r.p_naive < 0.001 and r.naive_high < -0.2
    assert r.decision_code == "A no worse" and r.test_error_high > 0
    assert r.test_error_high - r.test_error_low > 10 * (r.naive_high - r.naive_low)


def test_tuning_curve_bands_against_opda_on_fixed_inputs():
    import numpy as np
    from opda.nonparametric import EmpiricalDistribution

    from wdstudy.stats import tuning_curve

    ys = np.array([0.42, 0.35, 0.61, 0.33, 0.50, 0.38, 0.90, 0.36, 0.47, 0.34, 0.55, 0.40])
    ns = np.arange(1, len(ys) + 1)
    curve, lo, hi = tuning_curve(ys, ns)
    lo_cdf, point, hi_cdf = EmpiricalDistribution.confidence_bands(ys, 0.8, a=0.0, b=1.0, method="ld_equal_tailed",
                                                                    generator=np.random.default_rng(0), n_jobs=1)
    np.testing.assert_allclose(curve, point.quantile_tuning_curve(ns, minimize=True))
    np.testing.assert_allclose(lo, hi_cdf.quantile_tuning_curve(ns, minimize=True))
    np.testing.assert_allclose(hi, lo_cdf.quantile_tuning_curve(ns, minimize=True))
    # independent checks: the best of one draw has the sample median as its median; the best of n
    # draws has median F^-1(1 - 0.5^(1/n)); the curve only falls, inside its band
    srt = np.sort(ys)
    for n in (1, 2, 5, 12):  # a discrete quantile is one of the two order statistics around it
        k = int(np.ceil((1 - 0.5 ** (1 / n)) * len(ys)))
        assert curve[n - 1] in (srt[k - 1], srt[min(k, len(ys) - 1)])
    assert np.all(np.diff(curve) <= 0) and np.all(lo <= curve) and np.all(curve <= hi)
    assert hi[-1] - lo[-1] > 0  # twelve draws leave real uncertainty


@pytest.mark.integration
def test_a_launch_killed_mid_race_resumes_with_exact_budgets(tmp_path):
    """Real processes: the launcher is killed (its workers follow it) while race runs are in
    flight; a second launch finishes with every (candidate, seed) run exactly once."""
    from .conftest import assert_exact, cli, journal
    from .conftest import write_spec as study_spec
    from .test_engine import kill_launch_when

    spec = study_spec(tmp_path, search={"trials": 3}, task_defaults={"epochs": 40},
                      selection={"top_k": 3, "seeds": 2}, evaluation={"seeds": 2})

    def racing():
        path = tmp_path / "out" / "optuna.journal"
        if not path.exists():
            return False
        prog = progress_frame(journal(tmp_path), "tiny")
        # early in the race (at most 4 of its 12 runs done), so the kill lands mid-race on a busy machine too
        return len(prog) and 1 <= prog.race_done.sum() <= 4 and prog.eval_done.sum() == 0

    kill_launch_when(spec, racing, 300, "the race to start", interval=0.1)
    before = progress_frame(journal(tmp_path), "tiny")
    assert 1 <= before.race_done.sum() < 2 * 6  # killed mid-race
    r = cli("launch", str(spec), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=3, seeds=2, cells=2)
    for cell in ("l2", "decoupled"):
        race = optuna.load_study(study_name=f"tiny/mlp-mnist1d/adam/{cell}/race", storage=storage)
        done = [(t.user_attrs[R.CANDIDATE], t.user_attrs[R.SEED]) for t in race.trials
                if t.state == TrialState.COMPLETE]
        assert sorted(done) == sorted({(c, s) for c in range(3) for s in (2000, 2001)})
    assert set(progress_frame(storage, "tiny").race_done) == {6}
