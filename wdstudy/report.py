"""Reports: HTML and PDF comparing L2 regularization with decoupled weight decay.

:func:`build_report` reads one study from its storage alone (every cell study carries its
own description), computes the tables, draws the figures with seaborn and writes into the
output folder:

* ``report.html``: one self-contained file (figures embedded as PNG data URIs);
* ``report.pdf``: the same content, page by page;
* ``figures/*.png`` and ``tables/*.csv``.

Sections: summary, generalization gap, (η, λ) landscapes, coupling, training dynamics,
hyperparameter importance, appendix. A study that is still running or partly failed is
reported as it is, and the first page says so.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from . import records as R  # noqa: E402
from .analysis import cell_studies, chosen_trial, evaluations_frame, progress_frame, trials_frame  # noqa: E402
from .stats import binomial_se, coupling, holm, mean_ci, paired  # noqa: E402

matplotlib.rcParams.update({"pdf.fonttype": 42, "figure.dpi": 100})
PNG_DPI = 130
PALETTE = {"l2": "#d1495b", "decoupled": "#00798c", "none": "#8d8d8d", "independent": "#edae49",
           "l1": "#66a182", "l1-decoupled": "#2e4057"}
REG_LABEL = {"l2": "L2", "decoupled": "decoupled", "none": "none", "independent": "independent",
             "l1": "L1", "l1-decoupled": "L1 decoupled"}
TOP_QUANTILE = 0.25
EDGE = 0.05
ALPHA = 0.05


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    fig: plt.Figure

    def __post_init__(self) -> None:
        # keys become file names and HTML ids: keep them to a safe alphabet
        self.key = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.key)


@dataclass
class ReportData:
    study: str
    storage_label: str
    cells: dict[str, dict]
    trials: pd.DataFrame
    evals: pd.DataFrame
    progress: pd.DataFrame
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


# -- data ------------------------------------------------------------------------------------


def load_report_data(storage, study: str, storage_label: str) -> ReportData:
    studies = cell_studies(storage, study)
    if not studies:
        from .errors import WdstudyError

        raise WdstudyError(f"study={study!r}: no cells of this study in storage {storage_label}")
    cells = {name: s.user_attrs[R.CELL] for name, (s, _) in studies.items()}
    first = next(iter(studies.values()))[0].user_attrs
    trials = trials_frame(storage, study)
    evals = evaluations_frame(storage, study)
    progress = progress_frame(storage, study)
    objective = next(iter(cells.values()))["objective"]
    return ReportData(study, storage_label, cells, trials, evals, progress,
                      first.get(R.SPEC_YAML, ""), first.get(R.VERSIONS, {}), objective)


def _edge(value: float, lo: float, hi: float) -> str:
    if value is None or lo is None or not value > 0:
        return ""
    x = (math.log10(value) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return "low edge" if x <= EDGE else ("high edge" if x >= 1 - EDGE else "")


def compute_tables(d: ReportData) -> None:
    rows = []
    for name, cell in d.cells.items():
        t = d.trials[d.trials.cell == name] if not d.trials.empty else d.trials
        comp = t[t.state == "COMPLETE"] if len(t) else t
        e_all = d.evals[d.evals.cell == name] if not d.evals.empty else d.evals
        e = e_all[e_all.state == "COMPLETE"] if len(e_all) else e_all
        diverged = int((e_all.state == "PRUNED").sum()) if len(e_all) else 0
        best = chosen_trial(comp)
        lr_lo, lr_hi = cell["lr_range"]
        wd_range = cell["weight_decay_range"]
        sizes = comp.val_size.dropna() if len(comp) and "val_size" in comp else []
        val_size = int(sizes.iloc[0]) if len(sizes) else 0
        test = mean_ci(e.test_error) if len(e) else mean_ci([])
        gap = mean_ci(e.gap_error) if len(e) else mean_ci([])
        gap_loss = mean_ci(e.gap_loss) if len(e) else mean_ci([])
        train = mean_ci(e.train_error) if len(e) else mean_ci([])
        row = {
            "cell": name,
            "task": cell["task"]["name"],
            "optimizer": cell["optimizer"]["name"],
            "regularizer": cell["regularizer"],
            "best_val": None if best is None else best.value,
            "lr": None if best is None else best.lr,
            "weight_decay": None if best is None or wd_range is None else best.weight_decay,
            "lr_range": f"{lr_lo:.3g}–{lr_hi:.3g}",
            "weight_decay_range": "—" if wd_range is None else f"{wd_range[0]:.3g}–{wd_range[1]:.3g}",
            "lr_edge": "" if best is None else _edge(best.lr, lr_lo, lr_hi),
            "weight_decay_edge": "" if best is None or wd_range is None else _edge(best.weight_decay, *wd_range),
            "seeds": test.n,
            "diverged_seeds": diverged,
            "val_size": val_size,
            "val_se": binomial_se(None if best is None else best.value, val_size)
            if "error" in cell["objective"] else math.nan,
            "top5_spread": float(comp.nsmallest(5, "value").value.std(ddof=1)) if len(comp) >= 2 else math.nan,
            "test_error": test.mean, "test_error_low": test.low, "test_error_high": test.high,
            "train_error": train.mean,
            "gap_error": gap.mean, "gap_error_low": gap.low, "gap_error_high": gap.high,
            "gap_loss": gap_loss.mean, "gap_loss_low": gap_loss.low, "gap_loss_high": gap_loss.high,
        }
        rows.append(row)
    d.summary = pd.DataFrame(rows).sort_values(["task", "optimizer", "regularizer"], key=_reg_order)

    d.comparison = compare_arms(d)
    d.pruning = pruning_audit(d)

    coup_rows = []
    for name, cell in d.cells.items():
        if cell["weight_decay_range"] is None:
            continue
        top = top_trials(d, name)
        c = coupling(np.log10(top.lr), np.log10(top.weight_decay)) if len(top) else coupling([], [])
        coup_rows.append({"cell": name, "task": cell["task"]["name"], "optimizer": cell["optimizer"]["name"],
                          "regularizer": cell["regularizer"], "top_trials": c.n,
                          "slope": c.slope, "slope_low": c.slope_low, "slope_high": c.slope_high,
                          "spearman_rho": c.rho, "rho_low": c.rho_low, "rho_high": c.rho_high,
                          "intercept": c.intercept})
    d.coupling = pd.DataFrame(coup_rows)

    counts = d.progress.rename(columns={"cell": "cell"})[
        ["cell", "budget", "complete", "pruned", "fail", "running", "waiting", "eval_done", "eval_total"]
    ] if not d.progress.empty else pd.DataFrame()
    d.counts = counts

    imp_rows = []
    for name, cell in d.cells.items():
        if cell["weight_decay_range"] is None or d.trials.empty:
            continue
        t = d.trials[(d.trials.cell == name) & (d.trials.state == "COMPLETE")]
        if len(t) < 4:
            continue
        imp = _importance(t)
        imp_rows.append({"cell": name, "task": cell["task"]["name"], "optimizer": cell["optimizer"]["name"],
                         "regularizer": cell["regularizer"], **imp})
    d.importance = pd.DataFrame(imp_rows)

    d.status_lines = _status(d)


def _reg_order(col: pd.Series) -> pd.Series:
    if col.name == "regularizer":
        return col.map({"none": 0, "l2": 1, "decoupled": 2, "independent": 3, "l1": 4, "l1-decoupled": 5}).fillna(6)
    return col


def _eval_values(d: ReportData, task: str, opt: str, reg: str, col: str) -> list[float]:
    if d.evals.empty:
        return []
    e = d.evals[(d.evals.task == task) & (d.evals.optimizer == opt) & (d.evals.regularizer == reg)
                & (d.evals.state == "COMPLETE")]
    return [float(v) for v in e[col].dropna()]


#: (arm, reference) pairs compared where a study has both, as arm − reference
PAIRS = [("decoupled", "l2"), ("independent", "l2"), ("independent", "decoupled"), ("l1-decoupled", "l1"),
         ("l2", "none"), ("decoupled", "none"), ("independent", "none"), ("l1", "none"), ("l1-decoupled", "none")]


def _seed_values(d: ReportData, cell: str, col: str) -> dict[int, float]:
    if d.evals.empty:
        return {}
    e = d.evals[(d.evals.cell == cell) & (d.evals.state == "COMPLETE")]
    return {int(r.seed): float(getattr(r, col)) for r in e.itertuples() if getattr(r, col) is not None}


def _seed_problems(d: ReportData, cell: str) -> str:
    """'diverged on 1 of 5 seeds', 'failed on ...', or '' — every seed the arm did not complete."""
    seeds = d.cells[cell]["eval_seeds"]
    e = d.evals[d.evals.cell == cell] if not d.evals.empty else d.evals
    done = set(e[e.state == "COMPLETE"].seed.astype(int)) if len(e) else set()
    diverged = set(e[e.state == "PRUNED"].seed.astype(int)) if len(e) else set()
    failed = (set(e[e.state == "FAIL"].seed.astype(int)) if len(e) else set()) - done - diverged
    label = REG_LABEL.get(d.cells[cell]["regularizer"], d.cells[cell]["regularizer"])
    out = []
    if diverged:
        out.append(f"{label} diverged on {len(diverged)} of {len(seeds)} seeds")
    if failed:
        out.append(f"{label} failed on {len(failed)} of {len(seeds)} seeds")
    missing = len(seeds) - len(done) - len(diverged) - len(failed)
    if missing > 0 and len(e):
        out.append(f"{label} has {missing} of {len(seeds)} seeds still to run")
    return "; ".join(out)


def compare_arms(d: ReportData) -> pd.DataFrame:
    """Every arm against its references on the same evaluation seeds, with verdicts.

    Paired differences (arm − reference) of test error and gap; the paired t-test's p-values
    are Holm-corrected across all comparisons of the report.
    """
    if d.summary.empty:
        return pd.DataFrame()
    rows = []
    by_key = {(r.task, r.optimizer, r.regularizer): r for r in d.summary.itertuples()}
    for (task, opt) in sorted({(r.task, r.optimizer) for r in d.summary.itertuples()}):
        for arm, ref in PAIRS:
            ra, rb = by_key.get((task, opt, arm)), by_key.get((task, opt, ref))
            if ra is None or rb is None:
                continue
            ta, tb = _seed_values(d, ra.cell, "test_error"), _seed_values(d, rb.cell, "test_error")
            ga, gb = _seed_values(d, ra.cell, "gap_error"), _seed_values(d, rb.cell, "gap_error")
            common = sorted(set(ta) & set(tb))
            te = paired([ta[s] for s in common], [tb[s] for s in common])
            gp = paired([ga[s] for s in common if s in ga and s in gb], [gb[s] for s in common if s in ga and s in gb])
            noise = 2 * math.sqrt(ra.val_se ** 2 + rb.val_se ** 2) if not (math.isnan(ra.val_se) or math.isnan(rb.val_se)) else math.nan
            rows.append({
                "task": task, "optimizer": opt, "arm": arm, "reference": ref, "n_pairs": te.n,
                "test_error_diff": te.mean_diff, "test_error_low": te.low, "test_error_high": te.high,
                "test_error_t": te.t, "test_error_p": te.p_t, "p_wilcoxon": te.p_wilcoxon, "p_signflip": te.p_signflip,
                "effect_dz": te.effect_dz, "mde": te.mde,
                "gap_error_diff": gp.mean_diff, "gap_error_low": gp.low, "gap_error_high": gp.high, "gap_error_p": gp.p_t,
                "val_diff": (ra.best_val - rb.best_val) if ra.best_val is not None and rb.best_val is not None else math.nan,
                "val_noise": noise,
                "edges": "; ".join(x for x in (_edge_note(ra), _edge_note(rb)) if x),
                "seed_problems": "; ".join(x for x in (_seed_problems(d, ra.cell), _seed_problems(d, rb.cell)) if x),
            })
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out.test_error_p.tolist())
    out["verdict"] = [_verdict(r) for r in out.itertuples()]
    return out


def pruning_audit(d: ReportData) -> pd.DataFrame:
    """Where in its λ range the pruner stopped trials, against where completed trials lie.

    Per cell with pruned trials: the position of log λ within the range (0 = low edge,
    1 = high edge) of pruned and of completed trials, the Mann–Whitney U test of the two, and
    a warning when pruning fell mostly on one side (p < 0.05, or at least 80% of the pruned
    trials in one half of the range while the completed ones are not).
    """
    rows = []
    if d.trials.empty:
        return pd.DataFrame()
    from scipy.stats import mannwhitneyu

    for name, cell in d.cells.items():
        wd = cell["weight_decay_range"]
        t = d.trials[d.trials.cell == name]
        pruned = t[(t.state == "PRUNED") & (t.outcome == "pruned")]
        if wd is None or pruned.empty:
            continue
        done = t[t.state == "COMPLETE"]
        lo, hi = math.log10(wd[0]), math.log10(wd[1])
        pos = lambda x: (np.log10(x.astype(float)) - lo) / (hi - lo)  # noqa: E731
        pp, pc = pos(pruned.weight_decay), pos(done.weight_decay)
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
    return pd.DataFrame(rows)


def _edge_note(r) -> str:
    label = REG_LABEL.get(r.regularizer, r.regularizer)
    parts = [f"{label} lr at the {r.lr_edge}" if r.lr_edge else "", f"{label} λ at the {r.weight_decay_edge}" if r.weight_decay_edge else ""]
    return ", ".join(x for x in parts if x)


def _verdict(r) -> str:
    """One sentence: who wins by how much, or why it cannot be said; then every caveat."""
    a, b = REG_LABEL.get(r.arm, r.arm), REG_LABEL.get(r.reference, r.reference)
    caveats = [x for x in (r.seed_problems,) if x]
    if not math.isnan(r.val_diff) and not math.isnan(r.val_noise) and abs(r.val_diff) < r.val_noise:
        caveats.append(f"the chosen configurations are within the validation noise "
                       f"(Δ {100 * r.val_diff:+.2f} pts, noise ±{100 * r.val_noise:.2f})")
    tail = "".join(f"; {c}" for c in caveats)
    diff = (f"{a} − {b} = {100 * r.test_error_diff:+.2f} pts test error (95% CI {100 * r.test_error_low:+.2f} to "
            f"{100 * r.test_error_high:+.2f})") if r.n_pairs >= 2 else ""
    if r.edges:
        return f"inconclusive: widen the range ({r.edges}){tail}"
    if r.n_pairs < 2:
        return f"not tested: fewer than 2 seeds completed by both{tail}"
    if r.p_holm < ALPHA:
        who = a if r.test_error_diff < 0 else b
        return f"{who} wins: {diff}, Holm p = {r.p_holm:.2g}{tail}"
    return (f"no significant difference: {diff}, Holm p = {r.p_holm:.2g}; these {r.n_pairs} seeds detect "
            f"about {100 * r.mde:.2f} pts{tail}")


def top_trials(d: ReportData, cell: str) -> pd.DataFrame:
    """The best TOP_QUANTILE of a cell's complete trials (at least 5 where there are 5)."""
    t = d.trials[(d.trials.cell == cell) & (d.trials.state == "COMPLETE")] if not d.trials.empty else d.trials
    if t.empty:
        return t
    k = max(min(5, len(t)), int(math.ceil(TOP_QUANTILE * len(t))))
    return t.nsmallest(k, "value")


