"""The design simulator: a spec's whole procedure, on a landscape whose truth is known.

``python -m wdstudy simulate SPEC --effect 0 1 2 --studies 200`` runs the spec's search
(its sampler, budget and generations), race, evaluation rounds and decisions — the same
:class:`~wdstudy.worker.Worker` and :class:`~wdstudy.cells.Cells` a launch runs — in memory,
with the training run replaced by a draw from a synthetic landscape. No training, no torch.

**The landscape** (one per task, both arms alike in their own searched coordinates, so at true
effect 0 the arms are identical): in decades from the optimum (placed at the same fractions of
each axis's searched range), the error is ``base + curvature · (Δlog10 η² + Δlog10 λ²)``; each
run adds a seed effect shared by the arms on that seed (``shared_sd``: the same seed, the same
initialisation and data order) and one of its own (``seed_sd``); a validation measurement adds
the noise of a finite validation split (``val_sd``). The true effect (points, or MSE) is added
to the first arm of the primary comparison. ``--from STORAGE`` fits these numbers from a
finished study (:func:`fit_landscape`); ``--landscape FILE`` reads them; the default is the
quickstart's fit, :data:`QUICKSTART`.

Per true effect it prints how often each decision came out, the mean seeds spent and the runs
per study, and the share of wrong "better" decisions next to α with its Monte-Carlo standard
error. It also applies the procedure this replaced (the seed-paired t-test on the one pick, at
the first round's seeds) to the same simulated studies, to show what it would have decided.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import decide as D
from . import records as R
from .errors import WdstudyError

#: Fitted from the quickstart's storage (``simulate --from reports/quickstart/optuna.journal
#: --save-landscape``): errors as fractions; ``optimum`` as fractions of the searched log-ranges.
QUICKSTART = {
    "mlp-mnist1d": {"base": 0.345, "curvature": 0.010, "seed_sd": 0.0055, "shared_sd": 0.004, "val_sd": 0.010,
                    "optimum": [0.70, 0.60]},
    "cnn-mnist1d": {"base": 0.135, "curvature": 0.015, "seed_sd": 0.020, "shared_sd": 0.005, "val_sd": 0.012,
                    "optimum": [0.70, 0.60]},
    "gru-mnist1d": {"base": 0.290, "curvature": 0.012, "seed_sd": 0.009, "shared_sd": 0.005, "val_sd": 0.012,
                    "optimum": [0.65, 0.55]},
}


@dataclass(frozen=True)
class Landscape:
    base: float
    curvature: float
    seed_sd: float
    shared_sd: float
    val_sd: float
    optimum: tuple[float, float]


def _unit(*key) -> float:
    """A standard normal draw fixed by ``key`` (so a (study, arm, configuration, seed) always draws the same)."""
    h = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return float(np.random.default_rng(int.from_bytes(h, "little")).standard_normal())


class SyntheticRuns:
    """The injected training function: a run's metrics drawn from the landscape."""

    def __init__(self, spec, landscapes: dict[str, Landscape], effect: float, study: int, first_arm: str):
        self.spec, self.land, self.effect, self.study, self.first_arm = spec, landscapes, effect, study, first_arm

    def __call__(self, cell, lr, wd, seed, callbacks, with_test=False):
        land = self.land[cell.task.name]
        spec = self.spec
        lo, hi = math.log10(spec.search.lr.low), math.log10(spec.search.lr.high)
        du = math.log10(lr) - (lo + land.optimum[0] * (hi - lo))
        dist = du * du
        rng = spec.weight_decay_range(cell.regularizer)
        if rng is not None:
            x = R.axis_value(rng.axis, lr, wd, cell.task.steps_per_epoch)
            a, b = math.log10(rng.low), math.log10(rng.high)
            dv = math.log10(x) - (a + land.optimum[1] * (b - a))
            dist += dv * dv
        truth = land.base + land.curvature * dist + (self.effect if cell.regularizer == self.first_arm else 0.0)
        key = (self.study, cell.task.name, round(math.log10(lr), 9), round(math.log10(wd), 9) if wd else 0)
        run = truth + land.shared_sd * _unit(self.study, cell.task.name, seed) \
            + land.seed_sd * _unit(*key, cell.regularizer, seed)
        val = run + land.val_sd * _unit(*key, cell.regularizer, seed, "val")
        metrics = {"val_error": float(np.clip(val, 0, 1)), "val_loss": float(val), "val_size": 400}
        if with_test:
            metrics["test_error"] = float(np.clip(run, 0, 1))
        return _Result(metrics)


