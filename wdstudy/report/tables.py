"""The report's numbers: every table, computed from the storage alone.

:func:`load_report_data` reads one study (every cell study carries its own description);
:func:`compute_tables` fills the tables the figures, the HTML, the PDF and ``tables/*.csv``
are made from. Nothing here draws or formats for a page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd

from .. import records as R
from ..analysis import cell_studies, chosen_trial, evaluations_frame, progress_frame, race_frame, trials_frame
from ..arms import BY_NAME, PAIRS
from ..cells import MAX_RETRY
from ..stats import binomial_se, coupling, mean_ci, paired
from ..storage import study_trials
from ..tasks.names import Metric, task_metric
from .style import arm_rank, label, shrink

EDGE = 0.05  # a chosen value within 5% of the log-range of an edge is "at the edge"
ALPHA = 0.05
TOP_K = 5  # the coupling fit uses each cell's best TOP_K completed trials ...
TOP_QUANTILE = 0.25  # ... or its best quarter, whichever is more
NEAR_LR = 0.5  # decades around the chosen learning rate for the λ slices


@dataclass
class ReportData:
    study: str
    storage_label: str
    cells: dict[str, R.CellRecord]
    trials: pd.DataFrame
    evals: pd.DataFrame
    progress: pd.DataFrame
    histories: pd.DataFrame
    selection: pd.DataFrame  # race candidates (empty without a race), with a ``survivor`` column
    spec_yaml: str
    versions: dict
    objective: str
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    comparison: pd.DataFrame = field(default_factory=pd.DataFrame)
    pruning: pd.DataFrame = field(default_factory=pd.DataFrame)
    coupling: pd.DataFrame = field(default_factory=pd.DataFrame)
    importance: pd.DataFrame = field(default_factory=pd.DataFrame)
    counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    status_lines: list[str] = field(default_factory=list)
    arms: dict = field(default_factory=dict)  # cell -> (ArmRuns, seeds opened): wdstudy.verdicts.study_arms
    decision: dict = field(default_factory=dict)  # the decision settings (margin, alpha, primary, looks)
    diagnostics: pd.DataFrame = field(default_factory=pd.DataFrame)  # the runs' mechanics (analysis.diagnostics_frame)
    meaning: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cell's pick: report.meaning.meaning_table
    #: the landscape figure's y axis for the decoupled-decay arms: ``auto``, ``lambda`` or ``tau_epoch``
    #: (:data:`wdstudy.spec.LANDSCAPE_AXES`; ``auto`` resolved by :meth:`tau_landscape`)
    landscape_axis: str = "auto"

    def tau_landscape(self) -> bool:
        """Whether the landscape figure draws the decoupled-decay arms over τ_epoch: asked for, or
        (``auto``) their decoupled arm was searched over ``timescale_epochs``."""
        if self.landscape_axis == "auto":
            return any(c.decay_axis is not None and c.decay_axis[0] == "timescale_epochs" for c in self.cells.values())
        return self.landscape_axis == "tau_epoch"

    def groups(self) -> list[tuple[str, str]]:
        """The (task, optimizer) pairs of the study, in table order."""
        return sorted({(r.task, r.optimizer) for r in self.summary.itertuples()})

    def complete(self, cell: str) -> pd.DataFrame:
        t = self.trials
        return t[(t.cell == cell) & (t.state == "COMPLETE")] if not t.empty else t

    @property
    def is_error(self) -> bool:
        """Whether the objective is the error (``val_error``) rather than the loss."""
        return "error" in self.objective

    def metric(self, task: str) -> Metric:
        """What ``task``'s error columns hold: the error rate, or a regression's MSE."""
        return task_metric(task)

    def metrics(self) -> list[Metric]:
        """The metrics of the study's tasks, classification's first."""
        found = {task_metric(c.task_name).key: task_metric(c.task_name) for c in self.cells.values()}
        return sorted(found.values(), key=lambda m: not m.is_rate)

    def rate(self, task: str) -> bool:
        """Whether ``task``'s objective values are error rates (shown in %)."""
        return self.is_error and task_metric(task).is_rate

    def objective_name(self, task: str) -> str:
        """``validation error``, ``validation MSE`` (a regression: its loss and error are both the MSE)
        or ``validation loss``."""
        if not task_metric(task).is_rate:
            return "validation MSE"
        return "validation error" if self.is_error else f"validation {self.objective.replace('val_', '')}"

    def regression_note(self) -> str:
        """A sentence naming the study's regression tasks, whose error is the MSE ('' without any)."""
        tasks = sorted({c.task_name for c in self.cells.values() if not task_metric(c.task_name).is_rate})
        if not tasks:
            return ""
        return (f"For {', '.join(tasks)} (regression) the error is the mean squared error (MSE): validation and "
                "test error, gap and differences are in MSE, not in % or points.")


