"""Latency of reserving a unit of work on PostgreSQL, with 24 cells × 500 finished trials.

A worker reserves every unit under the study lock, so this latency bounds how many workers
a study can feed. The storage holds a study of 24 cells (4 tasks × 2 optimizers × 3
regularizers), each with 500 finished search trials (125 generations of 4) and a budget
of 560, as a long study has late in its life. One worker then reserves units the way
``wdstudy worker`` does (lock, ``Cells.reserve``, unlock); each reserved trial is told
COMPLETE at once, outside the timing, so later reservations open new generations too.

Baseline of the same run: Optuna's own ``study.ask()`` of a trial queued in one cell of the
same database (what a reservation costs at least).

    python benchmarks/reservation.py [--url postgresql://postgres@127.0.0.1:5432/test] [--units 60]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np
import optuna

from wdstudy.cells import Cells, distributions, ensure_studies
from wdstudy.config import validate
from wdstudy.spec import StudySpec
from wdstudy.storage import StudyLock, open_storage
from wdstudy.synthetic import add_trials


def make_spec(name: str, budget: int) -> StudySpec:
    return validate(StudySpec, {
        "name": name,
        "tasks": ["mlp-mnist1d", "cnn-mnist1d", "gru-mnist1d", "lstm-mnist1d"],
        "optimizers": ["adam", "sgd"],
        "regularizers": ["none", "l2", "decoupled"],
        "search": {"lr": {"low": 1e-4, "high": 1e-1}, "weight_decay": {"low": 1e-6, "high": 1.0},
                   "sampler": "random", "trials": budget, "batch": 4},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--trials", type=int, default=500, help="finished trials per cell")
    ap.add_argument("--units", type=int, default=60, help="reservations to time")
    args = ap.parse_args()

    name = f"bench-{uuid.uuid4().hex[:8]}"
    spec = make_spec(name, args.trials + 60)
    storage = open_storage(args.url)
    t0 = time.perf_counter()
    ensure_studies(spec, storage)
    rng = np.random.default_rng(0)
    for cell in spec.cells():
        add_trials(spec, cell, storage, args.trials, 5, rng)
    print(f"filled {len(spec.cells())} cells × {args.trials} trials in {time.perf_counter() - t0:.0f} s")
    try:
        worker_storage = open_storage(args.url)  # a worker's own connection and trial cache
        cells = Cells(spec, worker_storage)
        lock = StudyLock(args.url, spec.name)
        t0 = time.perf_counter()
        with lock:
            unit, _ = cells.reserve()
        first = time.perf_counter() - t0  # a fresh worker's first look (loads every cell once)
        unit.study.tell(unit.trial, 0.5)
        times = []
        for _ in range(args.units):
            t0 = time.perf_counter()
            with lock:
                unit, _ = cells.reserve()
            times.append(time.perf_counter() - t0)
            unit.study.tell(unit.trial, 0.5)

        # baseline: Optuna's ask() of a queued trial, same database, one cell
        cell = spec.cells()[0]
        study = optuna.load_study(study_name=cell.name, storage=worker_storage)
        base = []
        for _ in range(args.units):
            study.enqueue_trial({"lr": 1e-3})
            t0 = time.perf_counter()
            trial = study.ask(distributions(spec, cell))
            base.append(time.perf_counter() - t0)
            study.tell(trial, 0.5)
    finally:
        for s in storage.get_all_studies():
            if s.study_name.startswith(f"{name}/"):
                optuna.delete_study(study_name=s.study_name, storage=storage)

    med, p90 = statistics.median(times), float(np.percentile(times, 90))
    bmed = statistics.median(base)
    print(f"first look of a fresh worker: {first:.2f} s")
    print(f"reservation: median {med * 1000:.0f} ms, 90th percentile {p90 * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
          f"over {len(times)} units (target: median <= 100 ms)")
    print(f"baseline Optuna ask(): median {bmed * 1000:.0f} ms; ratio {med / bmed:.1f}x")


if __name__ == "__main__":
    main()
