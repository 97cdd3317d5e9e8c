"""From a storage's trials to decisions: the one place the engine (when evaluation stops) and
the report (what it states) turn runs into :mod:`wdstudy.decide`'s inputs.

No pandas, no torch: the engine calls it under the study lock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from . import decide as D
from . import records as R
from .storage import study_trials

#: the decision settings used where a storage predates them
DEFAULT_DECISION = {"margin": 1.0, "mse_margin": 0.01, "alpha": 0.05, "primary": [["decoupled", "l2"]]}


def arm_runs(race_seeds: Sequence[int], race_trials: Sequence[FrozenTrial] | None,
             ev_attrs: Mapping, ev_trials: Sequence[FrozenTrial]) -> D.ArmRuns | None:
    """One arm's runs from its race and evaluation studies (None before it has a pick); ``ev_attrs``
    are the evaluation study's user attributes."""
    ev = R.StudyRecord.from_attrs(ev_attrs)
    if ev.best_params is None:
        return None
    pick = int(ev.pick or 0)
    race: dict[int, list[float]] = {}
    for t in race_trials or ():
        r = R.RunRecord.of(t)
        c, s = r.candidate, r.seed
        if c is None or s not in race_seeds:
            continue
        row = race.setdefault(int(c), [math.nan] * len(race_seeds))
        if t.state == TrialState.COMPLETE and t.value is not None:
            row[race_seeds.index(s)] = float(t.value)
    evals: dict[int, dict[int, float]] = {}
    outcomes: dict[int, dict[int, np.ndarray]] = {}
    for t in ev_trials:
        if t.state != TrialState.COMPLETE or t.value is None:
            continue
        r = R.RunRecord.of(t)
        c = int(r.candidate_or(pick))
        assert r.seed is not None, "an evaluation run is queued with its seed"
        s = int(r.seed)
        evals.setdefault(c, {})[s] = float(t.value)
        text = r.test_outcomes
        if text:
            outcomes.setdefault(c, {})[s] = R.decode_outcomes(text)
    evals.setdefault(pick, {})
    return D.ArmRuns(pick, evals, race, outcomes)


@dataclass(frozen=True)
class Verdict:
    """One comparison's decision at one look."""

    arm: str
    reference: str
    family: str  # "primary" or "secondary"
    evidence: D.Evidence
    decision: D.Decision
    margin: float  # in the metric's unit (a fraction for an error rate)
    look: int  # index into the looks
    n_max: int


def look_index(looks: Sequence[int], n_open: int) -> int:
    """The look whose seed count is ``n_open`` (the last one below it if it is not a look)."""
    idx = [i for i, n in enumerate(looks) if n <= n_open]
    return idx[-1] if idx else 0


def _evidence(a: D.ArmRuns | Sequence[D.ArmRuns], b: D.ArmRuns | Sequence[D.ArmRuns]) -> D.Evidence:
    """A − B: from one pipeline per arm, or (a sequence per arm) from replicates paired by position."""
    if isinstance(a, D.ArmRuns) and isinstance(b, D.ArmRuns):
        return D.evidence(a, b)
    ra, rb = ([x] if isinstance(x, D.ArmRuns) else list(x) for x in (a, b))
    return D.replicate_evidence(list(zip(ra, rb)))


def group_verdicts(arms: Mapping[str, D.ArmRuns | Sequence[D.ArmRuns]], pairs: Sequence[tuple[str, str]],
                   primary: Sequence[tuple[str, str]], *, margin: float, alpha: float, looks: Sequence[int],
                   n_open: int) -> list[Verdict]:
    """Decisions for one task × optimizer: the primary pairs as one Holm family, the rest as another,
    at the level the α-spending gives the look ``n_open``. An arm given as a sequence holds its
    replicates' runs (the same order in every arm): its comparisons rest on the replicates' spread."""
    primary = [(p[0], p[1]) for p in primary]
    k = look_index(looks, n_open)
    level = D.look_alphas(alpha, list(looks))[k]
    out = []
    for family in ("primary", "secondary"):
        chosen = [(a, b) for a, b in pairs if a in arms and b in arms and ((a, b) in primary) == (family == "primary")]
        evs = [_evidence(arms[a], arms[b]) for a, b in chosen]
        # seeds_needed at this look's level: what the procedure itself would need, not a fixed-n test
        for (a, b), ev, dec in zip(chosen, evs, D.decide(evs, margin, level)):
            out.append(Verdict(a, b, family, ev, dec, margin, k, looks[-1]))
    return out


def settled(verdicts: Sequence[Verdict]) -> bool:
    """Whether evaluation can stop: every primary comparison ends in "better" or "equivalent", or a
    stronger decision than it has ("undecided", or only "no worse") would need more seeds than
    ``max`` even at its spread's point estimate. Stopping early never makes a wrong decision more
    likely; the α-spending makes going on safe."""
    for v in verdicts:
        if v.family != "primary" or v.decision.code in D.SETTLED:
            continue
        weak = v.decision.code if v.decision.code != D.UNDECIDED else None
        need = D.seeds_needed(v.evidence, v.margin, v.decision.level, confidence=0.5, stronger_than=weak)
        if not (need > v.n_max):
            return False
    return True


def study_arms(storage, study: str) -> dict[str, tuple[D.ArmRuns, int]]:
    """``{cell_name: (its runs, evaluation seeds opened)}`` for every evaluated cell of ``study``."""
    summaries = {s.study_name: s for s in storage.get_all_studies()}
    out = {}
    for name, s in summaries.items():
        ev = summaries.get(f"{name}/eval")
        if not name.startswith(f"{study}/") or ev is None:
            continue
        cell = R.StudyRecord.of(s).cell
        if cell is None:
            continue
        race = summaries.get(f"{name}/race")
        race_trials = study_trials(storage, race) if race is not None else None
        runs = arm_runs(list(cell.race_seeds), race_trials, ev.user_attrs,
                        study_trials(storage, ev))
        if runs is not None:
            out[name] = (runs, int(R.StudyRecord.of(ev).seeds_open_or(len(cell.eval_seeds))))
    return out


def decision_settings(storage, study: str) -> dict:
    """The decision settings stored with the study's cells (defaults for a storage that predates them)."""
    for s in storage.get_all_studies():
        decision = R.StudyRecord.of(s).decision if s.study_name.startswith(f"{study}/") else None
        if decision is not None:
            return decision
    return dict(DEFAULT_DECISION)