@dataclass
class _Result:
    metrics: dict
    history: list = None  # type: ignore[assignment]
    test_outcomes: None = None

    def __post_init__(self):
        self.history = []


def _lease(storage, trial_id):
    return contextlib.nullcontext()


def simulated_spec(spec, study: int):
    """The spec as one simulated study runs it: its primary arms only (the others do not change a
    primary decision), with the search, race and evaluation seeds moved per study."""
    arms = [r for r in spec.regularizers if any(r in p for p in spec.primary_pairs())]
    data = spec.model_dump(mode="json")
    data["regularizers"] = arms
    if isinstance(data["search"]["weight_decay"], dict):
        data["search"]["weight_decay"] = {k: v for k, v in data["search"]["weight_decay"].items() if k in arms}
    data["search"]["seed"] = (spec.search.seed + 7919 * study) % 2**31
    data["name"] = f"sim{study}"
    return type(spec).model_validate(data)


def one_study(spec, landscapes: dict[str, Landscape], effect: float, study: int, storage=None) -> list[dict]:
    """Run one simulated study (named ``sim{study}``) through the engine, in ``storage`` (a new
    in-memory one by default); one row per task × optimizer primary comparison."""
    import optuna

    from .cells import ensure_studies
    from .verdicts import arm_runs, group_verdicts
    from .worker import Worker

    s = simulated_spec(spec, study)
    pairs = s.primary_pairs()
    storage = storage if storage is not None else optuna.storages.InMemoryStorage()
    ensure_studies(s, storage)
    fake = SyntheticRuns(s, landscapes, effect, study, pairs[0][0])
    worker = Worker(s, "memory", storage=storage, lock=contextlib.nullcontext(), lease=_lease, train=fake,
                    log=lambda msg: None, poll=0.0)
    runs = worker.run()
    rows = []
    looks = s.evaluation.looks()
    for task in s.tasks:
        for opt in s.optimizers:
            replicas: dict[str, list[D.ArmRuns]] = {}
            n_open = looks[0]
            for c in s.cells():
                if c.task.name != task.name or c.optimizer.name != opt.name:
                    continue
                ev = worker.cells.study(c.eval_name)
                race = worker.cells.study(c.race_name) if s.selection.races else None
                if ev is None:
                    continue
                n_open = R.StudyRecord.of(ev).seeds_open_or(n_open)
                runs_c = arm_runs(s.replica(c.replicate).selection.seed_list(), race.get_trials() if race else None,
                                  ev.user_attrs, ev.get_trials())
                replicas.setdefault(c.regularizer, []).append(runs_c)
            # one pipeline per arm, or its replicates (decided on their spread)
            arms = {k: v[0] if s.replicates == 1 else v for k, v in replicas.items()}
            margin = s.decision.margin_for(True)
            for v in group_verdicts(arms, pairs, pairs, margin=margin, alpha=s.decision.alpha, looks=looks,
                                    n_open=n_open):
                rows.append({"study": study, "task": task.name, "effect": effect, "decision": v.decision.code,
                             "seeds": n_open, "runs": runs, "diff": v.evidence.diff,
                             "old": _old_procedure(replicas[v.arm][0], replicas[v.reference][0], looks[0],
                                                   s.decision.alpha)})
    return rows


def _old_procedure(a: D.ArmRuns, b: D.ArmRuns, n: int, alpha: float) -> str:
    """What the replaced verdict said: the seed-paired t-test of the picks on the first n seeds."""
    from scipy import stats as st

    ea, eb = a.evals.get(a.pick, {}), b.evals.get(b.pick, {})
    seeds = sorted(s for s in ea if s in eb)[:n]
    d = np.array([ea[s] - eb[s] for s in seeds])
    if len(d) < 2 or d.std() == 0:
        return D.UNDECIDED
    p = st.ttest_1samp(d, 0.0).pvalue
    return (D.BETTER_A if d.mean() < 0 else D.BETTER_B) if p < alpha else D.UNDECIDED


def _chunk(args) -> list[dict]:
    spec, landscapes, effect, studies = args
    rows = []
    for i in studies:
        rows += one_study(spec, landscapes, effect, i)
    return rows


