"""Growing a stored study through the real engine (cells, worker, storage), training injected.

Raising ``search.trials``, ``selection.seeds`` or ``evaluation.seeds`` resumes the study: the
search continues its generations, a race whose candidates changed is redone (its old runs kept
under ``…/superseded-K``), new evaluation seeds are run; any other change is refused.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from wdstudy import records as R
from wdstudy.cells import ensure_studies
from wdstudy.errors import WdstudyError
from wdstudy.spec import StudySpec

from .test_rounds import SPEC, run_study

BASE = {**SPEC, "search": {**SPEC["search"], "trials": 2}, "evaluation": {"seeds": 3}}


def spec(trials=2, race_seeds=2, eval_seeds=3, **over) -> StudySpec:
    data = {**BASE, "search": {**BASE["search"], "trials": trials},
            "selection": {"top_k": 3, "seeds": race_seeds}, "evaluation": {"seeds": eval_seeds}, **over}
    return StudySpec.model_validate(data)


def complete(storage, name: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in optuna.load_study(study_name=name, storage=storage).get_trials()
            if t.state == TrialState.COMPLETE]


def names(storage) -> set[str]:
    return {s.study_name for s in storage.get_all_studies()}


def test_a_study_grown_from_2_to_4_trials_per_cell_completes_with_4_and_redoes_a_changed_race():
    small, big = spec(trials=2), spec(trials=4)
    storage, _ = run_study(small, 1)
    before = {c.name: [t.number for t in complete(storage, c.race_name)] for c in small.cells()}
    assert all(len(complete(storage, c.name)) == 2 for c in small.cells())

    assert ensure_studies(big, storage) == [c.name for c in big.cells()]
    run_study(big, 1, storage=storage)
    for c in big.cells():
        search = complete(storage, c.name)
        assert len(search) == 4
        assert optuna.load_study(study_name=c.name, storage=storage).user_attrs[R.CELL]["budget"] == 4
        race = optuna.load_study(study_name=c.race_name, storage=storage)
        top = sorted(search, key=lambda t: (t.value, t.number))[:3]
        assert [x["trial"] for x in race.user_attrs[R.CANDIDATES]] == [t.number for t in top]
        # 4 trials give 3 candidates where 2 gave 2: the race and the evaluation were redone
        assert {f"{c.race_name}/superseded-1", f"{c.eval_name}/superseded-1"} <= names(storage)
        kept = complete(storage, f"{c.race_name}/superseded-1")
        assert [t.number for t in kept] == before[c.name]  # the old runs, kept as they were
        assert len(complete(storage, c.race_name)) == 3 * 2  # every candidate on every race seed, once
        ev = optuna.load_study(study_name=c.eval_name, storage=storage)
        picks = {t.user_attrs.get(R.CANDIDATE, ev.user_attrs[R.PICK]) for t in complete(storage, c.eval_name)}
        assert set(ev.user_attrs[R.SURVIVORS]) == picks


def test_more_evaluation_and_race_seeds_run_only_what_is_missing():
    storage, _ = run_study(spec(), 1)
    runs = {c.eval_name: len(complete(storage, c.eval_name)) for c in spec().cells()}
    grown = spec(eval_seeds=5)
    ensure_studies(grown, storage)
    run_study(grown, 1, storage=storage)
    for c in grown.cells():
        ev = optuna.load_study(study_name=c.eval_name, storage=storage)
        seeds = {t.user_attrs[R.SEED] for t in complete(storage, c.eval_name)}
        assert seeds == set(grown.evaluation.seed_list())
        per_seed = len(ev.user_attrs[R.SURVIVORS])
        assert len(complete(storage, c.eval_name)) == 5 * per_seed
        if f"{c.eval_name}/superseded-1" not in names(storage):
            assert runs[c.eval_name] == 3 * per_seed  # only the two new seeds ran

    more_race = spec(eval_seeds=5, race_seeds=4)
    ensure_studies(more_race, storage)
    run_study(more_race, 1, storage=storage)
    for c in more_race.cells():
        race = complete(storage, c.race_name)
        assert {t.user_attrs[R.SEED] for t in race} == set(more_race.selection.seed_list())
        cands = optuna.load_study(study_name=c.race_name, storage=storage).user_attrs[R.CANDIDATES]
        assert len(race) == len(cands) * 4  # the two new seeds added to each candidate's two


@pytest.mark.parametrize("change, field", [
    ({"trials": 1}, "budget"),
    ({"eval_seeds": 2}, "eval_seeds"),
    ({"tasks": [{"name": "mlp-mnist1d", "epochs": 2}]}, "task"),
])
def test_any_other_change_is_refused_naming_what_differs(change, field):
    storage = optuna.storages.InMemoryStorage()
    ensure_studies(spec(), storage)
    with pytest.raises(WdstudyError, match=rf"the spec changed since this study started \({field}"):
        ensure_studies(spec(**change), storage)


def test_status_says_when_the_spec_on_disk_differs_from_the_stored_study(tmp_path, capsys, monkeypatch):
    import yaml

    from wdstudy.cli import main
    from wdstudy.storage import open_storage

    monkeypatch.delenv("WDSTUDY_STORAGE", raising=False)
    path = tmp_path / "s.yaml"
    data = {**BASE, "output": str(tmp_path / "out")}
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "out").mkdir()
    ensure_studies(StudySpec.model_validate(data), open_storage(str(tmp_path / "out" / "optuna.journal")))
    assert main(["status", str(path)]) == 0
    assert "differs" not in capsys.readouterr().out

    path.write_text(yaml.safe_dump({**data, "search": {**data["search"], "trials": 4}}))
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "the spec on disk differs from the stored study 'rounds' (budget differs)" in out
    assert "showing the stored study; `launch` grows the study to it" in out

    path.write_text(yaml.safe_dump({**data, "tasks": [{"name": "mlp-mnist1d", "epochs": 3}]}))
    assert main(["status", str(path)]) == 0
    assert "(task differs): showing the stored study; `launch` would refuse it" in capsys.readouterr().out