# -- data ------------------------------------------------------------------------------------


def load_report_data(storage, study: str, storage_label: str) -> ReportData:
    studies = cell_studies(storage, study)
    if not studies:
        from ..errors import WdstudyError

        raise WdstudyError(f"study={study!r}: no cells of this study in storage {storage_label}")
    cells = {name: R.StudyRecord.of(s).cell for name, (s, _) in studies.items()}
    first = R.StudyRecord.of(next(iter(studies.values()))[0])
    objective = next(iter(cells.values())).objective
    from ..verdicts import decision_settings, study_arms

    arms = study_arms(storage, study)
    d = ReportData(study, storage_label, cells, trials_frame(storage, study), evaluations_frame(storage, study),
                   progress_frame(storage, study), _histories(storage, studies),
                   survivors(race_frame(storage, study), arms),
                   first.spec_yaml if first.spec_yaml is not None else "",
                   first.versions if first.versions is not None else {}, objective,
                   arms=arms, decision=decision_settings(storage, study))
    from ..analysis import diagnostics_frame
    from .meaning import meaning_table

    d.diagnostics = diagnostics_frame(storage, study)
    d.meaning = meaning_table(d.diagnostics)
    return d


def survivors(sel: pd.DataFrame, arms: dict | None = None) -> pd.DataFrame:
    """Mark each race candidate a ``survivor`` if the race could not show it worse than its cell's
    pick by more than half the margin (:func:`wdstudy.decide.race_survivors`, decided by the engine
    when it queued their evaluation: every survivor is evaluated). Cells evaluated before survivors
    existed count the pick alone."""
    if sel.empty:
        return sel.assign(survivor=pd.Series(dtype=bool))
    arms = arms or {}
    evaluated = {cell: set(runs.evals) for cell, (runs, _) in arms.items()}
    out = [bool(r.chosen) or (r.search_rank - 1) in evaluated.get(r.cell, set()) for r in sel.itertuples()]
    return sel.assign(survivor=pd.Series(out, index=sel.index, dtype=bool))


def _histories(storage, studies) -> pd.DataFrame:
    """Per-epoch records of every completed evaluation run (the chosen configurations)."""
    rows = []
    for name, (s, ev) in studies.items():
        if ev is None:
            continue
        cell = R.StudyRecord.of(s).cell
        for t in study_trials(storage, ev):
            if t.state != optuna.trial.TrialState.COMPLETE:
                continue
            run = R.RunRecord.of(t)
            for h in run.history:
                rows.append({"cell": name, "task": cell.task_name, "optimizer": cell.optimizer_name,
                             "regularizer": cell.regularizer, "seed": run.seed, **h})
    return pd.DataFrame(rows)