def run(spec, landscapes: dict[str, Landscape], effects: list[float], studies: int, *, workers: int = 1,
        first: int = 0) -> list[dict]:
    """Simulate ``studies`` studies at each true effect (in the metric's unit); rows per comparison."""
    missing = [t.name for t in spec.tasks if t.name not in landscapes]
    if missing:
        raise WdstudyError(f"landscape: no numbers for task(s) {', '.join(missing)}; give --landscape or --from")
    if not spec.primary_pairs():
        raise WdstudyError("decision.primary: no primary comparison has both its arms in the study")
    jobs = []
    for e in effects:
        ids = list(range(first, first + studies))
        jobs += [(spec, landscapes, e, ids[k::workers]) for k in range(workers)]
    if workers == 1:
        return [r for j in jobs for r in _chunk(j)]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return [r for part in pool.map(_chunk, jobs) for r in part]


def truthful(code: str, effect: float, margin: float) -> bool:
    """Whether a decision about A − B is true when the true difference is ``effect``."""
    return {D.BETTER_A: effect < 0, D.BETTER_B: effect > 0, D.EQUIVALENT: abs(effect) < margin,
            D.NONINF_A: effect < margin, D.NONINF_B: effect > -margin, D.UNDECIDED: True}[code]


def summarize(rows: list[dict], alpha: float, margin: float) -> list[dict]:
    """Per task and true effect: the share of each decision, the wrong ones with their MC s.e.,
    the seeds spent and the runs per study."""
    out = []
    keys = sorted({(r["task"], r["effect"]) for r in rows})
    for task, effect in keys:
        g = [r for r in rows if r["task"] == task and r["effect"] == effect]
        n = len(g)
        count = Counter(r["decision"] for r in g)
        old = Counter(r["old"] for r in g)
        wrong = sum(count[k] for k in count if not truthful(k, effect, margin))
        out.append({"task": task, "effect": effect, "studies": n,
                    **{k: count[k] / n for k in (D.BETTER_A, D.BETTER_B, D.EQUIVALENT, D.NONINF_A, D.NONINF_B,
                                                 D.UNDECIDED)},
                    "wrong": wrong / n, "mc_se": math.sqrt(alpha * (1 - alpha) / n),
                    "old_wrong": ((old[D.BETTER_A] + old[D.BETTER_B]) / n) if effect == 0 else math.nan,
                    "seeds": float(np.mean([r["seeds"] for r in g])), "runs": float(np.mean([r["runs"] for r in g]))})
    return out


def fit_landscape(storage, study: str) -> dict[str, dict]:
    """Landscape numbers per task from a finished study: ``base`` the picks' mean test error,
    ``seed_sd`` the evaluation seeds' spread (per-seed paired-difference spread / √2 split into
    a shared and an own part), ``val_sd`` the race's residual spread, ``curvature`` from the
    completed search trials around the best (a quadratic in decades), ``optimum`` where the best
    trial sits in its ranges."""
    from .analysis import cell_studies, evaluations_frame, race_frame, trials_frame

    cells = {n: R.StudyRecord.of(s).cell for n, (s, _) in cell_studies(storage, study).items()}
    if not cells:
        raise WdstudyError(f"study={study!r}: no cells in this storage")
    ev, tr, race = evaluations_frame(storage, study), trials_frame(storage, study), race_frame(storage, study)
    out = {}
    for task in sorted({c.task_name for c in cells.values()}):
        e = ev[(ev.task == task) & (ev.state == "COMPLETE")]
        by_cell = e.pivot_table(index="seed", columns="cell", values="test_error")
        own = float(np.nanmean(by_cell.std(ddof=1))) if len(by_cell) > 1 else 0.01
        diffs = [by_cell[a] - by_cell[b] for i, a in enumerate(by_cell) for b in list(by_cell)[i + 1:]]
        own_part = float(np.nanmean([d.std(ddof=1) for d in diffs])) / math.sqrt(2) if diffs else own
        shared = math.sqrt(max(own**2 - own_part**2, 0.0))
        r = race[race.cell.map(lambda n: cells[n].task_name) == task] if len(race) else race
        val_sd = []
        for _, g in (r.groupby("cell") if len(r) else []):
            table = np.array([v for v in g.race_values if len(v) == len(g.race_values.iloc[0])], dtype=float)
            if table.ndim == 2 and table.shape[0] > 1 and table.shape[1] > 1:
                resid = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + table.mean()
                val_sd.append(math.sqrt((resid**2).sum() / ((table.shape[0] - 1) * (table.shape[1] - 1))))
        t = tr[(tr.task == task) & (tr.state == "COMPLETE") & (tr.regularizer != "none")]
        best = t.loc[t.value.idxmin()]
        cell = cells[best.cell]
        lo, hi = np.log10(cell.lr_range)
        axis, rng = cell.searched_decay
        a, b = np.log10(rng)
        x = cell.axis_value(axis, best.lr, best.weight_decay)
        opt = [float((math.log10(best.lr) - lo) / (hi - lo)), float((math.log10(x) - a) / (b - a))]
        near = t[t.cell == best.cell]
        dist = ((np.log10(near.lr) - math.log10(best.lr)) ** 2
                + (np.log10([cell.axis_value(axis, p, w) for p, w in zip(near.lr, near.weight_decay)])
                   - math.log10(x)) ** 2)
        rise = near.value - best.value
        ok = (dist > 0.01) & (dist < 4)
        curvature = float(np.median(rise[ok] / dist[ok])) if ok.sum() else 0.01
        out[task] = {"base": round(float(e.test_error.mean()), 4), "curvature": round(max(curvature, 1e-4), 4),
                     "seed_sd": round(own_part, 4), "shared_sd": round(shared, 4),
                     "val_sd": round(float(np.mean(val_sd)) if val_sd else own_part, 4),
                     "optimum": [round(v, 3) for v in opt]}
    return out


