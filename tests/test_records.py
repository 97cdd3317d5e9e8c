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