def edge(value: float, lo: float, hi: float) -> str:
    """'low edge', 'high edge' or '' for a value within its log range."""
    if value is None or lo is None or not value > 0:
        return ""
    x = (math.log10(value) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return "low edge" if x <= EDGE else ("high edge" if x >= 1 - EDGE else "")


def search_order(t: pd.DataFrame) -> pd.DataFrame:
    """A cell's trials in the order the search proposed them (generation, slot; else number)."""
    if t.empty:
        return t
    if t.generation.notna().all():
        return t.sort_values(["generation", "slot", "trial"])
    return t.sort_values("trial")


def compute_tables(d: ReportData, importance: bool = True) -> None:
    """Every table; the fANOVA importances (the slow one) only with ``importance``, else they are
    left to :func:`fill_importance`."""
    d.summary = _summary(d)
    d.comparison = compare_arms(d)
    d.pruning = pruning_audit(d)
    d.coupling = _coupling(d)
    if importance:
        fill_importance(d)
    counts = ["cell", "budget", "complete", "pruned", "fail", "running", "waiting", "eval_done", "eval_total"]
    d.counts = d.progress[counts] if not d.progress.empty else pd.DataFrame(columns=counts)
    d.status_lines = _status(d)


def _summary(d: ReportData) -> pd.DataFrame:
    rows = []
    for name, cell in d.cells.items():
        t = d.trials[d.trials.cell == name] if not d.trials.empty else d.trials
        comp = d.complete(name)
        e_all = d.evals[d.evals.cell == name] if not d.evals.empty else d.evals
        e = e_all[e_all.state == "COMPLETE"] if len(e_all) else e_all
        best = chosen_trial(comp)
        lr_lo, lr_hi = cell.lr_range
        wd_range = cell.weight_decay_range
        searched = cell.searched_decay  # (axis, range): where the search looked for the strength
        sizes = comp.val_size.dropna() if len(comp) and "val_size" in comp else []
        val_size = int(sizes.iloc[0]) if len(sizes) else 0
        ci = {c: mean_ci(e[c].dropna()) if len(e) and c in e else mean_ci([])
              for c in ("test_error", "train_error", "gap_error", "gap_loss", "test_loss", "train_loss", "weight_norm",
                        "zero_fraction")}
        order = search_order(t[t.state.isin(["COMPLETE", "PRUNED"])]) if len(t) else t
        found_at = (int(np.flatnonzero(order.trial.to_numpy() == best.trial)[0]) + 1
                    if best is not None and len(order) else None)
        reg = cell.regularizer
        wd = None if best is None or wd_range is None else best.weight_decay
        rows.append({
            "cell": name, "task": cell.task_name, "optimizer": cell.optimizer_name, "regularizer": reg,
            "metric": task_metric(cell.task_name).key,
            "best_val": None if best is None else best.value,
            "lr": None if best is None else best.lr,
            "weight_decay": wd,
            "shrink": math.nan if wd is None else shrink(reg, best.lr, wd),
            "lr_range": f"{lr_lo:.3g}–{lr_hi:.3g}",
            "weight_decay_range": "—" if searched is None else range_text(*searched),
            "decay_axis": "" if searched is None else searched[0],
            "lr_edge": "" if best is None else edge(best.lr, lr_lo, lr_hi),
            "weight_decay_edge": "" if wd is None else edge(cell.axis_value(searched[0], best.lr, wd), *searched[1]),
            "found_at": found_at, "searched": len(order),
            **_race_columns(d, name),
            "seeds": ci["test_error"].n,
            "diverged_seeds": int((e_all.state == "PRUNED").sum()) if len(e_all) else 0,
            "val_size": val_size,
            "val_se": binomial_se(None if best is None else best.value, val_size) if d.rate(cell.task_name)
            else math.nan,
            "top5_spread": float(comp.nsmallest(5, "value").value.std(ddof=1)) if len(comp) >= 2 else math.nan,
            **{k: v for c, m in ci.items() for k, v in ((c, m.mean), (f"{c}_low", m.low), (f"{c}_high", m.high))},
        })
    return pd.DataFrame(rows).sort_values(["task", "optimizer", "regularizer"], key=arm_rank, ignore_index=True)


def _race_columns(d: ReportData, cell: str) -> dict:
    g = d.selection[d.selection.cell == cell] if len(d.selection) else d.selection
    if g.empty:
        return {"picked_by": "search", "race_rank": math.nan, "race_mean": math.nan, "race_candidates": 0,
                "survivors": 0}
    pick = g[g.chosen]
    return {"picked_by": "race", "race_rank": int(pick.search_rank.iloc[0]) if len(pick) else math.nan,
            "race_mean": float(pick.race_mean.iloc[0]) if len(pick) else math.nan, "race_candidates": len(g),
            "survivors": int(g.survivor.sum())}


def survivor_range(d: ReportData, cell: str) -> tuple[float, float] | None:
    """(lowest, highest) race mean over a cell's survivors; None without a race."""
    g = d.selection[(d.selection.cell == cell) & d.selection.survivor] if len(d.selection) else d.selection
    return None if g.empty else (float(g.race_mean.min()), float(g.race_mean.max()))


# -- comparisons -----------------------------------------------------------------------------


def _seed_values(d: ReportData, cell: str, col: str) -> dict[int, float]:
    if d.evals.empty:
        return {}
    e = d.evals[(d.evals.cell == cell) & (d.evals.state == "COMPLETE")]
    return {int(r.seed): float(getattr(r, col)) for r in e.itertuples() if getattr(r, col) is not None}


def seed_problems(d: ReportData, cell: str) -> str:
    """'diverged on 1 of 5 seeds', 'failed on ...', or '' — every seed the arm did not complete."""
    seeds = d.cells[cell].eval_seeds[: d.arms[cell][1]] if cell in d.arms else d.cells[cell].eval_seeds
    e = d.evals[d.evals.cell == cell] if not d.evals.empty else d.evals
    done = set(e[e.state == "COMPLETE"].seed.astype(int)) if len(e) else set()
    diverged = set(e[e.state == "PRUNED"].seed.astype(int)) if len(e) else set()
    failed = (set(e[e.state == "FAIL"].seed.astype(int)) if len(e) else set()) - done - diverged
    name = label(d.cells[cell].regularizer)
    out = []
    if diverged:
        out.append(f"{name} diverged on {len(diverged)} of {len(seeds)} seeds")
    if failed:
        out.append(f"{name} failed on {len(failed)} of {len(seeds)} seeds")
    left = len(seeds) - len(done) - len(diverged) - len(failed)
    if left > 0 and len(e):
        out.append(f"{name} has {left} of {len(seeds)} seeds still to run")
    return "; ".join(out)


AXIS_SYMBOL = {"lambda": "λ", "shrink": "η·λ", "timescale": "1/(η·λ)", "timescale_epochs": "τ_epoch"}


def range_text(axis: str, rng: list[float]) -> str:
    """A searched strength range as the report shows it: ``1e-08–0.1`` for λ, else with its axis named."""
    text = f"{rng[0]:.3g}–{rng[1]:.3g}"
    return text if axis == "lambda" else f"{AXIS_SYMBOL[axis]} {text}"


def _edge_note(r) -> str:
    parts = [f"{label(r.regularizer)} lr at the {r.lr_edge}" if r.lr_edge else "",
             f"{label(r.regularizer)} {AXIS_SYMBOL.get(r.decay_axis, 'λ')} at the {r.weight_decay_edge}"
             if r.weight_decay_edge else ""]
    return ", ".join(x for x in parts if x)


def compare_arms(d: ReportData) -> pd.DataFrame:
    """Every arm against its references, each ending in a decision (:mod:`wdstudy.decide`).

    Per task × optimizer, the spec's primary comparisons form one Holm family and every other
    comparison a secondary one; the interval includes the seeds' noise, the pick's luck (the
    spread among the race survivors, all evaluated on the same seeds) and the test split's
    sampling (from the stored per-example outcomes). A chosen value at the edge of its range
    makes a comparison inconclusive whatever the numbers say; fewer than 2 paired seeds, not tested.
    """
    from ..verdicts import group_verdicts

    if d.summary.empty:
        return pd.DataFrame()
    settings = d.decision
    primary = [tuple(p) for p in settings["primary"]]
    rows = []
    by_key: dict[tuple, list] = {}
    for r in sorted(d.summary.itertuples(), key=lambda r: d.cells[r.cell].replicate):
        by_key.setdefault((r.task, r.optimizer, r.regularizer), []).append(r)  # its replicates, in order
    for task, opt in d.groups():
        metric = task_metric(task)
        margin = settings["margin"] / 100 if metric.is_rate else settings["mse_margin"]
        cells = {reg: rs for (t, o, reg), rs in by_key.items() if (t, o) == (task, opt)}
        from ..decide import ArmRuns

        # an arm not evaluated yet has no runs: its comparisons are "not tested"; an arm with
        # replicates gives one pipeline's runs per replicate (decided on their spread)
        per = {reg: [d.arms[r.cell][0] if r.cell in d.arms else ArmRuns(0, {0: {}}) for r in rs]
               for reg, rs in cells.items()}
        arms = {reg: runs[0] if len(runs) == 1 else runs for reg, runs in per.items()}
        n_open = max((d.arms[r.cell][1] for rs in cells.values() for r in rs if r.cell in d.arms), default=0)
        looks = settings.get("looks") or [n_open or 1]
        pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
        pairs += [p for p in primary if p not in pairs and p[0] in arms and p[1] in arms]
        verdicts = {(v.arm, v.reference): v for v in group_verdicts(
            arms, pairs, primary, margin=margin, alpha=settings["alpha"], looks=looks, n_open=n_open)}
        for arm, ref in sorted(pairs, key=lambda p: p not in primary):
            ra, rb = cells[arm], cells[ref]
            v = verdicts[(arm, ref)]
            ev, dec = v.evidence, v.decision
            ga = {k: x for r in ra for k, x in _seed_values(d, r.cell, "gap_error").items()}
            gb = {k: x for r in rb for k, x in _seed_values(d, r.cell, "gap_error").items()}
            both = [s for s in ev.seeds if s in ga and s in gb]
            gp = paired([ga[s] for s in both], [gb[s] for s in both])
            # each replicate's pick on its own seeds (the seeds of two replicates never meet)
            ea = {k: x for a in per[arm] for k, x in a.evals.get(a.pick, {}).items()}
            eb = {k: x for b in per[ref] for k, x in b.evals.get(b.pick, {}).items()}
            naive_seeds = [s for s in ev.seeds if s in ea and s in eb]
            naive = paired([ea[s] for s in naive_seeds], [eb[s] for s in naive_seeds])
            lo, hi = ev.interval(0.95)
            k_a, k_b = max(len(a.evals) for a in per[arm]), max(len(b.evals) for b in per[ref])
            if ev.unit == "replicates":
                selection = f"replicates: {len(per[arm])} per arm, decided on their spread"
            elif max(k_a, k_b) > 1:
                selection = f"survivors evaluated: {label(arm)} {k_a}, {label(ref)} {k_b}"
            else:
                selection = "race left one survivor per arm" if per[arm][0].race else "no race"
            edges = "; ".join(x for r in (*cells[arm], *cells[ref]) if (x := _edge_note(r)))
            problems = "; ".join(x for r in (*cells[arm], *cells[ref]) if (x := seed_problems(d, r.cell)))
            rows.append({
                "task": task, "optimizer": opt, "arm": arm, "reference": ref, "metric": metric.key,
                "family": v.family, "margin": margin, "alpha": settings["alpha"], "level": dec.level,
                "n_pairs": ev.n, "seeds_open": n_open, "seeds_max": looks[-1],
                "test_error_diff": ev.diff, "test_error_low": lo, "test_error_high": hi, "df": ev.df,
                "var_seeds": ev.var_seeds, "var_selection": ev.var_selection, "var_test": ev.var_test,
                "p_difference": dec.p_adjusted["difference"], "p_equivalent": dec.p_adjusted["equivalent"],
                "p_no_worse_arm": dec.p_adjusted["A no worse"], "p_no_worse_reference": dec.p_adjusted["B no worse"],
                "decision_code": dec.code,
                "seeds_needed": dec.seeds_needed,
                "selection_included": selection,
                "test_sampling_included": ev.var_test > 0,
                "naive_low": naive.low, "naive_high": naive.high, "p_naive": naive.p_t,
                "p_wilcoxon": naive.p_wilcoxon if ev.n >= 6 else math.nan,  # below 6 pairs it cannot reach 0.05
                "p_signflip": naive.p_signflip if ev.n >= 6 else math.nan,
                "gap_error_diff": gp.mean_diff, "gap_error_low": gp.low, "gap_error_high": gp.high,
                "gap_error_p": gp.p_t,
                "edges": edges,
                "seed_problems": problems,
            })
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(rows)
    judged = [judge(r) for r in out.itertuples()]
    out["decision"] = [j[0] for j in judged]
    out["outcome"] = out["decision"]
    out["caveats"] = [j[1] for j in judged]
    out["verdict"] = [_sentence(r, *j) for r, j in zip(out.itertuples(), judged)]
    return out


def margin_text(r) -> str:
    return f"{100 * r.margin:g} pt" if task_metric(r.task).is_rate else f"{r.margin:g} MSE"


def judge(r) -> tuple[str, str]:
    """(decision, caveats) of one comparison: the decision in words (with the arms' names), unless
    a chosen value at the edge of its range makes it 'inconclusive: widen the range' or fewer than
    2 paired seeds leave it 'not tested'; the caveats name the rest a reader must weigh."""
    from ..decide import UNDECIDED, sentence

    a, b = label(r.arm), label(r.reference)
    caveats = []
    if r.seed_problems:
        caveats.append(r.seed_problems)
    if r.edges:
        return "inconclusive: widen the range", "; ".join([r.edges, *caveats])
    if r.n_pairs < 2:
        return "not tested", "; ".join(["fewer than 2 seeds completed by both", *caveats])
    decision = sentence(r.decision_code, a, b, margin_text(r))
    if r.decision_code == UNDECIDED and r.var_seeds == 0 and r.var_selection == 0 and r.var_test == 0:
        caveats.append("the paired differences have no spread at all: no test can say how sure that is")
    elif r.decision_code == UNDECIDED and _unit(r) == "replicates":
        need = r.seeds_needed
        if need == math.inf or (isinstance(need, float) and math.isnan(need)):
            caveats.append("no number of replicates would decide at this margin: the test split's sampling alone "
                           "is wider" if need == math.inf else "too few replicates to size")
        else:
            caveats.append(f"about {int(need)} replicates in all would decide at ±{margin_text(r)}")
    elif r.decision_code == UNDECIDED:
        need = r.seeds_needed
        if need == math.inf or (isinstance(need, float) and math.isnan(need)):
            caveats.append("no number of seeds would decide at this margin: the pick's luck alone is wider "
                           "(race more seeds or candidates, or run replicates)" if need == math.inf else
                           "too few seeds to size")
        elif need > r.seeds_max:
            caveats.append(f"about {int(need)} seeds in all would decide at ±{margin_text(r)}, more than this "
                           f"study's maximum of {r.seeds_max}")
        else:
            more = int(need) - r.n_pairs
            caveats.append(f"about {more} more seed{'s' if more != 1 else ''} would decide at ±{margin_text(r)}")
    if r.family == "secondary":
        caveats.append("secondary comparison (its own Holm family; rounds follow the primary ones)")
    return decision, "; ".join(caveats)


def _unit(r) -> str:
    """What a comparison's ``n_pairs`` counts: paired seeds, or paired replicates."""
    return "replicates" if str(r.selection_included).startswith("replicates") else "seeds"


def _sentence(r, outcome: str, caveats: str) -> str:
    """The decision as one sentence, numbers included (comparison.csv, the launch printout)."""
    m = task_metric(r.task)
    if m.is_rate:
        diff = (f"{label(r.arm)} − {label(r.reference)} = {100 * r.test_error_diff:+.2f} pts test error "
                f"(95% CI {100 * r.test_error_low:+.2f} to {100 * r.test_error_high:+.2f}, pick's luck and test "
                f"sampling included; {r.n_pairs} {_unit(r)})")
    else:
        diff = (f"{label(r.arm)} − {label(r.reference)} = {r.test_error_diff:+.4f} test MSE "
                f"(95% CI {r.test_error_low:+.4f} to {r.test_error_high:+.4f}; {r.n_pairs} {_unit(r)})")
    diff = diff if r.n_pairs >= 2 else ""
    return outcome + "".join(f": {x}" if i == 0 else f"; {x}" for i, x in enumerate(y for y in (diff, caveats) if y))


# -- search audits ---------------------------------------------------------------------------


PRUNING_COLUMNS = ["cell", "pruned", "complete", "pruned_position", "complete_position", "pruned_high_share",
                   "p_mannwhitney", "warning"]  # an empty table keeps its header: pandas reads it


def pruning_audit(d: ReportData) -> pd.DataFrame:
    """Where in its λ range the pruner stopped trials, against where completed trials lie.

    Per cell with pruned trials: the position of log λ within the range (0 = low edge,
    1 = high edge) of pruned and of completed trials, the Mann–Whitney U test of the two, and
    a warning when pruning fell mostly on one side (p < 0.05, or at least 80% of the pruned
    trials in one half of the range while the completed ones are not).
    """
    rows = []
    if d.trials.empty:
        return pd.DataFrame(columns=PRUNING_COLUMNS)
    from scipy.stats import mannwhitneyu

    for name, cell in d.cells.items():
        searched = cell.searched_decay
        t = d.trials[d.trials.cell == name]
        pruned = t[(t.state == "PRUNED") & (t.outcome == "pruned")]
        if searched is None or pruned.empty:
            continue
        done = t[t.state == "COMPLETE"]
        axis, (lo, hi) = searched[0], np.log10(searched[1])
        def pos(x, axis=axis, lo=lo, hi=hi, cell=cell):
            return (np.log10([cell.axis_value(axis, a, b) for a, b in zip(x.lr, x.weight_decay)]) - lo) / (hi - lo)

        pp, pc = pd.Series(pos(pruned), dtype=float), pd.Series(pos(done), dtype=float)
        p = float(mannwhitneyu(pp, pc).pvalue) if len(pp) >= 3 and len(pc) >= 3 else math.nan
        high_share = float((pp > 0.5).mean())
        side = "high" if high_share >= 0.5 else "low"
        one_sided = max(high_share, 1 - high_share) >= 0.8 and abs(float((pc > 0.5).mean()) - high_share) >= 0.3
        warn = len(pp) >= 3 and len(pc) >= 3 and (p < ALPHA or one_sided)
        rows.append({"cell": name, "pruned": len(pp), "complete": len(pc),
                     "pruned_position": float(pp.mean()), "complete_position": float(pc.mean()) if len(pc) else math.nan,
                     "pruned_high_share": high_share, "p_mannwhitney": p,
                     "warning": (f"pruning fell mostly on {side} λ ({len(pp)} pruned, mean position "
                                 f"{pp.mean():.2f} vs {pc.mean():.2f} for completed trials): it may have "
                                 "steered the search away from that side") if warn else ""})
    return pd.DataFrame(rows, columns=PRUNING_COLUMNS)


def top_trials(d: ReportData, cell: str) -> pd.DataFrame:
    """A cell's best completed trials: the best TOP_QUANTILE, at least TOP_K where there are."""
    t = d.complete(cell)
    if t.empty:
        return t
    k = max(min(TOP_K, len(t)), int(math.ceil(TOP_QUANTILE * len(t))))
    return t.nsmallest(k, "value")



def read_slope(n: int, slope: float, low: float, high: float) -> str:
    """What an interval on the coupling slope says: only what it excludes."""
    if n < TOP_K or math.isnan(slope) or math.isnan(low):
        return "too few trials"
    has0, has1 = low <= 0 <= high, low <= -1 <= high
    if has0 and has1:
        return "inconclusive (the interval covers 0 and −1)"
    if has1:
        return "consistent with a constant η·λ (λ must move with η)"
    if has0:
        return "consistent with λ independent of η (separable)"
    return f"neither 0 nor −1 (slope {slope:.2f})"


def _convention(reg: str) -> str:
    """What a slope of log λ on log η means under the arm's convention."""
    return BY_NAME[reg].convention if reg in BY_NAME else ""


def _coupling(d: ReportData) -> pd.DataFrame:
    rows = []
    for name, cell in d.cells.items():
        if cell.weight_decay_range is None:
            continue
        top = top_trials(d, name)
        c = coupling(np.log10(top.lr.astype(float)), np.log10(top.weight_decay.astype(float))) if len(top) \
            else coupling([], [])
        rows.append({"cell": name, "task": cell.task_name, "optimizer": cell.optimizer_name,
                     "regularizer": cell.regularizer, "top_trials": c.n, "of_trials": len(d.complete(name)),
                     "slope": c.slope, "slope_low": c.slope_low, "slope_high": c.slope_high,
                     "spearman_rho": c.rho, "rho_low": c.rho_low, "rho_high": c.rho_high,
                     "intercept": c.intercept, "reading": read_slope(c.n, c.slope, c.slope_low, c.slope_high),
                     "convention": _convention(cell.regularizer)})
    out = pd.DataFrame(rows)
    return out.sort_values(["task", "optimizer", "regularizer"], key=arm_rank, ignore_index=True) if len(out) else out


def fill_importance(d: ReportData) -> None:
    d.importance = _importances(d)


def _importances(d: ReportData) -> pd.DataFrame:
    rows = []
    for name, cell in d.cells.items():
        if cell.weight_decay_range is None or d.trials.empty:
            continue
        t = d.complete(name)
        if len(t) < 4:
            continue
        rows.append({"cell": name, "task": cell.task_name, "optimizer": cell.optimizer_name,
                     "regularizer": cell.regularizer, **_importance(t)})
    out = pd.DataFrame(rows, columns=["cell", "task", "optimizer", "regularizer", "lr", "weight_decay"])
    return out.sort_values(["task", "optimizer", "regularizer"], key=arm_rank, ignore_index=True) if len(out) else out


def _importance(t: pd.DataFrame) -> dict:
    """fANOVA importance of lr and λ for one cell, from its complete trials."""
    dists = {
        "lr": optuna.distributions.FloatDistribution(float(t.lr.min()) * 0.999, float(t.lr.max()) * 1.001, log=True),
        "weight_decay": optuna.distributions.FloatDistribution(
            float(t.weight_decay.min()) * 0.999, float(t.weight_decay.max()) * 1.001, log=True),
    }
    study = optuna.create_study(direction="minimize")
    study.add_trials([
        optuna.trial.create_trial(params={"lr": r.lr, "weight_decay": r.weight_decay}, distributions=dists, value=r.value)
        for r in t.itertuples()
    ])
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=16, max_depth=16, seed=0),
            normalize=True)
    except (RuntimeError, ValueError):
        return {"lr": math.nan, "weight_decay": math.nan}
    return {"lr": imp.get("lr", math.nan), "weight_decay": imp.get("weight_decay", math.nan)}


