"""What the textbooks claim about weight decay, measured: ``python -m wdstudy claims``.

A fixed set of small experiments (no search) through :func:`wdstudy.train.train_run`, each
answering one claim in one plain sentence with its measured numbers and a verdict —
*holds*, *does not hold*, *holds only when …*, or *cannot tell* (where the runs cannot decide).
Writes ``claims.csv``, ``report.html`` and ``report.pdf`` into the output folder (``reports/claims``
by default). ``--quick`` shrinks every experiment (fewer epochs, λ values and seeds) for tests; the verdict rules are the same.

Most runs train an MLP on MNIST-1D. Two claims read the mechanics every run records
(:mod:`wdstudy.mechanics`): the rotational equilibrium of each layer under AdamW and Adam + L2 (a CNN
with batch norm), and the best decoupled λ and its timescale τ_epoch at three training-set sizes.
The λ sweeps also train the two linear models the textbooks start from: logistic regression on
MNIST-1D (``logreg-mnist1d``) and linear regression on a rich, fixed feature expansion of noisy
samples of a smooth curve (``linreg-curve1d``, whose "error" is the mean squared error); the report
draws that regression's fitted curves for the smallest and the largest λ of each arm over its
training points.

The verdict of each row is recomputed from the row's own numbers by :func:`verdict`, so
``claims.csv`` can be checked without re-running anything.

The parts: :mod:`.setup` (the claim record, the full and quick setups), :mod:`.runs` (instruments,
one run, the λ sweeps and the mechanics claims' runs in process pools), :mod:`.experiments` (one
function per claim), :mod:`.rules` (one verdict rule per claim), :mod:`.figures` and :mod:`.report`
(the files written).
"""

from __future__ import annotations

import time
from pathlib import Path

from .experiments import (
    claim_adam_v,
    claim_equilibrium,
    claim_faster,
    claim_gap,
    claim_momentum_adam,
    claim_norm,
    claim_rule_098,
    claim_sgd,
    claim_timescale,
    claim_zeros,
)
from .report import write
from .rules import RULES, verdict
from .runs import GRID, mechanics_runs, sweeps
from .setup import CURVE_TASK, FULL, QUICK, SGD, TOL, Claim, Setup

__all__ = ["CURVE_TASK", "FULL", "GRID", "QUICK", "RULES", "SGD", "TOL", "Claim", "Setup", "run_claims", "sweeps",
           "verdict", "write"]


def run_claims(out_dir: Path, quick: bool = False, log=print) -> list[Claim]:
    """Run every claim's experiment (``quick``: the :data:`QUICK` setup), give each its verdict and write
    the report into ``out_dir``; ``log`` is told as each claim is measured."""
    setup = QUICK if quick else FULL
    data = setup.task().load_data(with_test=True)  # one MNIST-1D split for every run (the CNN's too)
    t0 = time.perf_counter()
    claims = []
    for fn in (claim_sgd, claim_momentum_adam, claim_rule_098):
        claims.append(fn(setup, data))
        log(f"[{time.perf_counter() - t0:5.1f} s] {claims[-1].key}")
    sw, curves = sweeps(setup, data)
    log(f"[{time.perf_counter() - t0:5.1f} s] λ sweeps")
    claims += [claim_norm(sw, setup), claim_gap(sw, setup, curves)]
    for fn in (claim_zeros, claim_faster, claim_adam_v):
        claims.append(fn(setup, data))
        log(f"[{time.perf_counter() - t0:5.1f} s] {claims[-1].key}")
    eq, ts = mechanics_runs(setup, data)
    claims += [claim_equilibrium(setup, eq), claim_timescale(setup, ts)]
    log(f"[{time.perf_counter() - t0:5.1f} s] rotational equilibrium and timescale runs")
    for c in claims:
        c.verdict = verdict(c.key, c.numbers)
    write(out_dir, claims, quick, time.perf_counter() - t0)
    return claims
