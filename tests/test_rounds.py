"""Evaluation in rounds through the real engine (cells, worker, storage), training injected.

A round opens only when every primary cell of the task finished the previous one, so the
seeds run and the decisions reached do not depend on the number of workers or the order in
which runs finish; a resumed study runs each (cell, candidate, seed) once; ``max`` holds.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter

import optuna
import pytest

from wdstudy import records as R
from wdstudy.cells import ensure_studies
from wdstudy.simulate import Landscape, SyntheticRuns
from wdstudy.spec import StudySpec
from wdstudy.verdicts import arm_runs, group_verdicts
from wdstudy.worker import Worker

SPEC = {
    "name": "rounds", "tasks": [{"name": "mlp-mnist1d", "epochs": 1}], "optimizers": ["adam"],
    "regularizers": ["l2", "decoupled"],
    "search": {"lr": {"low": 1e-4, "high": 1.0}, "sampler": "random", "trials": 4, "batch": 2,
               "weight_decay": {"l2": {"low": 1e-8, "high": 1e-1}, "decoupled": {"low": 1e-9, "high": 1e-2}}},
    "selection": {"top_k": 3, "seeds": 2},
    "evaluation": {"seeds": {"min": 3, "max": 12, "step": 3}},
    "decision": {"margin": 1.0},
}
#: a flat optimum (survivors alike) and a seed spread that 3 seeds cannot settle at ±1 pt
NOISY = {"mlp-mnist1d": Landscape(0.30, 0.0005, 0.008, 0.003, 0.004, (0.6, 0.5))}


def spec(**over) -> StudySpec:
    return StudySpec.model_validate({**SPEC, **over})


def run_study(s: StudySpec, workers: int, *, effect: float = 0.0, land=NOISY, storage=None, max_units=None):
    storage = storage or optuna.storages.InMemoryStorage()
    ensure_studies(s, storage)
    fake = SyntheticRuns(s, land, effect, 0, "decoupled")
    lock = threading.Lock()

    def jittered(*args, **kwargs):  # runs finish in another order on every call
        time.sleep(random.uniform(0, 0.003))
        return fake(*args, **kwargs)

    ws = [Worker(s, "memory", storage=storage, lock=lock, lease=lambda st, t: contextlib.nullcontext(),
                 train=jittered, log=lambda m: None, poll=0.01) for _ in range(workers)]
    if workers == 1:
        ws[0].run(max_units)
    else:
        threads = [threading.Thread(target=w.run) for w in ws]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return storage, ws[0]


def eval_runs(storage, s: StudySpec) -> Counter:
    out: Counter = Counter()
    for c in s.cells():
        ev = optuna.load_study(study_name=c.eval_name, storage=storage)
        for t in ev.get_trials():
            if t.state == optuna.trial.TrialState.COMPLETE:
                out[(c.regularizer, t.user_attrs.get(R.CANDIDATE), t.user_attrs[R.SEED])] += 1
    return out


def decision(storage, s: StudySpec) -> tuple[str, int]:
    arms, n_open = {}, None
    for c in s.cells():
        ev = optuna.load_study(study_name=c.eval_name, storage=storage)
        race = optuna.load_study(study_name=c.race_name, storage=storage)
        arms[c.regularizer] = arm_runs(s.selection.seed_list(), race.get_trials(), ev.user_attrs, ev.get_trials())
        n_open = ev.user_attrs[R.SEEDS_OPEN]
    pairs = s.primary_pairs()
    v = group_verdicts(arms, pairs, pairs, margin=0.01, alpha=0.05, looks=s.evaluation.looks(), n_open=n_open)
    return v[0].decision.code, n_open


def test_rounds_go_on_until_decided_and_one_or_two_workers_agree():
    s = spec()
    one, _ = run_study(s, 1)
    runs_one = eval_runs(one, s)
    assert max(runs_one.values()) == 1  # each (arm, candidate, seed) once
    code, n = decision(one, s)
    assert n > 3, "this landscape needs more than the first round"
    seeds = {k[2] for k in runs_one}
    assert seeds == set(s.evaluation.seed_list(n))  # exactly the opened rounds' seeds
    for _ in range(2):
        two, _ = run_study(s, 2)
        assert eval_runs(two, s) == runs_one
        assert decision(two, s) == (code, n)


def test_max_is_honoured_and_a_resumed_study_runs_each_seed_once(monkeypatch):
    import wdstudy.verdicts

    monkeypatch.setattr(wdstudy.verdicts, "settled", lambda verdicts: False)  # never decided: rounds to max
    s = spec()
    whole, _ = run_study(s, 1)
    runs = eval_runs(whole, s)
    assert decision(whole, s)[1] == 12
    assert {k[2] for k in runs} == set(s.evaluation.seed_list())  # all 12 seeds, not one beyond
    storage = optuna.storages.InMemoryStorage()
    run_study(s, 1, storage=storage, max_units=30)  # stopped part-way through the rounds
    assert 0 < sum(eval_runs(storage, s).values()) < sum(runs.values())
    run_study(s, 1, storage=storage)  # resumed
    assert eval_runs(storage, s) == runs
    assert decision(storage, s) == decision(whole, s)


def test_a_decided_task_stops_after_its_first_round():
    calm = {"mlp-mnist1d": Landscape(0.30, 0.01, 0.0005, 0.0005, 0.0005, (0.6, 0.5))}
    s = spec()
    storage, _ = run_study(s, 1, land=calm)
    code, n = decision(storage, s)
    assert n == 3 and code != "undecided"