def _importance(t: pd.DataFrame) -> dict:
    """fANOVA importance of lr and λ for one cell, from its complete trials."""
    dists = {
        "lr": optuna.distributions.FloatDistribution(float(t.lr.min()) * 0.999, float(t.lr.max()) * 1.001, log=True),
        "weight_decay": optuna.distributions.FloatDistribution(
            float(t.weight_decay.min()) * 0.999, float(t.weight_decay.max()) * 1.001, log=True),
    }
    study = optuna.create_study(direction="minimize")
    study.add_trials([
        optuna.trial.create_trial(params={"lr": r.lr, "weight_decay": r.weight_decay}, distributions=dists,
                                  value=r.value)
        for r in t.itertuples()
    ])
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=32, max_depth=16, seed=0), normalize=True)
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
                     "with the same parameters, a configuration failing 4 times was replaced by a new proposal, "
                     "and the reasons are in trials.csv (reason, fail_kind).")
    for r in (d.pruning.itertuples() if len(d.pruning) else []):
        if r.warning:
            lines.append(f"Cell {r.cell}: {r.warning}.")
    no_eval = p[(p.done >= p.budget) & (p.eval_total == 0)]
    for r in no_eval.itertuples():
        lines.append(f"Cell {r.cell}: every search trial was pruned or diverged; nothing to evaluate.")
    return lines