def landscapes_from(data: dict) -> dict[str, Landscape]:
    try:
        return {k: Landscape(v["base"], v["curvature"], v["seed_sd"], v["shared_sd"], v["val_sd"],
                             tuple(v["optimum"])) for k, v in data.items()}
    except (KeyError, TypeError) as exc:
        raise WdstudyError(f"landscape: each task needs base, curvature, seed_sd, shared_sd, val_sd and "
                           f"optimum ({exc} is missing or malformed)") from None


def main(spec_path: str, effects: list[float], studies: int, *, workers: int = 1, landscape: str | None = None,
         source: str | None = None, study: str | None = None, save: str | None = None, first: int = 0) -> int:
    import yaml

    from .spec import load_spec

    spec = load_spec(spec_path)
    if source:
        from .storage import open_storage

        data = fit_landscape(open_storage(source), study or spec.name)
    elif landscape:
        p = Path(landscape)
        if not p.is_file():
            raise WdstudyError(f"--landscape={landscape!r}: no such file")
        data = yaml.safe_load(p.read_text())
    else:
        data = QUICKSTART
    if save:
        Path(save).write_text(yaml.safe_dump(data, sort_keys=True))
        print(f"landscape written to {save}")
    alpha = spec.decision.alpha
    rate = True  # effects are given in points of an error rate (or MSE for a regression task)
    scale = 0.01 if rate else 1.0
    start = time.perf_counter()
    rows = run(spec, landscapes_from(data), [e * scale for e in effects], studies, workers=workers, first=first)
    took = time.perf_counter() - start
    pair = spec.primary_pairs()[0]
    print(f"{studies} simulated studies per effect of {spec.name} ({pair[0]} − {pair[1]}, "
          f"margin ±{spec.decision.margin:g} pts, α = {alpha:g}, seeds {spec.evaluation.looks()}), {took:.0f} s")
    head = (f"{'task':<13}{'effect':>7} {pair[0][:6] + ' better':>14}{pair[1][:6] + ' better':>12}{'equiv.':>8}"
            f"{'no worse':>10}{'undecided':>10}{'wrong':>8}{'old wrong':>10}{'seeds':>7}{'runs':>6}")
    print(head)
    for r in summarize(rows, alpha, spec.decision.margin_for(True)):
        print(f"{r['task']:<13}{100 * r['effect']:>+7.1f} {100 * r[D.BETTER_A]:>13.1f}%{100 * r[D.BETTER_B]:>11.1f}%"
              f"{100 * r[D.EQUIVALENT]:>7.1f}%{100 * (r[D.NONINF_A] + r[D.NONINF_B]):>9.1f}%"
              f"{100 * r[D.UNDECIDED]:>9.1f}%{100 * r['wrong']:>7.1f}%"
              + (f"{100 * r['old_wrong']:>9.1f}%" if not math.isnan(r["old_wrong"]) else f"{'':>10}")
              + f"{r['seeds']:>7.1f}{r['runs']:>6.0f}")
    print(f"'wrong': a decision the true effect contradicts (at 0: any 'better'); it should stay within "
          f"α = {100 * alpha:g}% (± {100 * 2 * math.sqrt(alpha * (1 - alpha) / studies):.1f} for 2 Monte-Carlo s.e.). "
          f"'old wrong': the paired t-test on one pick that this replaced.")
    return 0
