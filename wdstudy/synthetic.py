"""Synthetic studies: fill a storage with plausible trials without training anything.

Used by the report benchmark (a study of 1,000 trials in seconds), by tests that need
a storage in a given state (failed or running cells, hostile names) and by the example of
:func:`wdstudy.load_results`. Imports no torch. The landscape is a
smooth bowl in (log10 η, log10 λ): coupled (a diagonal valley, λ* ∝ 1/η) for L2 and
separable for decoupled decay, plus noise. Nothing here is presented as a measurement.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.trial import TrialState, create_trial

from wdstudy import records as R
from wdstudy.cells import cell_record, distributions, ensure_studies
from wdstudy.records import package_versions
from wdstudy.spec import Cell, StudySpec


def synthetic_value(reg: str, log_lr: float, log_wd: float, rng: np.random.Generator) -> float:
    if reg == "l2":  # best λ moves with η: valley along log_wd = -log_lr - 6
        d = (log_lr + 2.5) ** 2 * 0.08 + (log_wd + log_lr + 6.0) ** 2 * 0.05
    elif reg == "decoupled":  # separable basin
        d = (log_lr + 2.5) ** 2 * 0.08 + (log_wd + 1.0) ** 2 * 0.05
    else:
        d = (log_lr + 2.5) ** 2 * 0.08 + 0.02
    return float(np.clip(0.05 + d + rng.normal(0, 0.01), 0.01, 0.9))


def _history(epochs: int, final_val: float, rng) -> list[dict]:
    rows = []
    for e in range(epochs):
        f = math.exp(-3 * (e + 1) / epochs)
        rows.append({"epoch": e, "lr": 1e-3, "val_loss": 2.3 * f + final_val, "val_error": min(0.9, final_val + 0.8 * f),
                     "train_loss_running": 2.3 * f + final_val * 0.5, "train_error_running": min(0.9, final_val * 0.5 + 0.8 * f),
                     "weight_norm": 10 + 5 * (1 - f) + rng.normal(0, 0.1), "penalty": None})
    return rows


def _metrics(value: float, seed: int, with_test: bool, rng) -> dict:
    train = max(0.0, value - 0.03 + rng.normal(0, 0.005))
    m = {"train_loss": train * 2, "train_error": train, "val_loss": value * 2, "val_error": value,
         "val_gap_loss": (value - train) * 2, "val_gap_error": value - train, "weight_norm": 12.0,
         "penalty": None, "epochs": 10, "steps": 290, "wall_time_s": 1.0, "device": "cpu", "seed": seed}
    if with_test:
        test = value + rng.normal(0, 0.01)
        m.update(test_loss=test * 2, test_error=test, gap_loss=(test - train) * 2, gap_error=test - train)
    return m


def _timescale(cell: Cell, params: dict, epochs: int) -> dict:
    """The run's timescale scalars as :class:`wdstudy.mechanics.Mechanics` records them: steps per
    epoch (the task's, else 29), the run's epochs, and τ_iter, τ_epoch for a decoupled-decay arm."""
    from wdstudy.arms import WEIGHT_DECAYS

    spe = cell.task.steps_per_epoch or 29
    wd = R.decay_of(params, spe)
    out = {"steps_per_epoch": spe, "run_epochs": float(epochs), "tau_iter": None, "tau_epoch": None}
    if cell.regularizer in WEIGHT_DECAYS and wd > 0:
        tau = 1.0 / wd if cell.regularizer == "independent" else 1.0 / (params["lr"] * wd)
        out.update(tau_iter=tau, tau_epoch=tau / spe)
    return out


def fill(spec: StudySpec, storage, *, trials: int | None = None, seeds: int | None = None, epochs: int = 10,
         seed: int = 0, skip_eval: tuple[str, ...] = ()) -> None:
    """Create every cell of ``spec`` with ``trials`` complete trials and ``seeds`` evaluation runs."""
    rng = np.random.default_rng(seed)
    ensure_studies(spec, storage, spec_yaml=f"name: {spec.name}\n# synthetic\n")
    for cell in spec.cells():
        add_trials(spec, cell, storage, trials or spec.budget(cell.regularizer), epochs, rng)
        if cell.regularizer in skip_eval:
            continue
        add_evaluation(spec, cell, storage, seeds or spec.evaluation.seeds, epochs, rng)


def add_trials(spec: StudySpec, cell: Cell, storage, n: int, epochs: int, rng, state=TrialState.COMPLETE) -> None:
    study = optuna.load_study(study_name=cell.name, storage=storage)
    dists = distributions(spec, cell)
    batch = []
    first = len(study.get_trials(deepcopy=False))
    for i in range(first, first + n):
        params = {k: float(10 ** rng.uniform(math.log10(d.low), math.log10(d.high))) for k, d in dists.items()}
        value = synthetic_value(cell.regularizer, math.log10(params["lr"]),
                                math.log10(R.decay_of(params, cell.task.steps_per_epoch) or 1e-8), rng)
        attrs = {**_metrics(value, spec.search.seed, False, rng), **_timescale(cell, params, epochs),
                 "history": _history(epochs, value, rng),
                 "outcome": "complete", "worker": "synthetic:0",
                 R.GENERATION: i // spec.search.batch, R.SLOT: i % spec.search.batch}
        batch.append(create_trial(state=state, params=params, distributions=dists,
                                  value=value if state == TrialState.COMPLETE else None,
                                  user_attrs=attrs,
                                  intermediate_values={e: value + 0.5 * math.exp(-e) for e in range(epochs)}))
    study.add_trials(batch)


def add_evaluation(spec: StudySpec, cell: Cell, storage, seeds: int, epochs: int, rng) -> None:
    search = optuna.load_study(study_name=cell.name, storage=storage)
    best = search.best_trial
    ev = optuna.create_study(study_name=cell.eval_name, storage=storage, direction="minimize", load_if_exists=True)
    ev.set_user_attr(R.BEST_TRIAL, best.number)
    ev.set_user_attr(R.BEST_VALUE, best.value)
    ev.set_user_attr(R.BEST_PARAMS, best.params)
    dists = distributions(spec, cell)
    for s in cell_record(spec, cell).eval_seeds[:seeds]:
        m = _metrics(best.value, s, True, rng)
        ev.add_trial(create_trial(state=TrialState.COMPLETE, params=best.params, distributions=dists,
                                  value=m["test_error"],
                                  user_attrs={**m, "history": _history(epochs, best.value, rng), "seed": s,
                                              "outcome": "complete", "worker": "synthetic:0"}))


__all__ = ["fill", "add_trials", "add_evaluation", "package_versions"]