# -- figures ---------------------------------------------------------------------------------


def fig_gap(d: ReportData) -> Figure | None:
    s = d.summary.dropna(subset=["gap_error"])
    if s.empty:
        return None
    opts = list(dict.fromkeys(s.optimizer))
    tasks = list(dict.fromkeys(d.summary.task))
    regs = [r for r in ("none", "l2", "decoupled") if r in set(s.regularizer)]
    fig, axes = plt.subplots(2, len(opts), figsize=(4.2 * len(opts) + 1.5, 6.4), squeeze=False, sharex=True)
    width = 0.8 / max(1, len(regs))
    for j, opt in enumerate(opts):
        for i, (col, ylabel) in enumerate((("gap_error", "generalization gap\n(test − train error, points)"),
                                           ("test_error", "test error (%)"))):
            ax = axes[i][j]
            for k, reg in enumerate(regs):
                g = s[(s.optimizer == opt) & (s.regularizer == reg)].set_index("task").reindex(tasks)
                x = np.arange(len(tasks)) + (k - (len(regs) - 1) / 2) * width
                y = 100 * g[col].to_numpy(dtype=float)
                lo = 100 * g[f"{col}_low"].to_numpy(dtype=float)
                hi = 100 * g[f"{col}_high"].to_numpy(dtype=float)
                err = np.vstack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])
                ax.bar(x, y, width * 0.9, color=PALETTE[reg], alpha=0.85, label=REG_LABEL[reg])
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
            ax.set_xticks(np.arange(len(tasks)), tasks, rotation=15)
            ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(f"optimizer: {opt}")
            ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(title="regularizer", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Generalization gap and test error of each cell's chosen configuration")
    fig.tight_layout()
    n = int(d.summary.seeds.max()) if len(d.summary) else 0
    return Figure("gap", "Generalization gap", (
        f"Bars are means over the evaluation seeds (n = {n} per cell), whiskers 95% Student-t intervals. "
        "Lower is better in both rows; compare the colours within a task."), fig)


def fig_landscapes(d: ReportData) -> list[Figure]:
    out = []
    t = d.trials
    if t.empty:
        return out
    for (task, opt), g in d.summary.groupby(["task", "optimizer"], sort=True):
        regs = [r for r in ("l2", "decoupled") if r in set(g.regularizer)]
        if not regs:
            continue
        cells = {r: g[g.regularizer == r].cell.iloc[0] for r in regs}
        done = {r: t[(t.cell == c) & (t.state == "COMPLETE")] for r, c in cells.items()}
        values = pd.concat([x.value for x in done.values()])
        if values.empty:
            continue
        vmin, vmax = float(values.min()), float(values.quantile(0.95))
        if vmax <= vmin:
            vmax = vmin + 1e-3
        fig, axes = plt.subplots(1, len(regs), figsize=(5.4 * len(regs) + 1.2, 4.6), squeeze=False,
                                 layout="constrained")
        mappable = None
        for j, reg in enumerate(regs):
            ax = axes[0][j]
            cell = d.cells[cells[reg]]
            allt = t[t.cell == cells[reg]]
            mappable = _landscape_panel(ax, done[reg], allt, cell, vmin, vmax) or mappable
            ax.set_title(f"{REG_LABEL[reg]}")
            ax.set_xlabel("log10 learning rate")
            ax.set_ylabel(f"log10 λ ({REG_LABEL[reg]})")
        if mappable is not None:
            cb = fig.colorbar(mappable, ax=axes[0].tolist(), shrink=0.9)
            cb.set_label(f"validation {d.objective.replace('val_', '')}")
        fig.suptitle(f"(η, λ) landscape · {task} · {opt}")
        sampler = next(iter(d.cells.values()))["sampler"]
        how = ("Heatmap of the grid (mean over repeated points)." if sampler == "grid" else
               "Surface linearly interpolated between the completed trials (blue-rimmed dots; × pruned, ★ best); "
               "blank where no trial constrains it.")
        out.append(Figure(f"landscape_{task}_{opt}", f"Landscape: {task} · {opt}", (
            f"{how} One colour scale for both panels (clipped at the 95th percentile). A diagonal valley "
            "means the best λ moves with the learning rate (coupled); an axis-aligned basin means they "
            "can be tuned separately."), fig))
    return out


def _landscape_panel(ax, done: pd.DataFrame, allt: pd.DataFrame, cell: dict, vmin: float, vmax: float):
    lx = np.log10(cell["lr_range"])
    ly = np.log10(cell["weight_decay_range"])
    ax.set_xlim(*lx)
    ax.set_ylim(*ly)
    if done.empty:
        ax.text(0.5, 0.5, "no completed trial", ha="center", va="center", transform=ax.transAxes)
        return None
    x, y, v = np.log10(done.lr.to_numpy(float)), np.log10(done.weight_decay.to_numpy(float)), done.value.to_numpy(float)
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    mappable = None
    if cell["sampler"] == "grid":
        grid = done.assign(x=x, y=y).groupby(["y", "x"]).value.mean().unstack()
        xs, ys = grid.columns.to_numpy(), grid.index.to_numpy()
        ex, ey = _edges(xs), _edges(ys)
        mappable = ax.pcolormesh(ex, ey, grid.to_numpy(), cmap=cmap, vmin=vmin, vmax=vmax, shading="flat")
        ax.set_xlim(ex[0], ex[-1])  # whole cells around the grid points
        ax.set_ylim(ey[0], ey[-1])
    elif len(done) >= 4 and np.ptp(x) > 0 and np.ptp(y) > 0:
        from scipy.interpolate import griddata

        gx, gy = np.meshgrid(np.linspace(*lx, 80), np.linspace(*ly, 80))
        try:
            gz = griddata((x, y), np.clip(v, vmin, vmax), (gx, gy), method="linear")
            mappable = ax.pcolormesh(gx, gy, gz, cmap=cmap, vmin=vmin, vmax=vmax, shading="auto", rasterized=True)
        except Exception:  # degenerate point sets (collinear): points only
            mappable = None
    sc = ax.scatter(x, y, c=np.clip(v, vmin, vmax), cmap=cmap, vmin=vmin, vmax=vmax, s=26,
                    edgecolors="#1f77b4", linewidths=1.0, zorder=3)
    pr = allt[allt.state == "PRUNED"]
    if len(pr):
        ax.scatter(np.log10(pr.lr.astype(float)), np.log10(pr.weight_decay.astype(float)), marker="x",
                   c="#555555", s=18, linewidths=0.8, zorder=3, label="pruned")
    b = done.loc[done.value.idxmin()]
    ax.scatter([math.log10(b.lr)], [math.log10(b.weight_decay)], marker="*", s=180, c="gold",
               edgecolors="black", linewidths=0.8, zorder=4)
    return mappable or sc


def _edges(centers: np.ndarray) -> np.ndarray:
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mid = (centers[:-1] + centers[1:]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])


