"""The decoupled arm searched over its timescale in epochs (``axis: timescale_epochs``):
τ_epoch = 1/(η·λ·steps per epoch), so the λ that trains is 1/(η·τ_epoch·steps per epoch)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from wdstudy import records as R
from wdstudy.cells import cell_record, ensure_studies, grows, spec_drift
from wdstudy.cli import main
from wdstudy.config import validate
from wdstudy.errors import WdstudyError
from wdstudy.proposals import distributions
from wdstudy.spec import StudySpec, load_spec
from wdstudy.storage import open_storage
from wdstudy.tasks import task_config

from .conftest import assert_exact, quiet_worker, write_spec

#: η in [1e-3, 1e-2], τ_epoch in [0.5, 50] epochs; L2's λ range as wide (2 decades)
RANGES = {"l2": {"low": 1e-5, "high": 1e-3}, "decoupled": {"low": 0.5, "high": 50.0, "axis": "timescale_epochs"}}


def spec_of(**over) -> dict:
    spec = {"name": "tau", "tasks": [{"name": "mlp-mnist1d", "max_train": 400}], "optimizers": ["adam"],
            "regularizers": ["l2", "decoupled"],
            "search": {"lr": {"low": 1e-3, "high": 1e-2}, "sampler": "random", "trials": 4,
                       "weight_decay": {k: dict(v) for k, v in RANGES.items()}}}
    spec.update(over)
    return spec


def test_the_axis_is_read_and_gives_the_lambda_range_by_hand():
    spec = validate(StudySpec, spec_of())
    rng = spec.weight_decay_range("decoupled")
    assert rng.axis == "timescale_epochs"
    task = spec.tasks[0]
    assert task.train_size == 400 and task.steps_per_epoch == 4  # ceil(400 / 128)
    cell = next(c for c in spec.cells() if c.regularizer == "decoupled")
    assert set(distributions(spec, cell)) == {"lr", "timescale_epochs"}
    record = cell_record(spec, cell)
    # λ = 1/(η·τ·S): the smallest with η = 1e-2, τ = 50, S = 4; the largest with η = 1e-3, τ = 0.5
    assert record.weight_decay_range == pytest.approx((1 / (1e-2 * 50 * 4), 1 / (1e-3 * 0.5 * 4)), rel=1e-12)
    assert record.steps_per_epoch == 4 and record.searched_decay == ("timescale_epochs", (0.5, 50.0))
    stored = record.to_dict()
    assert stored[R.DECAY_AXIS] == {"axis": "timescale_epochs", "range": [0.5, 50.0], "steps_per_epoch": 4}
    assert R.CellRecord.from_dict(stored) == record
    # the other axes' records stay as they were: no steps per epoch
    l2 = cell_record(spec, next(c for c in spec.cells() if c.regularizer == "l2")).to_dict()
    assert R.DECAY_AXIS not in l2


def test_lambda_from_tau_epoch_by_hand():
    params = {"lr": 2e-3, "timescale_epochs": 5.0}
    # λ = 1/(η·τ_epoch·S) = 1/(2e-3 · 5 · 29) = 1/0.29
    assert R.decay_of(params, 29) == pytest.approx(1 / 0.29, rel=1e-12)
    assert R.axis_value("timescale_epochs", 2e-3, 1 / 0.29, 29) == pytest.approx(5.0, rel=1e-12)
    assert R.axis_value("timescale", 2e-3, 1 / 0.29) == pytest.approx(5.0 * 29, rel=1e-12)  # the same in steps
    with pytest.raises(ValueError, match="steps per epoch"):
        R.decay_of(params)  # without the cell's steps per epoch there is no λ


@pytest.mark.parametrize("task,train,steps", [
    ({"name": "mlp-mnist1d"}, 3600, 29),  # 4000 less 400 for validation; 3600/128 = 28.1
    ({"name": "mlp-mnist1d", "max_train": 256}, 256, 2),  # exactly two batches: no extra step
    ({"name": "mlp-mnist1d", "max_train": 10_000, "batch_size": 1000}, 3600, 4),
    ({"name": "mlp-mnist1d", "val_fraction": 0.25, "batch_size": 64}, 3000, 47),
    ({"name": "linreg-curve1d"}, 50, 5),  # half of 100 points validate, batches of 10
    ({"name": "mlp-mnist", "data_dir": "/data"}, 54000, 422),
    ({"name": "cnn-cifar10", "data_dir": "/data", "batch_size": 100}, 45000, 450),
])
def test_steps_per_epoch_follow_from_the_task(task, train, steps):
    t = task_config(**task)
    assert (t.train_size, t.steps_per_epoch) == (train, steps)
    if t.dataset in ("mnist1d", "curve1d"):  # the embedded data really splits so
        assert len(t.load_data().train) == train


@pytest.mark.integration
@pytest.mark.parametrize("task", [
    {"name": "mlp-mnist1d", "width": 8, "max_train": 256, "batch_size": 128},  # two full batches
    {"name": "mlp-mnist1d", "width": 8, "max_train": 300, "batch_size": 64},  # the fifth batch holds 44
    {"name": "linreg-curve1d", "batch_size": 7},  # 50 points: seven batches of 7 and one of 1
])
def test_the_steps_per_epoch_known_before_training_are_the_ones_a_run_measures(task):
    from wdstudy.train import optimizer_config, train_run

    t = task_config(**task, epochs=2)
    run = train_run(t, optimizer_config("adam"), "decoupled", 1e-2, 0.1, seed=0, schedule="constant",
                    accelerator="cpu")
    assert run.metrics["steps_per_epoch"] == t.steps_per_epoch and run.metrics["steps"] == 2 * t.steps_per_epoch
    # τ_epoch at the peak learning rate, as the run measured it, is 1/(η·λ·S) with the S known before it
    assert math.isclose(run.metrics["tau_epoch"], 1 / (1e-2 * 0.1 * t.steps_per_epoch), rel_tol=1e-12)


def test_the_axis_is_refused_for_other_arms_and_for_factory_tasks(tmp_path, capsys):
    bad = spec_of()
    bad["search"]["weight_decay"]["l2"]["axis"] = "timescale_epochs"
    with pytest.raises(WdstudyError, match=r"^a\.yaml: search\.weight_decay\.l2\.axis: 'timescale_epochs' applies "
                                           r"to the decoupled arm only"):
        validate(StudySpec, bad, "a.yaml")
    user = spec_of(tasks=["mlp-mnist1d", {"name": "my-net", "factory": "mypkg.tasks:build"}])
    with pytest.raises(WdstudyError) as err:
        validate(StudySpec, user, "b.yaml")
    assert str(err.value) == ("b.yaml: search.weight_decay.decoupled.axis='timescale_epochs': task 'my-net' (tasks.1) "
                              "is a factory task, whose steps per epoch are not known before it trains; search it over "
                              "axis: timescale (1/(η·λ) in steps) instead")
    # from the command line: one line naming the file, the key and the value; exit code 2
    path = write_spec(tmp_path, tasks=[{"name": "my-net", "factory": "mypkg.tasks:build"}], regularizers=["decoupled"],
                      search={"weight_decay": {"low": 1, "high": 10, "axis": "timescale_epochs"}})
    assert main(["status", str(path)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and f"{path}: search.weight_decay.axis='timescale_epochs': task 'my-net'" in lines[0]
    # the timescale in steps needs no steps per epoch: the same spec searched over it is fine
    user["search"]["weight_decay"]["decoupled"]["axis"] = "timescale"
    assert validate(StudySpec, user).weight_decay_range("decoupled").axis == "timescale"


def test_a_files_dataset_smaller_than_the_full_set_is_refused_rather_than_train_another_lambda(tmp_path):
    from wdstudy.preflight import check_data, check_train_size

    from .conftest import write_cifar10, write_mnist_like

    write_mnist_like(tmp_path, "MNIST", n_train=120)  # 120 examples: 108 train after 12 validate
    write_cifar10(tmp_path, per_batch=20)  # 100 examples: 90 train
    for name, train in (("mlp-mnist", 108), ("cnn-cifar10", 90)):
        spec = validate(StudySpec, spec_of(tasks=[{"name": name, "data_dir": str(tmp_path)}]))
        with pytest.raises(WdstudyError) as err:
            check_data(spec, "s.yaml")
        full = spec.tasks[0].train_size
        assert str(err.value).startswith(
            f"s.yaml: tasks.0.data_dir={str(tmp_path)!r}: its training split holds {train} examples, but axis: "
            f"timescale_epochs converts τ_epoch to λ with the {full} of the full ")
        assert f"set max_train to at most {train}" in str(err.value)
        # with max_train within what the files hold, the size is known again; over λ, the files' size is moot
        check_data(validate(StudySpec, spec_of(tasks=[{"name": name, "data_dir": str(tmp_path), "max_train": train}])))
        over_lambda = spec_of(tasks=[{"name": name, "data_dir": str(tmp_path)}])
        over_lambda["search"]["weight_decay"]["decoupled"] = {"low": 1e-2, "high": 1.0}
        check_data(validate(StudySpec, over_lambda))
    # a worker's run checks the split it loaded (files downloaded after the launch's check)
    task = task_config("mlp-mnist", data_dir="/data")
    check_train_size(task, 54000, "x")  # the full MNIST training set less its validation split
    with pytest.raises(WdstudyError, match=r"^x: its training split holds 108 examples, .* \(422 steps per epoch\)"):
        check_train_size(task, 108, "x")


def test_growth_and_drift_see_the_steps_per_epoch(tmp_path):
    spec = validate(StudySpec, spec_of())
    cell = next(c for c in spec.cells() if c.regularizer == "decoupled")
    stored = cell_record(spec, cell).to_dict()
    more = validate(StudySpec, spec_of(search={**spec_of()["search"], "trials": 8}))
    assert grows(stored, cell_record(more, cell).to_dict())  # more trials: the study grows
    # another batch size trains another λ for the same τ_epoch: a changed spec, never a growth
    other = validate(StudySpec, spec_of(tasks=[{"name": "mlp-mnist1d", "max_train": 400, "batch_size": 64}]))
    moved = cell_record(other, next(c for c in other.cells() if c.regularizer == "decoupled")).to_dict()
    assert moved[R.DECAY_AXIS]["steps_per_epoch"] == 7 and not grows(stored, moved)
    # the same range in steps is another axis: refused on resume, and status says what differs
    url = str(tmp_path / "j.journal")
    ensure_studies(spec, open_storage(url))
    steps = spec_of()
    steps["search"]["weight_decay"]["decoupled"]["axis"] = "timescale"
    drift = spec_drift(validate(StudySpec, steps), open_storage(url))
    assert drift is not None and "decay_axis, weight_decay_range differ" in drift and "would refuse" in drift
    with pytest.raises(WdstudyError, match="decay_axis, weight_decay_range differ"):
        ensure_studies(validate(StudySpec, steps), open_storage(url))


@pytest.mark.integration
def test_a_study_searched_over_tau_epoch_trains_the_lambda_it_stores(tmp_path):
    from wdstudy.analysis import diagnostics_frame, evaluations_frame, race_frame, trials_frame
    from wdstudy.report import compute_tables, load_report_data

    path = write_spec(tmp_path, search={"trials": 2, "weight_decay": {k: dict(v) for k, v in RANGES.items()}},
                      selection={"top_k": 2, "seeds": 1}, evaluation={"seeds": 2})
    spec = load_spec(path)
    url = str((tmp_path / "out" / "optuna.journal").resolve())
    ensure_studies(spec, open_storage(url))
    quiet_worker(spec, url).run()
    storage = open_storage(url)
    assert_exact(storage, "tiny", budget=2, seeds=2, cells=2)
    name = "tiny/mlp-mnist1d/adam/decoupled"
    record = R.cell_of(optuna.load_study(study_name=name, storage=storage).user_attrs)
    assert record.steps_per_epoch == 4  # 400 examples in batches of 128
    runs = 0
    for study in (name, f"{name}/race", f"{name}/eval"):
        for t in optuna.load_study(study_name=study, storage=storage).get_trials():
            tau, lr = t.params["timescale_epochs"], t.params["lr"]
            assert 0.5 <= tau <= 50 and set(t.params) == {"lr", "timescale_epochs"}
            lam = record.decay_of(t.params)
            assert math.isclose(lam * lr * record.steps_per_epoch * tau, 1.0, rel_tol=1e-12)
            # what the run measured: its own steps per epoch, and τ_epoch at its peak learning rate (its η)
            assert t.user_attrs["steps_per_epoch"] == record.steps_per_epoch
            assert math.isclose(t.user_attrs["tau_epoch"], tau, rel_tol=1e-12)
            runs += 1
    survivors = optuna.load_study(study_name=f"{name}/eval", storage=storage).user_attrs[R.SURVIVORS]
    # the search, the race of both candidates on one seed, two evaluation seeds of each race survivor
    assert len(survivors) >= 1 and runs == 2 + 2 + 2 * len(survivors)
    frames = [trials_frame(storage, "tiny"), evaluations_frame(storage, "tiny", survivors=True)]
    race = race_frame(storage, "tiny")
    for df in (*frames, race.assign(tau_epoch=None)):
        mine = df[df.cell == name]
        assert len(mine) and mine.weight_decay.notna().all()
        if "steps_per_epoch" in mine:  # the stored λ column, against the run's measurement
            assert ((mine.weight_decay * mine.lr * mine.steps_per_epoch * mine.tau_epoch - 1).abs() < 1e-12).all()
    searched = {t.number: t.params for t in optuna.load_study(study_name=name, storage=storage).get_trials()}
    for r in race[race.cell == name].itertuples():
        assert math.isclose(r.weight_decay, R.decay_of(searched[r.trial], 4), rel_tol=1e-15)
    diag = diagnostics_frame(storage, "tiny")
    mine = diag[(diag.cell == name) & (diag.step == 0)]  # its lr column is the checkpoint's: at step 0, η
    assert len(mine) and ((mine.weight_decay * mine.lr * mine.steps_per_epoch * mine.tau_epoch - 1).abs() < 1e-12).all()
    d = load_report_data(storage, "tiny", "test")
    compute_tables(d)
    row = d.summary[d.summary.cell == name].iloc[0]
    assert row.decay_axis == "timescale_epochs" and row.weight_decay_range == "τ_epoch 0.5–50"
    pick = frames[0][(frames[0].cell == name) & frames[0].chosen].iloc[0]
    assert row.weight_decay == pick.weight_decay and row.shrink == pytest.approx(pick.lr * pick.weight_decay)
    # the landscape's decoupled panel: the band the τ_epoch range covers, λ = 1/(η·τ·S) at its two ends
    from wdstudy.report.figures import fig_landscapes

    def dashed(axis: str) -> list:
        d.landscape_axis = axis
        figure = fig_landscapes(d)
        assert figure is not None
        panel = next(ax for ax in figure.fig.axes if ax.get_title().endswith("decoupled"))
        return [line.get_data() for line in panel.get_lines() if line.get_linestyle() == "--"]

    # over λ: the band of the τ_epoch range, λ = 1/(η·τ·S) at its two ends
    bands = dashed("lambda")
    assert len(bands) == 2
    for (lrs, lams), tau in zip(bands, (0.5, 50.0)):
        assert np.allclose(np.asarray(lams) * np.asarray(lrs) * 4 * tau, 1.0, rtol=0, atol=1e-12)
    # by default an arm searched over τ_epoch is drawn over τ_epoch: the range's ends are flat lines
    bands = dashed("auto")
    assert len(bands) == 2
    for (_, taus), tau in zip(bands, (0.5, 50.0)):
        assert np.allclose(np.asarray(taus), tau, rtol=1e-12)


def test_the_simulator_runs_and_fits_a_study_searched_over_tau_epoch():
    from pathlib import Path

    from wdstudy.analysis import trials_frame
    from wdstudy.simulate import QUICKSTART, fit_landscape, landscapes_from, one_study

    data = load_spec(Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml").model_dump(mode="json")
    data["search"]["weight_decay"]["decoupled"] = {"low": 1e-3, "high": 1e4, "axis": "timescale_epochs"}  # 7 decades
    spec = StudySpec.model_validate(data)
    storage = optuna.storages.InMemoryStorage()
    one_study(spec, landscapes_from(QUICKSTART), -0.05, 3, storage=storage)  # decoupled the better arm: its pick fits
    trials = trials_frame(storage, "sim3")
    steps = {t.name: t.steps_per_epoch for t in spec.tasks}
    dec = trials[(trials.regularizer == "decoupled") & (trials.state == "COMPLETE")]
    assert len(dec) == len(spec.tasks) * spec.search.trials
    fitted = fit_landscape(storage, "sim3")
    for task, f in fitted.items():
        mine = dec[dec.task == task]
        s = steps[task]
        tau = 1 / (mine.lr * mine.weight_decay * s)
        assert ((tau >= 1e-3 * (1 - 1e-12)) & (tau <= 1e4 * (1 + 1e-12))).all()  # λ as stored maps back into the range
        best = mine.loc[mine.value.idxmin()]
        # the landscape's optimum, on the searched axis: the best trial's place in the τ_epoch range
        by_hand = (math.log10(1 / (best.lr * best.weight_decay * s)) + 3) / 7
        assert f["optimum"][1] == round(by_hand, 3)
