"""Stored studies keep loading: a journal written by wdstudy 0.1.0, read by the current code.

``tests/fixtures/journal-v0.1.0.log`` is the storage of ``tests/fixtures/study-v0.1.0.yaml``
(one task, the arms none, L2, decoupled searched over its shrink η·λ, and L1; a race; two
evaluation seeds), launched with wdstudy 0.1.0. Its ``summary`` and ``comparison`` tables, as
that release computed them, are ``journal-v0.1.0-summary.csv`` and ``-comparison.csv``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import wdstudy

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The 0.1.0 journal, copied (opening a journal may add a lock file next to it)."""
    path = tmp_path_factory.mktemp("stored") / "optuna.journal"
    shutil.copy(FIXTURES / "journal-v0.1.0.log", path)
    return wdstudy.load_results(path)


def test_stored_study_loads(stored):
    assert stored.study == "fixture"
    assert sorted(stored.trials.regularizer.unique()) == ["decoupled", "l1", "l2", "none"]
    assert len(stored.trials) == 8 and (stored.trials.state == "COMPLETE").all()
    assert len(stored.evaluations) == 8  # 4 cells x 2 seeds


def test_stored_tables_are_those_of_the_release_that_wrote_them(stored):
    assert stored.summary.to_csv(index=False) == (FIXTURES / "journal-v0.1.0-summary.csv").read_text()
    assert stored.comparison.to_csv(index=False) == (FIXTURES / "journal-v0.1.0-comparison.csv").read_text()


def test_stored_values(stored):
    s = stored.summary.set_index("regularizer")
    assert s.loc["decoupled", "decay_axis"] == "shrink"
    assert s.loc["decoupled", "best_val"] == pytest.approx(0.7725)
    assert s.loc["l2", "weight_decay"] == pytest.approx(0.0007257005721594283)
    assert s.loc["none", "test_error"] == pytest.approx(0.837)
    first = stored.comparison.iloc[0]
    assert (first.arm, first.reference, first.family) == ("decoupled", "l2", "primary")
    assert first.test_error_diff == pytest.approx(-0.016)


def test_cell_records_read_as_stored_and_older_records_still_decode(tmp_path):
    from wdstudy import records as R
    from wdstudy.cells import cell_record
    from wdstudy.spec import load_spec
    from wdstudy.storage import open_storage

    path = tmp_path / "optuna.journal"
    shutil.copy(FIXTURES / "journal-v0.1.0.log", path)
    stored = {s.study_name: s.user_attrs[R.CELL] for s in open_storage(str(path)).get_all_studies()
              if R.CELL in s.user_attrs}
    spec = load_spec(FIXTURES / "study-v0.1.0.yaml")
    for cell in spec.cells():
        record = R.CellRecord.from_dict(stored[cell.name])
        assert record == cell_record(spec, cell)  # the spec still defines the cells it defined
        assert record.to_dict() == stored[cell.name]  # and writes them as they were stored
    shrink = R.CellRecord.from_dict(stored["fixture/mlp-mnist1d/adam/decoupled"])
    assert shrink.searched_decay == ("shrink", (1e-5, 1e-1)) and shrink.task_name == "mlp-mnist1d"
    assert shrink.selection == R.Race(2, (2000,)) and shrink.looks == (2,) and shrink.budget == 2
    assert R.CellRecord.from_dict(stored["fixture/mlp-mnist1d/adam/none"]).searched_decay is None
    # a record from before generations, rounds and races: no batch, eval_rounds, selection, decay_axis
    old = {k: v for k, v in stored["fixture/mlp-mnist1d/adam/l2"].items() if k not in ("batch", "selection")}
    record = R.CellRecord.from_dict(old)
    assert record.batch is None and record.selection is None and record.race_seeds == ()
    assert record.searched_decay == ("lambda", (1e-6, 1e-2)) and record.to_dict() == {**old, "batch": None}


def test_the_penalty_stored_under_its_old_name_is_read(stored):
    """0.1.0 stored each run's penalty as ``l2_penalty`` (L2's or L1's; None for the decays)."""
    t = stored.trials.set_index(["regularizer", "trial"])
    assert "l2_penalty" not in stored.trials and "penalty" in stored.evaluations
    assert t.loc[("l1", 0), "penalty"] == pytest.approx(0.007621, rel=1e-3)
    assert t.loc[("l2", 0), "penalty"] == pytest.approx(0.005430, rel=1e-3)
    assert stored.trials.penalty.notna().tolist() == stored.trials.regularizer.isin(["l2", "l1"]).tolist()
    from wdstudy import records as R

    assert R.history_row({"epoch": 0, "l2_penalty": 0.5}) == {"epoch": 0, "penalty": 0.5}


def _read_back(run, key: str):
    """What ``run`` (a :class:`RunRecord`) reads of the stored user attribute ``key``."""
    from wdstudy import records as R

    current = {old: new for new, old in R.OLD_NAMES.items()}
    if key == R.HISTORY:
        return list(run.stored_history)
    if key in current:
        return run.metric(current[key])
    if key in R.METRIC_KEYS:
        return run.metric(key)
    return getattr(run, key)  # an AttributeError: a key the engine writes that the record does not read