def fig_coupling(d: ReportData) -> Figure | None:
    if d.coupling.empty or d.trials.empty:
        return None
    keys = list(dict.fromkeys(zip(d.coupling.task, d.coupling.optimizer)))
    regs = [r for r in ("l2", "decoupled") if r in set(d.coupling.regularizer)]
    fig, axes = plt.subplots(len(keys), len(regs), figsize=(4.6 * len(regs) + 0.6, 3.4 * len(keys)),
                             squeeze=False)
    for i, (task, opt) in enumerate(keys):
        for j, reg in enumerate(regs):
            ax = axes[i][j]
            row = d.coupling[(d.coupling.task == task) & (d.coupling.optimizer == opt) & (d.coupling.regularizer == reg)]
            if row.empty:
                ax.axis("off")
                continue
            r = row.iloc[0]
            cell = d.cells[r.cell]
            allc = d.trials[(d.trials.cell == r.cell) & (d.trials.state == "COMPLETE")]
            top = top_trials(d, r.cell)
            ax.scatter(np.log10(allc.lr.astype(float)), np.log10(allc.weight_decay.astype(float)), s=10,
                       c="#cccccc", label="other trials")
            ax.scatter(np.log10(top.lr.astype(float)), np.log10(top.weight_decay.astype(float)), s=26,
                       c=PALETTE[reg], label=f"best {int(TOP_QUANTILE * 100)}%")
            if not math.isnan(r.slope):
                xs = np.array(np.log10(cell["lr_range"]))
                ax.plot(xs, r.intercept + r.slope * xs, color="black", lw=1.2,
                        label=f"slope {r.slope:.2f} [{r.slope_low:.2f}, {r.slope_high:.2f}]")
            ax.set_xlim(*np.log10(cell["lr_range"]))
            ax.set_ylim(*np.log10(cell["weight_decay_range"]))
            ax.set_title(f"{task} · {opt} · {REG_LABEL[reg]}   ρ = {_num(r.spearman_rho)}", fontsize=10)
            ax.set_xlabel("log10 learning rate")
            ax.set_ylabel("log10 λ")
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Coupling: where the best trials sit in the (η, λ) plane")
    fig.tight_layout()
    return Figure("coupling", "Coupling of λ and the learning rate", (
        f"Coloured: the best {int(TOP_QUANTILE * 100)}% of each cell's completed trials (at least 5), with the "
        "least-squares line of log10 λ on log10 η. A slope near −1 means the best λ scales inversely with the "
        "learning rate (coupled, as L2 inside Adam is expected to be); near 0 means independent. "
        "ρ is Spearman's rank correlation."), fig)