def _status(d: ReportData) -> list[str]:
    p = d.progress
    lines = []
    if p.empty:
        return ["No cell has any trial yet."]
    todo = (p.budget - p.done).clip(lower=0).sum()
    running, failed = int(p.running.sum()), int(p.fail.sum())
    ev_left = int((p.eval_total - p.eval_done).sum())
    if todo or running or ev_left:
        lines.append(
            f"This study is not finished: {int(p.done.sum())} of {int(p.budget.sum())} search trials done, "
            f"{running} running, {int(p.eval_done.sum())} of {int(p.eval_total.sum())} evaluation runs done. "
            "The report shows what exists so far."
        )
    if failed:
        lines.append(f"{failed} run(s) failed (a worker was lost, or the run raised); each was queued again "
                     f"with the same parameters, a configuration failing {MAX_RETRY + 1} times was replaced by a new "
                     "proposal, and the reasons are in trials.csv (reason, fail_kind).")
    for r in (d.pruning.itertuples() if len(d.pruning) else []):
        if r.warning:
            lines.append(f"Cell {r.cell}: {r.warning}.")
    for r in p[(p.done >= p.budget) & (p.eval_total == 0)].itertuples():
        lines.append(f"Cell {r.cell}: every search trial was pruned or diverged; nothing to evaluate.")
    return lines