def test_run_records_read_every_stored_trial_attribute(tmp_path):
    """Every user attribute of every trial of the 0.1.0 journal is read back by its run record as
    stored (the penalty, stored as ``l2_penalty``, under its current name); the studies' records
    read the studies' attributes."""
    from wdstudy import records as R
    from wdstudy.storage import open_storage, study_trials

    path = tmp_path / "optuna.journal"
    shutil.copy(FIXTURES / "journal-v0.1.0.log", path)
    storage = open_storage(str(path))
    kinds = set()
    for s in storage.get_all_studies():
        study = R.StudyRecord.of(s)
        for key, value in s.user_attrs.items():
            assert getattr(study, key) == (R.cell_of(s.user_attrs) if key == R.CELL else value), key
        for t in study_trials(storage, s):
            run = R.RunRecord.of(t)
            for key, value in t.user_attrs.items():
                assert _read_back(run, key) == value, (s.study_name, t.number, key)
            assert run.metric("penalty") == t.user_attrs["l2_penalty"]
            assert run.history == [R.history_row(row) for row in t.user_attrs.get(R.HISTORY, [])]
            kinds.add(s.study_name.rsplit("/", 1)[-1] if s.study_name.endswith(("race", "eval")) else "search")
    assert kinds == {"search", "race", "eval"}


def test_run_record_of_a_trial_round_trips_and_misses_are_none():
    import optuna

    from wdstudy import records as R

    attrs = {R.GENERATION: 2, R.SLOT: 1, R.VARIANT: 1, R.SEED: 7, R.CANDIDATE: 3, R.OUTCOME: "diverged",
             R.REASON: "val_loss is nan", R.WORKER: "host:1", R.CUDA_VISIBLE_DEVICES: "0", R.DEVICE: "cpu",
             R.TEST_OUTCOMES: R.encode_outcomes([0, 1, 1], is_rate=True), "val_error": 0.25, "penalty": 0.5,
             "tau_epoch": 4.0, R.MECHANICS: {"step": [0, 10], "weight_norm": [1.0, 0.9]},
             R.HISTORY: [{"epoch": 0, "val_error": 0.5, "penalty": 0.4}, {"epoch": 1, "l2_penalty": 0.3}]}
    trial = optuna.trial.create_trial(value=0.25, params={"lr": 0.1}, distributions={
        "lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}, user_attrs=attrs,
        system_attrs={R.FAIL_REASON: "lease expired", R.FAIL_KIND: R.LOST})
    run = R.RunRecord.of(trial)
    assert (run.generation, run.slot, run.variant, run.seed, run.candidate) == (2, 1, 1, 7, 3)
    assert (run.outcome, run.reason, run.worker, run.cuda_visible_devices, run.device) == (
        "diverged", "val_loss is nan", "host:1", "0", "cpu")
    assert R.decode_outcomes(run.test_outcomes).tolist() == [0.0, 1.0, 1.0]
    assert (run.metric("val_error"), run.metric("penalty"), run.metric("tau_epoch")) == (0.25, 0.5, 4.0)
    assert run.metric("seed") == 7 and run.metric("device") == "cpu"
    assert run.mechanics == attrs[R.MECHANICS] and run.slot_key == (2, 1, 1) and run.candidate_or(0) == 3
    assert run.history == [{"epoch": 0, "val_error": 0.5, "penalty": 0.4}, {"epoch": 1, "penalty": 0.3}]
    assert (run.fail_reason, run.fail_kind) == ("lease expired", R.LOST)
    assert R.RunRecord.from_attrs(trial.user_attrs) == R.RunRecord.from_attrs(dict(attrs))
    assert R.RunRecord.from_attrs(attrs) != R.RunRecord.from_attrs({**attrs, R.SEED: 8})
    with pytest.raises(AttributeError):
        run.seed = 8  # type: ignore[misc]

    # the stored penalty wins over its old name; a trial that stored neither has none
    assert R.RunRecord.from_attrs({"penalty": 0.1, "l2_penalty": 0.2}).metric("penalty") == 0.1
    assert R.RunRecord.from_attrs({"l2_penalty": 0.2}).metric("penalty") == 0.2

    empty = R.RunRecord.from_attrs({})
    assert all(getattr(empty, f) is None for f in ("generation", "slot", "variant", "seed", "candidate", "outcome",
                                                 "reason", "worker", "cuda_visible_devices", "device",
                                                 "test_outcomes", "mechanics", "fail_reason", "fail_kind"))
    assert all(empty.metric(k) is None for k in R.METRIC_KEYS) and empty.val_size is None
    assert empty.history == [] and empty.slot_key == (0, 0, 0) and empty.candidate_or(4) == 4


def test_study_record_reads_a_study_and_misses_are_none():
    from wdstudy import records as R

    ev = R.StudyRecord.from_attrs({R.BEST_PARAMS: {"lr": 0.1}, R.BEST_TRIAL: 3, R.BEST_VALUE: 0.2, R.PICK: 1,
                                   R.SURVIVORS: [1, 0], R.SEEDS_OPEN: 4, R.RACE_MEAN: 0.21})
    assert (ev.best_params, ev.best_trial, ev.best_value, ev.pick, ev.survivors, ev.race_mean) == (
        {"lr": 0.1}, 3, 0.2, 1, [1, 0], 0.21)
    assert ev.seeds_open_or(2) == 4 and ev.cell is None and ev.candidates is None and ev.decision is None
    empty = R.StudyRecord.from_attrs({})
    assert empty.seeds_open is None and empty.seeds_open_or(2) == 2 and empty.best_params is None
    assert empty == R.StudyRecord()