def fig_dynamics(d: ReportData, storage) -> list[Figure]:
    out = []
    hist = _eval_histories(d, storage)
    if hist.empty:
        return out
    for (task, opt), g in hist.groupby(["task", "optimizer"], sort=True):
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for reg, h in g.groupby("regularizer"):
            color = PALETTE[reg]
            cols = [c for c in ("train_loss_running", "val_loss", "train_error_running", "val_error", "weight_norm")
                    if c in h]
            stats = h.groupby("epoch")[cols].agg(["mean", "min", "max"])
            panels = [(axes[0], c, 1) for c in ("train_loss_running", "val_loss")]
            panels += [(axes[1], c, 100) for c in ("train_error_running", "val_error")]
            panels += [(axes[2], "weight_norm", 1)]
            for ax, col, scale in panels:
                if col not in stats:
                    continue
                m = stats[col]
                ls = "--" if col.startswith("train") else "-"
                what = "" if ax is axes[2] else (" train" if col.startswith("train") else " val")
                ax.plot(m.index, scale * m["mean"], color=color, ls=ls, label=f"{REG_LABEL[reg]}{what}")
                ax.fill_between(m.index, scale * m["min"], scale * m["max"], color=color, alpha=0.15, lw=0)
        axes[0].set_ylabel("cross-entropy")
        axes[0].set_title("loss")
        axes[1].set_ylabel("error (%)")
        axes[1].set_title("error")
        axes[2].set_ylabel("‖w‖ of regularized weights")
        axes[2].set_title("regularized-weight norm")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"Training dynamics of the chosen configurations · {task} · {opt}")
        fig.tight_layout()
        n = int(g.groupby(["regularizer", "epoch"]).size().max())
        out.append(Figure(f"dynamics_{task}_{opt}", f"Training dynamics: {task} · {opt}", (
            f"Mean over the {n} evaluation seeds, band = min–max. Dashed: running average over the epoch's "
            "minibatches in train mode; solid: validation pass in eval mode. Right: norm of the regularized "
            "weights at the end of each epoch."), fig))
    return out


def _eval_histories(d: ReportData, storage) -> pd.DataFrame:
    rows = []
    for name, (s, ev) in cell_studies(storage, d.study).items():
        if ev is None:
            continue
        cell = s.user_attrs[R.CELL]
        for t in storage.get_all_trials(ev._study_id, deepcopy=False):
            if t.state != optuna.trial.TrialState.COMPLETE:
                continue
            for h in t.user_attrs.get(R.HISTORY, []):
                rows.append({"cell": name, "task": cell["task"]["name"], "optimizer": cell["optimizer"]["name"],
                             "regularizer": cell["regularizer"], "seed": t.user_attrs.get(R.SEED), **h})
    return pd.DataFrame(rows)


