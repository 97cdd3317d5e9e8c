"""The mechanics of every run of a study: stored with the trial, kept across a resume, exported."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from wdstudy.analysis import diagnostics_frame, evaluations_frame, export, trials_frame
from wdstudy.storage import open_storage

from .conftest import quiet_worker, setup_study


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A tiny study (L2 and decoupled, 3 epochs) stopped after two runs and finished by a new worker."""
    tmp_path = tmp_path_factory.mktemp("mechanics")
    spec, url = setup_study(tmp_path, task_defaults={"epochs": 3}, search={"trials": 2})
    first = quiet_worker(spec, url)
    assert first.run(max_units=2) == 2  # stop after two runs; a new worker resumes the study
    before = diagnostics_frame(open_storage(url), "tiny")
    assert len(before.groupby(["cell", "phase", "trial"])) == 2
    quiet_worker(spec, url).run()
    return tmp_path, url, before


@pytest.mark.integration
def test_mechanics_are_stored_survive_a_resume_and_are_exported(resumed):
    tmp_path, url, before = resumed

    storage = open_storage(url)
    diag = diagnostics_frame(storage, "tiny")
    trials, evals = trials_frame(storage, "tiny"), evaluations_frame(storage, "tiny")
    done = pd.concat([trials.assign(phase="search"), evals.assign(phase="eval")])
    done = done[done.state == "COMPLETE"]
    runs = diag.groupby(["cell", "phase", "trial"])
    assert len(runs) == len(done)  # every run carries its mechanics
    kept = before.merge(diag, on=["cell", "phase", "trial", "layer", "step"], suffixes=("", "_after"))
    assert len(kept) == len(before) and (kept.weight_norm == kept.weight_norm_after).all()
    for (cell, phase, number), g in runs:
        run = done[(done.cell == cell) & (done.phase == phase) & (done.trial == number)].iloc[0]
        last = g[g.step == g.step.max()]
        # the layers' final norms, taken together, are the run's weight norm measured by the regularizer
        assert math.sqrt((last.weight_norm ** 2).sum()) == pytest.approx(run.weight_norm, rel=1e-6)
        assert sorted(g.step.unique())[-1] == run.steps and g.step.nunique() == 11  # start + 10 checkpoints
        assert run.steps_per_epoch * 3 == run.steps and math.isclose(run.run_epochs, 3)
        if run.regularizer == "decoupled":  # the timescale columns of the trials and evaluations frames
            assert math.isclose(run.tau_epoch, 1 / (run.lr * run.weight_decay * run.steps_per_epoch))
            assert run.equilibrium_ratio > 0 and (g[g.step > 0].predicted_angular_update > 0).all()
        else:
            assert pd.isna(run.tau_epoch) and g.predicted_angular_update.isna().all()
            assert (g[g.step > 0].shrink_median > 0).all()  # Adam + L2: its per-weight shrink instead
        assert 0 < run.mechanics_overhead < 1  # a share of the wall time: a tiny run's, under load, can pass 0.5
    written = export(storage, "tiny", tmp_path / "exported")
    csv = pd.read_csv(tmp_path / "exported" / "diagnostics.csv")
    assert tmp_path / "exported" / "diagnostics.csv" in written and len(csv) == len(diag)
    assert "tau_epoch" in pd.read_csv(tmp_path / "exported" / "trials.csv")



@pytest.mark.integration
def test_report_says_what_the_optimum_means(resumed):
    from wdstudy.report import SECTIONS, build_report
    from wdstudy.report.meaning import band_of

    tmp_path, url, _ = resumed
    storage = open_storage(url)
    paths = build_report(storage, "tiny", tmp_path / "report", "test")
    evals = evaluations_frame(storage, "tiny")
    meaning = pd.read_csv(tmp_path / "report" / "tables" / "meaning.csv")
    assert set(meaning.regularizer) == {"l2", "decoupled"}
    for r in meaning.itertuples():
        runs = evals[(evals.cell == r.cell) & (evals.state == "COMPLETE")]
        assert r.seeds == len(runs) == 2
        if r.regularizer == "decoupled":  # τ in epochs by hand from the pick's (η, λ) and the run's steps
            by_hand = (1 / (runs.lr * runs.weight_decay * runs.steps / runs.epochs)).mean()
            assert r.tau_epoch == pytest.approx(by_hand, rel=1e-9)
            assert r.band == band_of(r.tau_epoch, 3.0) and r.equilibrium_ratio > 0
        else:
            assert pd.isna(r.tau_epoch) and pd.isna(r.equilibrium_ratio) and 0 < r.l2_shrink_p10 < r.l2_shrink_p90
    assert (tmp_path / "report" / "tables" / "diagnostics.csv").exists()
    assert {p.name for p in paths.figures} >= {"angular.png", "norms.png"}
    html = paths.html.read_text()
    assert "11. What the optimum means" in html and ("11. What the optimum means" in dict(SECTIONS).values())
    dec = meaning[meaning.regularizer == "decoupled"].iloc[0]
    assert f"τ = {dec.tau_epoch:.3g} epochs" in html  # the sentence is computed from the numbers
    assert f"λ = {dec.weight_decay / 2:.2g} at 2×" in html and "not a measurement" in html