def fig_importance(d: ReportData) -> Figure | None:
    if d.importance.empty:
        return None
    imp = d.importance.assign(label=lambda x: x.task + " · " + x.optimizer + " · " + x.regularizer.map(REG_LABEL))
    long = imp.melt(id_vars=["label"], value_vars=["lr", "weight_decay"], var_name="parameter", value_name="importance")
    long["parameter"] = long.parameter.map({"lr": "learning rate", "weight_decay": "λ"})
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * len(imp) + 1.6))
    sns.barplot(data=long, y="label", x="importance", hue="parameter", ax=ax, palette=["#edae49", "#30638e"])
    ax.set_xlabel("fANOVA importance (fraction of variance of the objective)")
    ax.set_ylabel("")
    ax.set_xlim(0, 1)
    ax.set_title("Hyperparameter importance per cell")
    ax.legend(title="parameter", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return Figure("importance", "Hyperparameter importance", (
        "Optuna's fANOVA importance, from each cell's completed search trials: the share of the objective's "
        "variance explained by the learning rate and by λ (they sum to one per cell)."), fig)


# -- text ------------------------------------------------------------------------------------


def _num(x, fmt: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _ci_pts(mean, lo, hi, unit: str = "") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if isinstance(lo, float) and math.isnan(lo):
        return f"{100 * mean:+.2f}{unit}"
    return f"{100 * mean:+.2f} ± {100 * (hi - lo) / 2:.2f}{unit}"


def summary_rows(d: ReportData) -> list[list[str]]:
    rows = []
    for r in d.summary.itertuples():
        warn = "; ".join(w for w in (
            f"lr at {r.lr_edge}" if r.lr_edge else "", f"λ at {r.weight_decay_edge}" if r.weight_decay_edge else "",
            f"diverged on {r.diverged_seeds} of {len(d.cells[r.cell]['eval_seeds'])} seeds (named in the verdicts)"
            if r.diverged_seeds else "") if w)
        rows.append([
            r.task, r.optimizer, REG_LABEL[r.regularizer], _pct(r.best_val) if "error" in d.objective else _num(r.best_val),
            f"{_pct(r.test_error)} ± {100 * (r.test_error_high - r.test_error_low) / 2:.2f}" if r.seeds > 1 else _pct(r.test_error),
            _pct(r.train_error),
            _ci_pts(r.gap_error, r.gap_error_low, r.gap_error_high, " pts"),
            "—" if r.gap_loss is None or math.isnan(r.gap_loss) else (
                f"{r.gap_loss:+.3f} ± {(r.gap_loss_high - r.gap_loss_low) / 2:.3f}" if r.seeds > 1 else f"{r.gap_loss:+.3f}"),
            f"{_num(r.lr)} ({r.lr_range})",
            "—" if r.regularizer == "none" else f"{_num(r.weight_decay)} ({r.weight_decay_range})",
            str(r.seeds), warn or "",
        ])
    return rows


SUMMARY_HEAD = ["task", "optimizer", "regularizer", "best val", "test error (95% CI)", "train error",
                "gap: error", "gap: loss", "lr (range)", "λ (range)", "seeds", "warning"]


def comparison_rows(d: ReportData) -> list[list[str]]:
    rows = []
    for r in d.comparison.itertuples():
        te = "—" if math.isnan(r.test_error_diff) else (
            f"{100 * r.test_error_diff:+.2f} [{100 * r.test_error_low:+.2f}, {100 * r.test_error_high:+.2f}]"
            if not math.isnan(r.test_error_low) else f"{100 * r.test_error_diff:+.2f}")
        gp = "—" if math.isnan(r.gap_error_diff) else f"{100 * r.gap_error_diff:+.2f}"
        rows.append([r.task, r.optimizer, f"{REG_LABEL.get(r.arm, r.arm)} − {REG_LABEL.get(r.reference, r.reference)}",
                     str(r.n_pairs), te, _num(r.p_holm, ".2g"), gp, r.verdict])
    return rows


COMPARISON_HEAD = ["task", "optimizer", "comparison", "paired seeds", "Δ test error, pts [95% CI]", "p (Holm)",
                   "Δ gap, pts", "verdict"]


def coupling_rows(d: ReportData) -> list[list[str]]:
    out = []
    for (task, opt), g in d.coupling.groupby(["task", "optimizer"], sort=True):
        row = [task, opt]
        for reg in ("l2", "decoupled"):
            r = g[g.regularizer == reg]
            if r.empty:
                row += ["—", "—"]
                continue
            r = r.iloc[0]
            row += [f"{_num(r.slope, '.2f')} [{_num(r.slope_low, '.2f')}, {_num(r.slope_high, '.2f')}]",
                    f"{_num(r.spearman_rho, '.2f')} [{_num(r.rho_low, '.2f')}, {_num(r.rho_high, '.2f')}]"]
        out.append(row)
    return out


COUPLING_HEAD = ["task", "optimizer", "L2: slope [95% CI]", "L2: ρ [95% CI]", "decoupled: slope [95% CI]",
                 "decoupled: ρ [95% CI]"]


def overview_lines(d: ReportData) -> list[str]:
    cells = list(d.cells.values())
    tasks = sorted({c["task"]["name"] for c in cells})
    opts = sorted({c["optimizer"]["name"] for c in cells})
    regs = [r for r in ("none", "l2", "decoupled") if r in {c["regularizer"] for c in cells}]
    c0 = cells[0]
    wall = d.trials.wall_time_s.sum() + (d.evals.wall_time_s.sum() if not d.evals.empty else 0) if not d.trials.empty else 0
    devices = sorted(set(d.trials.device.dropna()) | (set(d.evals.device.dropna()) if not d.evals.empty else set())) \
        if not d.trials.empty else []
    per_reg = {REG_LABEL[c["regularizer"]]: c["budget"] for c in cells}
    budgets = (str(c0["budget"]) if len(set(per_reg.values())) == 1
               else ", ".join(f"{b} ({r})" for r, b in per_reg.items()))
    ranges = "; ".join(
        f"{REG_LABEL[c['regularizer']]}: {c['weight_decay_range'][0]:.3g}–{c['weight_decay_range'][1]:.3g}"
        for c in {c["regularizer"]: c for c in cells}.values() if c["weight_decay_range"])
    return [
        f"Tasks: {', '.join(tasks)}. Optimizers: {', '.join(opts)}. Regularizers: {', '.join(REG_LABEL[r] for r in regs)}.",
        f"Search: {c0['sampler']} sampler, seed {c0['seed']}, {budgets} trials per cell, pruner {c0['pruner']}, "
        f"objective {c0['objective']}; learning rate {c0['lr_range'][0]:.3g}–{c0['lr_range'][1]:.3g} (log); λ {ranges} (log).",
        f"Schedule: {c0['schedule']}; {'all parameters regularized' if c0['decay_all'] else 'biases and normalization parameters not regularized'}.",
        f"Evaluation: best configuration of each cell retrained with seeds {', '.join(map(str, c0['eval_seeds']))} "
        "and measured on the test split (never seen by the search). Intervals are 95% Student-t. "
        "Arms are compared on the same seeds (same initialization and data order): the paired difference "
        "with its 95% interval and paired t-test, Holm-corrected across every comparison in this report "
        "(Wilcoxon and sign-flip p-values in tables/comparison.csv); a chosen λ or learning rate at an edge "
        "of its range makes a comparison inconclusive.",
        f"Compute: {wall / 3600:.2f} h of training in total on {', '.join(devices) or '—'}.",
    ]


def winners_lines(d: ReportData) -> list[str]:
    return [f"{r.task} · {r.optimizer}: {r.verdict}." for r in d.comparison.itertuples()]


# -- output ----------------------------------------------------------------------------------


@dataclass
class ReportPaths:
    html: Path
    pdf: Path
    figures: list[Path]
    tables: list[Path]


def build_report(storage, study: str, out_dir: Path, storage_label: str) -> ReportPaths:
    """Write report.html, report.pdf, figures/ and tables/ for ``study`` into ``out_dir``."""
    d = load_report_data(storage, study, storage_label)
    compute_tables(d)
    figures: list[Figure] = []
    for f in [fig_gap(d), *fig_landscapes(d), fig_coupling(d), *fig_dynamics(d, storage), fig_importance(d)]:
        if f is not None:
            figures.append(f)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir, tab_dir = out_dir / "figures", out_dir / "tables"
    fig_dir.mkdir(exist_ok=True)
    tab_dir.mkdir(exist_ok=True)

    tables = []
    for name, df in (("summary", d.summary), ("comparison", d.comparison), ("pruning", d.pruning), ("coupling", d.coupling),
                     ("importance", d.importance), ("trial_counts", d.counts)):
        p = tab_dir / f"{name}.csv"
        df.to_csv(p, index=False)
        tables.append(p)

    html_path, pdf_path = out_dir / "report.html", out_dir / "report.pdf"
    pdf_proc = _in_child(render_pdf, d, figures, pdf_path)  # the PDF in a second process, if one can fork
    pngs: dict[str, bytes] = {}
    fig_paths = []
    for f in figures:  # rendered once, for the PNG file and the HTML
        buf = io.BytesIO()
        f.fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight")
        pngs[f.key] = buf.getvalue()
        (fig_dir / f"{f.key}.png").write_bytes(pngs[f.key])
        fig_paths.append(fig_dir / f"{f.key}.png")
    html_path.write_text(render_html(d, figures, {k: base64.b64encode(v).decode() for k, v in pngs.items()}))
    if pdf_proc is None:
        render_pdf(d, figures, pdf_path)
    else:
        pdf_proc.join()
        if pdf_proc.exitcode != 0:
            raise RuntimeError(f"writing {pdf_path} failed in its process (exit code {pdf_proc.exitcode})")
    for f in figures:
        plt.close(f.fig)
    return ReportPaths(html_path, pdf_path, fig_paths, tables)


SECTIONS = [("summary", "1. Summary"), ("gap", "2. Generalization gap"), ("landscapes", "3. Landscapes"),
            ("coupling", "4. Coupling"), ("dynamics", "5. Training dynamics"), ("importance", "6. Importance"),
            ("appendix", "7. Appendix")]

#: (section id, figure-key prefix, text when the section has no figure)
FIGURE_SECTIONS = [("gap", "gap", "No evaluation runs yet."), ("landscapes", "landscape_", "No completed trials yet."),
                   ("coupling", "coupling", "Too few completed trials."), ("dynamics", "dynamics_", "No evaluation runs yet."),
                   ("importance", "importance", "Too few completed trials.")]

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:left;white-space:nowrap}th{background:#f4f4f4}
tr:nth-child(even) td{background:#fafafa}.warn{color:#b00;font-weight:600}
.status{background:#fff4e5;border-left:4px solid #f0a500;padding:.6em 1em}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;max-width:980px}pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.85em}
nav a{margin-right:1em}
"""


def _table_html(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    out = ["<table><thead><tr>", *(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for h, v in zip(head, r):
            cls = ' class="warn"' if h == "warning" and v else ""
            cells.append(f"<td{cls}>{e(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _figure_html(f: Figure, pngs: dict) -> str:
    e = html.escape
    return (f'<figure id="fig-{e(f.key)}"><img alt="{e(f.title)}" src="data:image/png;base64,{pngs[f.key]}">'
            f"<figcaption><b>{e(f.title)}.</b> {e(f.caption)}</figcaption></figure>")


def render_html(d: ReportData, figures: list[Figure], pngs: dict) -> str:
    e = html.escape
    by = lambda prefix: [f for f in figures if f.key.startswith(prefix)]  # noqa: E731
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>wdstudy report: {e(d.study)}</title><style>{CSS}</style></head><body>",
             f"<h1>L2 regularization vs decoupled weight decay — study <code>{e(d.study)}</code></h1>",
             f"<p>Generated {e(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))} by wdstudy from the storage "
             f"<code>{e(d.storage_label)}</code>.</p>",
             "<nav>" + "".join(f'<a href="#{k}">{e(t)}</a>' for k, t in SECTIONS) + "</nav>"]
    if d.status_lines:
        parts.append('<div class="status">' + "".join(f"<p>{e(x)}</p>" for x in d.status_lines) + "</div>")
    parts.append('<h2 id="summary">1. Summary</h2>')
    parts += [f"<p>{e(x)}</p>" for x in overview_lines(d)]
    if len(d.comparison):
        parts.append("<p><b>Which method won where:</b></p><ul>" +
                     "".join(f"<li>{e(x)}</li>" for x in winners_lines(d)) + "</ul>")
    parts.append(_table_html(SUMMARY_HEAD, summary_rows(d)))
    parts.append("<p>best val: the search objective of the best trial (validation split). test error and gaps: "
                 "mean ± half-width of the 95% interval over evaluation seeds; gap = test − train, in error "
                 "points and in cross-entropy. A warning marks a chosen value within 5% (of the log-range) of "
                 "an edge of its searched range (the optimum may lie outside it), and evaluation seeds that diverged "
                 "(left out of the means and intervals, and named in every verdict that uses them).</p>")
    if len(d.comparison):
        parts.append(_table_html(COMPARISON_HEAD, comparison_rows(d)))
    titles = dict(SECTIONS)
    for key, prefix, empty in FIGURE_SECTIONS:
        parts.append(f'<h2 id="{key}">{e(titles[key])}</h2>')
        parts += [_figure_html(f, pngs) for f in by(prefix)] or [f"<p>{e(empty)}</p>"]
        if key == "coupling" and len(d.coupling):
            parts.append(_table_html(COUPLING_HEAD, coupling_rows(d)))
    parts.append('<h2 id="appendix">7. Appendix</h2>')
    parts.append("<h3>Trial counts by state</h3>")
    parts.append(_table_html(list(d.counts.columns), [[str(v) for v in r] for r in d.counts.itertuples(index=False)]))
    parts.append(f"<h3>Storage</h3><p><code>{e(d.storage_label)}</code></p>")
    parts.append("<h3>Package versions</h3>" + _table_html(["package", "version"], [[k, v] for k, v in d.versions.items()]))
    parts.append(f"<h3>Study spec as run</h3><pre>{e(d.spec_yaml)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- PDF ---------------------------------------------------------------------------------------


def _text_page(pdf: PdfPages, title: str, blocks: list[tuple[str, str]]) -> None:
    """Pages of text: blocks are (kind, text) with kind 'p' (wrapped prose) or 'pre' (monospace)."""
    lines: list[tuple[str, str]] = []
    for kind, text in blocks:
        if kind == "p":
            for para in text.split("\n"):
                lines += [("p", w) for w in textwrap.wrap(para, 150)] or [("p", "")]
        else:
            lines += [("pre", ln) for ln in text.split("\n")]
        lines.append(("p", ""))
    per_page = 52
    for start in range(0, max(1, len(lines)), per_page):
        fig = plt.figure(figsize=(11.69, 8.27))  # A4 landscape
        fig.text(0.04, 0.95, title + ("" if start == 0 else " (continued)"), fontsize=15, weight="bold")
        y = 0.91
        for kind, ln in lines[start : start + per_page]:
            fig.text(0.04, y, ln, fontsize=7.6 if kind == "pre" else 8.8,
                     family="monospace" if kind == "pre" else "sans-serif")
            y -= 0.0165
        pdf.savefig(fig)
        plt.close(fig)


def _fixed_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def _figure_page(pdf: PdfPages, title: str, caption: str, fig: plt.Figure) -> None:
    """The figure itself as a vector page (sized to it), its title above and its caption below."""
    w, _ = fig.get_size_inches()
    lines = textwrap.wrap(caption, max(60, int(w * 15)))
    fig.text(0.0, 1.02, title, fontsize=13, weight="bold", ha="left", va="bottom", transform=fig.transFigure)
    fig.text(0.0, -0.02, "\n".join(lines), fontsize=8.5, ha="left", va="top", transform=fig.transFigure)
    pdf.savefig(fig, bbox_inches="tight", pad_inches=0.4, dpi=200)  # rasterized parts at 200 dpi


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a forked process (it inherits the figures already drawn); None where
    fork is unavailable. The PDF and the PNGs are then written by two cores at once."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        return None
    proc = mp.get_context("fork").Process(target=fn, args=args, daemon=True)
    proc.start()
    return proc


def render_pdf(d: ReportData, figures: list[Figure], path: Path) -> None:
    with PdfPages(path) as pdf:
        blocks = [("p", f"Study {d.study}, read from {d.storage_label}, on "
                        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")]
        blocks += [("p", "STATUS: " + x) for x in d.status_lines]
        blocks += [("p", x) for x in overview_lines(d)]
        if len(d.comparison):
            blocks.append(("p", "Which method won where:"))
            blocks += [("p", "  • " + x) for x in winners_lines(d)]
        rows = summary_rows(d)
        blocks.append(("pre", _fixed_table(SUMMARY_HEAD[:-1], [r[:-1] for r in rows])))
        warns = [f"{r[0]} · {r[1]} · {r[2]}: {r[-1]}" for r in rows if r[-1]]
        if warns:
            blocks.append(("p", "Warnings: " + "; ".join(warns)))
        if len(d.comparison):
            blocks.append(("pre", _fixed_table(COMPARISON_HEAD[:-1], [r[:-1] for r in comparison_rows(d)])))
        _text_page(pdf, f"1. Summary — L2 vs decoupled weight decay ({d.study})", blocks)
        section_of = {"gap": "2.", "landscape_": "3.", "coupling": "4.", "dynamics_": "5.", "importance": "6."}
        for f in figures:
            num = next(v for k, v in section_of.items() if f.key.startswith(k))
            _figure_page(pdf, f"{num} {f.title}", f.caption, f.fig)
        if len(d.coupling):
            _text_page(pdf, "4. Coupling table", [("pre", _fixed_table(COUPLING_HEAD, coupling_rows(d)))])
        appendix = [("pre", _fixed_table(list(d.counts.columns),
                                         [[str(v) for v in r] for r in d.counts.itertuples(index=False)])),
                    ("p", f"Storage: {d.storage_label}"),
                    ("pre", "\n".join(f"{k:<20} {v}" for k, v in d.versions.items())),
                    ("p", "Study spec as run:"), ("pre", d.spec_yaml)]
        _text_page(pdf, "7. Appendix", appendix)
