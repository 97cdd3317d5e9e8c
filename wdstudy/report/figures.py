"""The report's figures, drawn with matplotlib and seaborn from the tables of :mod:`.tables`.

Every function takes the :class:`~.tables.ReportData` and returns :class:`Figure` objects (or
none when there is nothing to draw). Error rates are shown in %, their differences in points;
a regression task's error is its mean squared error, shown and labelled as MSE (each panel by
its task); arms keep one order and one colour everywhere (:mod:`.style`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .. import records as R
from ..arms import WEIGHT_DECAYS
from ..stats import mean_ci, tuning_curve
from .style import arms_in, color, label, shrink
from .tables import NEAR_LR, ReportData, search_order, top_trials

#: matplotlib settings of every report figure, applied while it is drawn and saved (:func:`drawing`)
STYLE = {"pdf.fonttype": 3, "figure.dpi": 100, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8,
         "axes.spines.top": False, "axes.spines.right": False}
WIDTH = 7.4  # inches: the text width of an A4 page with 15 mm margins
CMAP = "rocket_r"


@dataclass
class Figure:
    key: str
    section: str
    title: str
    caption: str
    alt: str
    fig: plt.Figure

    def __post_init__(self) -> None:
        # keys become file names and HTML ids: keep them to a safe alphabet
        self.key = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.key)


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """Where a report figure is drawn and saved: on the Agg canvas (no display needed), with
    :data:`STYLE` (the settings of the caller's matplotlib are left as they were)."""
    matplotlib.use("Agg")
    with matplotlib.rc_context(STYLE):
        yield


def panels(axes, groups: list[tuple[str, str]], arms: list[str], frame: pd.DataFrame) -> Iterator[tuple]:
    """The panels of a grid with one row per (task, optimizer) of ``groups`` and one column per arm, each
    with its row of ``frame`` (``task``, ``optimizer``, ``regularizer`` columns): ``(ax, row)``. A panel
    whose arm has no row in ``frame`` is switched off."""
    for (task, opt), line in zip(groups, axes):
        for arm, ax in zip(arms, line):
            rows = frame[(frame.task == task) & (frame.optimizer == opt) & (frame.regularizer == arm)]
            if rows.empty:
                ax.axis("off")
                continue
            yield ax, rows.iloc[0]


def _fit(fig: plt.Figure, top: float = 1.0) -> None:
    """Lay the figure out once, now, at the PNG's resolution (text is hinted, so it is wider at 150 dpi
    than at 100 in proportion: laid out at 100, long tick labels were cut at the PNG's left edge);
    saving it as PNG and as PDF then draws it once each."""
    fig.set_dpi(PNG_DPI)
    fig.tight_layout(rect=(0, 0, 1, top))
    for ax in fig.axes:
        ax.minorticks_off()  # log axes: hundreds of unlabelled ticks cost more to draw than they tell


def _cells_of(d: ReportData, task: str, opt: str) -> dict[str, str]:
    s = d.summary[(d.summary.task == task) & (d.summary.optimizer == opt)]
    return {r.regularizer: r.cell for r in s.itertuples()}


def _metric_name(d: ReportData, task: str) -> str:
    return d.objective_name(task)


def _scale(d: ReportData, task: str) -> float:
    """Display factor of ``task``'s objective values: 100 for error rates (%), else 1."""
    return 100.0 if d.rate(task) else 1.0


def _unit(d: ReportData, task: str) -> str:
    return " (%)" if d.rate(task) else ""


def _with_note(d: ReportData, caption: str) -> str:
    """A caption, followed by which tasks' error is an MSE (when the study has any)."""
    note = d.regression_note()
    return f"{caption} {note}" if note else caption


# -- 1. the answer ---------------------------------------------------------------------------


def fig_differences(d: ReportData) -> Figure | None:
    """Forest plot: every paired comparison's mean difference in test error and in generalization
    gap, each with its 95% interval."""
    c = d.comparison
    if c.empty or c.test_error_diff.isna().all():
        return None
    c = c.reset_index(drop=True)
    # one block of rows per metric: error-rate differences in points and MSE differences never share an axis
    blocks = [(m, c[[d.metric(t).key == m.key for t in c.task]].reset_index(drop=True)) for m in d.metrics()]
    blocks = [(m, b) for m, b in blocks if len(b)]
    fig, grid = plt.subplots(len(blocks), 2, figsize=(WIDTH, 0.3 * len(c) + 1.2 + 0.6 * (len(blocks) - 1)),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 0.8],
                                                         "height_ratios": [len(b) + 1.5 for _, b in blocks]})
    for axes, (metric, cb) in zip(grid, blocks):
        sc = metric.scale
        y = np.arange(len(cb))[::-1]
        for ax, col, xlabel in ((axes[0], "test_error", metric.diff_axis("test")),
                                (axes[1], "gap_error", "Δ gap: test − train "
                                 + ("error (points)" if metric.is_rate else "MSE"))):
            for yi, r in zip(y, cb.itertuples()):
                solid = r.decision_code in ("A better", "B better") and not r.edges
                hollow = r.decision_code == "undecided" or r.edges or r.n_pairs < 2
                mean, lo, hi = getattr(r, f"{col}_diff"), getattr(r, f"{col}_low"), getattr(r, f"{col}_high")
                if not math.isnan(lo):
                    ax.plot([sc * lo, sc * hi], [yi, yi], color=color(r.arm), lw=2 if solid else 1.2)
                if not math.isnan(mean):
                    ax.plot([sc * mean], [yi], "o", ms=5.5, color=color(r.arm), mfc="white" if hollow else color(r.arm))
            ax.axvline(0, color="black", lw=0.8)
            if metric.is_rate:
                ax.set_xscale("symlog", linthresh=2.0, linscale=1.5)  # ±2 points linear; wide intervals compressed
                _point_ticks(ax)
            ax.set_xlabel(xlabel)
            ax.grid(axis="x", alpha=0.3)
            ax.set_ylim(-0.7, len(cb) - 0.3)
        axes[0].set_yticks(y, [f"{r.task} · {r.optimizer}: {label(r.arm)} − {label(r.reference)}"
                               for r in cb.itertuples()], fontsize=7.5)
        axes[1].set_yticks(y, [""] * len(y))
    _fit(fig)
    return Figure("differences", "answer", "Paired differences between arms", _with_note(d, (
        "Mean over the evaluation seeds of (first arm − second arm), in points, with its 95% interval (seeds, "
        "the pick's luck and the test split's sampling); "
        "the x axes are linear within ±2 points and logarithmic beyond, so wide intervals do not hide narrow ones; "
        "both arms ran the same seeds. Left: test error (< 0: the first arm is better); right: generalization "
        "gap (< 0: the first arm generalizes with a smaller gap). Thick, filled: one arm is better; filled: "
        "equivalent or no worse within the margin; hollow: undecided, inconclusive (a chosen value at the edge "
        "of its range) or not tested. The decision of each row is in the table above.")),
        "Forest plot of the paired differences in test error and in generalization gap, with 95% intervals.", fig)


#: tick positions of a difference in points, on its linear-then-logarithmic axis
POINT_TICKS = (1, 2, 5, 10, 20, 50, 100)


def _point_ticks(ax) -> None:
    """Ticks in plain points (−10, −2, 0, 2, 10, not −10¹) on a symlog axis that always shows
    ±2 points around 0, however narrow the intervals."""
    lo, hi = ax.get_xlim()
    lo, hi = min(lo, -2.5), max(hi, 2.5)
    ax.set_xlim(lo, hi)
    span = max(-lo, hi)
    # 0 and ±2 (the linear part), then the decades; ±1 and ±5 only while the axis is narrow enough
    # that they do not crowd their neighbours (a decade of the log part is narrower than ±2)
    steps = [t for t in POINT_TICKS if t <= span and (t in (2, 10, 100) or (t == 1 and span < 5) or (t == 5 and span < 10))]
    ticks = sorted({0, *(t for t in steps if t <= hi), *(-t for t in steps if -t >= lo)})
    ax.set_xticks(ticks, [f"{t:g}".replace("-", "−") for t in ticks])


# -- 4. seeds ----------------------------------------------------------------------------------


def fig_seeds(d: ReportData) -> Figure | None:
    """Per task: each seed's test error and gap for every arm, the same seed joined across arms."""
    e = d.evals[d.evals.state == "COMPLETE"] if not d.evals.empty else d.evals
    if e.empty:
        return None
    groups = d.groups()
    fig, axes = plt.subplots(2, len(groups), figsize=(WIDTH, 5.4), squeeze=False)
    for j, (task, opt) in enumerate(groups):
        g = e[(e.task == task) & (e.optimizer == opt)]
        arms = arms_in(d.summary[(d.summary.task == task) & (d.summary.optimizer == opt)].regularizer)
        m = d.metric(task)
        for i, (col, ylabel) in enumerate((("test_error", m.axis("test")),
                                           ("gap_error", "gap: test − train " + ("error (points)" if m.is_rate
                                                                                 else "MSE")))):
            ax = axes[i][j]
            wide = g.pivot_table(index="seed", columns="regularizer", values=col).reindex(columns=arms) * m.scale
            x = np.arange(len(arms))
            for _, row in wide.iterrows():
                ax.plot(x, row.to_numpy(float), color="#bbbbbb", lw=0.7, zorder=1)
            for k, reg in enumerate(arms):
                v = wide[reg].dropna().to_numpy(float)
                ax.scatter(np.full(len(v), k), v, s=14, color=color(reg), zorder=2)
                ci = mean_ci(v)
                if ci.n:
                    ax.errorbar([k + 0.18], [ci.mean], yerr=None if math.isnan(ci.low) else
                                [[ci.mean - ci.low], [ci.high - ci.mean]], fmt="D", ms=4, color="black",
                                capsize=3, lw=1, zorder=3)
            ax.set_xticks(x, [label(a) for a in arms])
            ax.set_xlim(-0.5, len(arms) - 0.3)
            ax.grid(axis="y", alpha=0.3)
            if j == 0 or m.key != d.metric(groups[0][0]).key:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(f"{task} · {opt}")
    n = int(d.summary.seeds.max()) if len(d.summary) else 0
    _fit(fig)
    return Figure("seeds", "gap", "Test error and generalization gap per seed", _with_note(d, (
        f"Dots: one evaluation run each (the cell's chosen configuration retrained on seed s, n ≤ {n}); grey lines "
        "join the same seed across arms (same initialization and data order), so parallel lines mean a "
        "consistent difference. Black diamond: mean with 95% Student-t interval. Each panel has its own "
        "scale; gap = test − train error, train error from an eval-mode pass over the training split.")),
        "Per-seed test error and generalization gap of every arm, with paired lines per seed.", fig)


# -- 5. slices ---------------------------------------------------------------------------------


def fig_slices(d: ReportData) -> Figure | None:
    """Per task: objective against λ and against the per-step shrink, near each arm's chosen η."""
    if d.trials.empty or d.summary.dropna(subset=["lr"]).empty:
        return None
    groups = d.groups()
    fig, axes = plt.subplots(len(groups), 2, figsize=(WIDTH, 2.5 * len(groups) + 0.6), squeeze=False)
    handles = {}
    for i, (task, opt) in enumerate(groups):
        sc = _scale(d, task)
        cells = _cells_of(d, task, opt)
        lows = []
        for reg in arms_in(cells):
            s = d.summary[d.summary.cell == cells[reg]].iloc[0]
            t = d.complete(cells[reg])
            if t.empty or s.lr is None or (isinstance(s.lr, float) and math.isnan(s.lr)):
                continue
            if reg == "none":
                for ax in axes[i]:
                    h = ax.axhline(sc * s.best_val, color=color(reg), lw=1.2, ls="--")
                handles[reg] = h
                lows.append(sc * s.best_val)
                continue
            near = t[np.abs(np.log10(t.lr.astype(float)) - math.log10(s.lr)) <= NEAR_LR].copy()
            near["shrink"] = [shrink(reg, a, b) for a, b in zip(near.lr, near.weight_decay)]
            for ax, xcol in zip(axes[i], ("weight_decay", "shrink")):
                n = near.sort_values(xcol)
                h, = ax.plot(n[xcol].astype(float), sc * n.value.astype(float), "o-", ms=3.5, lw=1,
                             color=color(reg), alpha=0.9)
                x0 = s.weight_decay if xcol == "weight_decay" else s.shrink
                ax.plot([x0], [sc * s.best_val], "*", ms=11, color=color(reg), mec="black", mew=0.6, zorder=4)
                handles[reg] = h
            lows += list(sc * near.value.astype(float))
        for k, ax in enumerate(axes[i]):
            ax.set_xscale("log")
            if lows:
                lo = min(lows)
                hi = np.quantile(lows, 0.8) if len(lows) > 3 else max(lows)
                pad = 0.5 if d.rate(task) else 0.02 * max(abs(hi), 1e-9)  # half a point, or 2% of a loss or MSE
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9) - pad, hi + 0.3 * (hi - lo + 1e-9) + pad)
            ax.grid(alpha=0.3)
            ax.set_title(f"{task} · {opt}", fontsize=9)
            if k == 0:
                ax.set_ylabel(f"{_metric_name(d, task)}{_unit(d, task)}")
            if i == len(groups) - 1:
                ax.set_xlabel("λ (each arm in its own convention)" if k == 0 else
                              "per-step shrink (η·λ; λ for independent)")
    fig.legend([handles[r] for r in arms_in(handles)], [label(r) for r in arms_in(handles)], loc="upper center",
               ncol=max(1, len(handles)), frameon=False, bbox_to_anchor=(0.5, 1.0))
    _fit(fig, top=0.96)
    return Figure("slices", "slices", "Validation error against λ and against the per-step shrink", _with_note(d, (
        f"For each arm, the completed search trials within {NEAR_LR:g} decades of its chosen learning rate "
        "(a slice through the landscape at the best η), joined in order of the x value; ★ the chosen "
        "configuration; dashed: the best validation error of the unregularized arm. Left: λ as each arm "
        "defines it, so the arms sit decades apart. Right: the per-step shrink the arm stands for (η·λ; for "
        "L2 that is the shrink plain SGD applies, which Adam rescales), the axis on which the arms compare. "
        "The y axis is cut at the worse trials so the good region is resolved.")),
        "Validation error against λ and against the per-step shrink, one line per arm, per task.", fig)


# -- 6. landscapes ------------------------------------------------------------------------------


def fig_landscapes(d: ReportData) -> Figure | None:
    """One row per task: the search trials over (η, λ), one panel per regularized arm."""
    if d.trials.empty:
        return None
    rows = []
    for task, opt in d.groups():
        cells = {r: c for r, c in _cells_of(d, task, opt).items() if d.cells[c].weight_decay_range}
        regs = arms_in(cells)
        done = {r: d.complete(cells[r]) for r in regs}
        values = pd.concat([x.value for x in done.values()]) if regs else pd.Series(dtype=float)
        if not values.empty:
            rows.append((task, opt, cells, regs, done, values))
    if not rows:
        return None
    ncol = max(len(r[3]) for r in rows)
    fig, grid = plt.subplots(len(rows), ncol + 1, figsize=(WIDTH, 2.55 * len(rows) + 0.3), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * ncol + [0.045]})
    axes = [row[:-1] for row in grid]
    tops = []
    tau_axis = d.tau_landscape()
    drawn_tau: set[str] = set()  # the arms drawn over τ_epoch, those without a timescale, those not measured
    over_lambda: set[str] = set()
    unmeasured: set[str] = set()
    for i, (task, opt, cells, regs, done, values) in enumerate(rows):
        sc = _scale(d, task)
        vmin = float(values.min()) * sc
        vmax = max(float(values.quantile(0.5)) * sc, vmin + (2.0 if d.rate(task) else 1e-3))
        tops.append(f"{task} {vmax:.1f}%" if d.rate(task) else
                    f"{task} {vmax:.3g}{'' if d.metric(task).is_rate else ' MSE'}")
        mappable = None
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(regs):
                ax.axis("off")
                continue
            reg = regs[j]
            allt = d.trials[d.trials.cell == cells[reg]]
            cell = d.cells[cells[reg]]
            tau = _timescale_of(cell, allt) if tau_axis and reg in WEIGHT_DECAYS else None
            if tau_axis and reg in WEIGHT_DECAYS and tau is None:
                unmeasured.add(label(reg))
            mappable = _landscape_panel(ax, done[reg], allt, cell, vmin, vmax, sc, tau) or mappable
            # over τ_epoch the y labels are wider: the titles take two lines, not to run into each other
            ax.set_title(f"{task} · {opt}{chr(10) if tau_axis else ' · '}{label(reg)}", fontsize=8.5)
            if i == len(rows) - 1:
                ax.set_xlabel("learning rate η")
            ax.set_ylabel(f"τ_epoch ({label(reg)}, epochs)" if tau else f"λ ({label(reg)})", fontsize=8)
            if tau:
                drawn_tau.add(label(reg))
            elif reg not in WEIGHT_DECAYS:
                over_lambda.add(label(reg))
        if mappable is not None:
            cb = fig.colorbar(mappable, cax=grid[i][-1], extend="max")
            cb.set_label("val. error (%)" if d.rate(task) else _metric_name(d, task).replace("validation", "val."),
                         fontsize=8)
        else:
            grid[i][-1].axis("off")
    grid = next(iter(d.cells.values())).sampler == "grid"
    how = ("Heatmap of the grid (mean over repeated points)." if grid else
           "Each dot is one completed search trial, coloured by its validation result; × pruned or diverged; "
           "★ the chosen configuration. No surface is interpolated between the trials.")
    _fit(fig)
    if drawn_tau:
        return Figure("landscapes", "landscapes", "Landscapes over (η, λ) and (η, τ_epoch)", _with_note(d, (
            f"{how} One colour scale per row, from the row's best trial to its median trial ({', '.join(tops)}); "
            "worse trials share the darkest colour, so the good region is resolved. "
            + _tau_caption(sorted(drawn_tau), sorted(over_lambda), sorted(unmeasured))
            + (" τ_epoch panels show the grid's points as dots (a grid in λ is no grid in τ_epoch)." if grid else ""))),
            "Scatter of the search trials over learning rate and, for the decoupled-decay arms, their timescale "
            "τ_epoch in epochs (λ for the others), one row per task and one panel per arm.", fig)
    return Figure("landscapes", "landscapes", "Landscapes over (η, λ)", _with_note(d, (
        f"{how} One colour scale per row, from the row's best trial to its median trial ({', '.join(tops)}); "
        "worse trials share the darkest colour, so the good region is resolved. Each panel spans its arm's own "
        "λ range (the y axes differ): compare arms through the per-step shrink (section 5)."
        + (" An arm searched over its per-step shrink η·λ (or its timescale, in steps or epochs) covers the "
           "band between the dashed lines, the λ of the range's two ends at each η." if any(
               c.decay_axis for c in d.cells.values()) else "")
        + (f" Drawn over λ although τ_epoch was asked for: {', '.join(sorted(unmeasured))} (its runs recorded no "
           "steps per epoch)." if unmeasured else ""))),
        "Scatter of the search trials over learning rate and λ, one row per task and one panel per arm.", fig)


#: the timescale band of Wang & Aitchison (ICML 2025): the best τ_epoch lies between about one epoch and
#: the training length, and stays put as model and data grow
TAU_CITATION = "Wang & Aitchison, ICML 2025, “How to set AdamW's weight decay as you scale model and dataset size”"
BAND_COLOUR = "#2a6f97"


def _tau_caption(tau: list[str], lam: list[str], unmeasured: list[str]) -> str:
    """What a landscape figure drawn over τ_epoch shows: which panels, the band, where λ stays."""
    text = (f"Panels of {', '.join(tau)}: y axis the arm's timescale τ_epoch = τ_iter / steps per epoch, with "
            "τ_iter = 1/(η·λ) steps at the peak learning rate (1/λ for independent), the number of epochs over "
            "which the weights average their recent updates; each dot at the τ_epoch its run recorded. The blue "
            "lines mark one epoch and the training length (the run's epochs): Wang & Aitchison find the best "
            "τ_epoch between about these two, and the same τ_epoch best as model and dataset grow "
            f"({TAU_CITATION}). The dashed lines bound the searched range at each η, in τ_epoch (diagonal for "
            "a decoupled arm searched over λ, since τ_epoch falls as η grows; horizontal for one searched over "
            "its timescale or per-step shrink, and for independent).")
    if lam:
        text += (f" Panels of {', '.join(lam)}: over λ, their own range — a penalty or L1 arm has no "
                 "decoupled timescale (with Adam, L2's shrink of each weight is divided by that weight's "
                 "gradient scale), so it has no τ_epoch to draw; compare arms through the per-step shrink "
                 "(section 5).")
    if unmeasured:
        text += f" Over λ although τ_epoch was asked for: {', '.join(unmeasured)} (its runs recorded no steps per epoch)."
    return text


@dataclass
class Timescale:
    """How a decoupled-decay cell's (η, λ) maps to τ_epoch, from what its runs recorded."""

    regularizer: str
    steps_per_epoch: float
    epochs: float  # the run's length: the band's upper line

    def of(self, lr, wd):
        """τ_epoch of (η, λ): 1/(η·λ·steps per epoch), or 1/(λ·steps per epoch) for ``independent``."""
        lr, wd = np.asarray(lr, float), np.asarray(wd, float)
        rate = wd if self.regularizer == "independent" else lr * wd
        with np.errstate(divide="ignore"):
            return 1.0 / (rate * self.steps_per_epoch)

    def trials(self, t: pd.DataFrame) -> np.ndarray:
        """The τ_epoch of trials: the one each run recorded, else (a run stopped before it measured)
        the one its (η, λ) gives."""
        own = pd.to_numeric(t.tau_epoch, errors="coerce").to_numpy(float) if "tau_epoch" in t \
            else np.full(len(t), np.nan)
        return np.where(np.isnan(own), self.of(t.lr, t.weight_decay), own)


def _timescale_of(cell: R.CellRecord, trials: pd.DataFrame) -> Timescale | None:
    """The cell's :class:`Timescale`: its steps per epoch as its runs measured them (else as its
    record stores them), its length in epochs as they ran; None without a steps per epoch."""
    def recorded(col: str) -> float | None:
        v = pd.to_numeric(trials[col], errors="coerce").dropna() if col in trials else pd.Series(dtype=float)
        return float(v.median()) if len(v) else None

    spe = recorded("steps_per_epoch") or cell.steps_per_epoch
    epochs = recorded("run_epochs") or cell.task.get("epochs")
    if not spe or not epochs:
        return None
    return Timescale(cell.regularizer, float(spe), float(epochs))


def _landscape_panel(ax, done: pd.DataFrame, allt: pd.DataFrame, cell: R.CellRecord, vmin: float, vmax: float,
                     sc: float, tau: Timescale | None = None):
    """One arm's search trials over (η, λ), or with ``tau`` over (η, τ_epoch) with the band from one
    epoch to the training length."""
    import seaborn as sns

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*_padded(cell.lr_range))
    searched = cell.searched_decay
    lrs = np.geomspace(*cell.lr_range, 50)
    # the searched range's two ends as λ at each η (the band of (η, λ) that the searched axis covers)
    ends = [] if searched is None else [
        np.array([cell.decay_of({"lr": a, R.DECAY_AXES[searched[0]]: bound}) for a in lrs]) for bound in searched[1]]
    if tau is not None:
        ends = [tau.of(lrs, lam) for lam in ends]
        ax.set_ylim(*_padded(_tau_limits(tau, cell, ends)))
        _tau_band(ax, tau)
    else:
        ax.set_ylim(*_padded(cell.weight_decay_range))
    if done.empty:
        ax.text(0.5, 0.5, "no completed trial", ha="center", va="center", transform=ax.transAxes)
        return None
    if searched is not None and (searched[0] != "lambda" or tau is not None):  # the searched band, dashed
        for end in ends:
            ax.plot(lrs, end, color="#999999", lw=0.8, ls="--", zorder=1)
    cmap = sns.color_palette(CMAP, as_cmap=True)

    def ys(t: pd.DataFrame) -> np.ndarray:
        return tau.trials(t) if tau is not None else t.weight_decay.to_numpy(float)

    x, y, v = done.lr.to_numpy(float), ys(done), sc * done.value.to_numpy(float)
    mappable = None
    if cell.sampler == "grid" and tau is None:
        grid = done.assign(x=np.log10(x), y=np.log10(y), v=v).groupby(["y", "x"]).v.mean().unstack()
        ex, ey = _edges(grid.columns.to_numpy()), _edges(grid.index.to_numpy())
        mappable = ax.pcolormesh(10 ** ex, 10 ** ey, grid.to_numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xlim(10 ** ex[0], 10 ** ex[-1])
        ax.set_ylim(10 ** ey[0], 10 ** ey[-1])
    sc_ = ax.scatter(x, y, c=np.clip(v, vmin, vmax), cmap=cmap, vmin=vmin, vmax=vmax, s=34 if mappable is None else 8,
                     edgecolors="#333333", linewidths=0.5, zorder=3)
    bad = allt[allt.state == "PRUNED"]
    if len(bad):
        ax.scatter(bad.lr.astype(float), ys(bad), marker="x", c="#555555", s=18, linewidths=0.8, zorder=3)
    chosen = done[done.chosen] if "chosen" in done and done.chosen.any() else done.loc[[done.value.idxmin()]]
    ax.scatter(chosen.lr.astype(float), ys(chosen), marker="*", s=170, c="gold",
               edgecolors="black", linewidths=0.8, zorder=4)
    return mappable or sc_


def _tau_limits(tau: Timescale, cell: R.CellRecord, ends: list[np.ndarray]) -> tuple[float, float]:
    """The y range of a τ_epoch panel: the searched range (its dashed ends, or the τ_epoch of the λ
    range's corners) and the band from one epoch to the training length."""
    if ends:
        values = np.concatenate(ends)
    else:
        lo, hi = cell.weight_decay_range or (1.0, 1.0)
        values = tau.of([cell.lr_range[0], cell.lr_range[1]], [lo, hi])
    values = values[np.isfinite(values) & (values > 0)]
    return min(float(values.min()), 1.0), max(float(values.max()), tau.epochs)


def _tau_band(ax, tau: Timescale) -> None:
    """The lines at τ_epoch = 1 and at the run's epochs, labelled, the band between them shaded."""
    ax.axhspan(1.0, tau.epochs, color=BAND_COLOUR, alpha=0.07, lw=0, zorder=0)
    where = ax.get_yaxis_transform()  # x in the panel's width, y in τ_epoch
    for y, text in ((1.0, "1 epoch"), (tau.epochs, f"training length: {tau.epochs:g} epochs")):
        ax.axhline(y, color=BAND_COLOUR, lw=0.9, zorder=2)
        # no box behind the label: it would hide a dashed end of the searched range running close by
        ax.text(0.98, y, text, transform=where, ha="right", va="bottom", fontsize=6.5, color=BAND_COLOUR, zorder=5)


def _padded(bounds, share: float = 0.04) -> tuple[float, float]:
    """A log range widened by ``share`` of its decades on each side, so dots on an edge show whole."""
    lo, hi = bounds
    f = 10 ** (share * math.log10(hi / lo))
    return lo / f, hi * f


def _edges(centers: np.ndarray) -> np.ndarray:
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mid = (centers[:-1] + centers[1:]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])


# -- 7. coupling --------------------------------------------------------------------------------


def fig_coupling(d: ReportData) -> Figure | None:
    if d.coupling.empty or d.trials.empty:
        return None
    groups = list(dict.fromkeys(zip(d.coupling.task, d.coupling.optimizer)))
    regs = arms_in(d.coupling.regularizer)
    fig, axes = plt.subplots(len(groups), len(regs), figsize=(WIDTH, 2.45 * len(groups) + 0.5), squeeze=False)
    for ax, r in panels(axes, groups, regs, d.coupling):
        task, reg = r.task, r.regularizer
        cell = d.cells[r.cell]
        allc = d.complete(r.cell)
        top = top_trials(d, r.cell)
        lx, ly = np.log10(cell.lr_range), np.log10(cell.weight_decay_range)
        ax.scatter(np.log10(allc.lr.astype(float)), np.log10(allc.weight_decay.astype(float)), s=9, c="#cccccc")
        ax.scatter(np.log10(top.lr.astype(float)), np.log10(top.weight_decay.astype(float)), s=22, c=color(reg))
        if len(top):
            cx, cy = np.log10(top.lr.astype(float)).mean(), np.log10(top.weight_decay.astype(float)).mean()
            ax.plot(lx, cy + 0 * (lx - cx), color="#777777", lw=0.8, ls=":")
            ax.plot(lx, cy - (lx - cx), color="#777777", lw=0.8, ls="--")
        if not math.isnan(r.slope):
            ax.plot(lx, r.intercept + r.slope * lx, color="black", lw=1.2)
        ax.set_xlim(*lx)
        ax.set_ylim(*ly)
        ax.set_title(f"{task} · {label(reg)}: slope {r.slope:.2f} [{r.slope_low:.2f}, {r.slope_high:.2f}]"
                     if not math.isnan(r.slope) else f"{task} · {label(reg)}", fontsize=8)
        ax.text(0.02, 0.03, r.reading, transform=ax.transAxes, fontsize=6.5, color="#333",
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1})
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("log10 learning rate η")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("log10 λ")
    k = int(d.coupling.top_trials.max()) if len(d.coupling) else 0
    _fit(fig)
    return Figure("coupling", "coupling", "Coupling of λ and the learning rate", (
        f"Coloured: each cell's best completed trials (the best quarter, at least 5; here up to {k}); grey: the "
        "others. Black: least-squares line of log10 λ on log10 η through the coloured trials, with its 95% "
        "interval in the title. Guides through their centre: dotted, slope 0 (best λ independent of η); "
        "dashed, slope −1 (best η·λ constant). What each means depends on the arm's convention (table below); "
        "an interval covering both guides is inconclusive."),
        "Scatter of the best trials in log learning rate and log λ with the fitted slope and guide lines.", fig)


# -- 8. search -----------------------------------------------------------------------------------


def fig_best_so_far(d: ReportData) -> Figure | None:
    if d.trials.empty:
        return None
    groups = d.groups()
    fig, axes = plt.subplots(1, len(groups), figsize=(WIDTH, 2.7), squeeze=False)
    for j, (task, opt) in enumerate(groups):
        sc = _scale(d, task)
        ax = axes[0][j]
        cells = _cells_of(d, task, opt)
        for reg in arms_in(cells):
            t = search_order(d.trials[(d.trials.cell == cells[reg]) & d.trials.state.isin(["COMPLETE", "PRUNED"])])
            if t.empty:
                continue
            v = t.value.where(t.state == "COMPLETE").astype(float).cummin() * sc
            ax.step(np.arange(1, len(v) + 1), v, where="post", color=color(reg), label=label(reg))
        budget = max(c.budget for c in d.cells.values())
        batch = next(iter(d.cells.values())).batch
        if batch:
            for g in range(batch, budget, batch):
                ax.axvline(g + 0.5, color="#dddddd", lw=0.6, zorder=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial (in search order)")
        ax.set_title(f"{task} · {opt}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if j == 0 or _metric_name(d, task) != _metric_name(d, groups[0][0]):
            ax.set_ylabel(f"best {_metric_name(d, task)} so far{_unit(d, task)}")
    axes[0][-1].legend(fontsize=7)
    _fit(fig)
    return Figure("best_so_far", "search", "Best so far", _with_note(d, (
        "The best validation result after each search trial, in the order the search proposed them (thin grey "
        "lines: generation boundaries). A curve still falling at the last trials says the budget did not suffice "
        "for that arm; an arm ahead at every budget is ahead regardless of the budget.")),
        "Best validation result so far against the number of search trials, one line per arm, per task.", fig)


def fig_tuning(d: ReportData) -> Figure | None:
    """Per task: each arm's median best validation result after n random trials, with its band."""
    sampler = next(iter(d.cells.values())).sampler
    if d.trials.empty or sampler not in ("random", "grid"):
        return None
    groups = d.groups()
    fig, axes = plt.subplots(1, len(groups), figsize=(WIDTH, 2.7), squeeze=False)
    drawn = False
    for j, (task, opt) in enumerate(groups):
        sc, rate = _scale(d, task), d.rate(task)
        ax = axes[0][j]
        cells = _cells_of(d, task, opt)
        seen: list[float] = []
        for reg in arms_in(cells):
            t = d.trials[(d.trials.cell == cells[reg]) & d.trials.state.isin(["COMPLETE", "PRUNED"])]
            if len(t) < 2:
                continue
            worst = 1.0 if rate else float(t.value.max())
            values = t.value.where(t.state == "COMPLETE", worst).fillna(worst).astype(float).to_numpy()
            ns = np.arange(1, len(values) + 1)
            curve, lo, hi = tuning_curve(values, ns, low=0.0 if d.is_error else -np.inf, high=worst)
            ax.plot(ns, sc * curve, color=color(reg), label=label(reg))
            ax.fill_between(ns, sc * lo, sc * hi, color=color(reg), alpha=0.15, lw=0)
            seen += list(sc * curve)
            drawn = True
        if seen:  # the curves set the scale; a band wider than the panel is cut at its edges
            span = max(seen) - min(seen)
            pad = 0.5 * span + (1.0 if rate else 0.05 * abs(max(seen)))
            ax.set_ylim(min(seen) - pad, max(seen) + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trials n")
        ax.set_title(f"{task} · {opt}", fontsize=9)
        ax.grid(alpha=0.3)
        if j == 0 or _metric_name(d, task) != _metric_name(d, groups[0][0]):
            ax.set_ylabel(f"best {_metric_name(d, task)} of n{_unit(d, task)}")
    if not drawn:
        plt.close(fig)
        return None
    axes[0][-1].legend(fontsize=7)
    _fit(fig)
    return Figure("tuning", "search", "Tuning curves", _with_note(d, (
        "For each arm, the median best validation result of n trials drawn at random from its search space "
        "(estimated from the search's own trials; diverged trials count as the worst value), with an 80% "
        "exact, distribution-free simultaneous band (opda, ld_equal_tailed; exact for untied values — error "
        "rates on a finite split tie, so read it as approximate; a band wider than the panel is cut). An arm whose band "
        "lies below "
        "another's at every n is ahead at every budget; a curve still falling at the right edge says the "
        "budget did not suffice. Only for random and grid searches: TPE's trials are not independent draws.")),
        "Median best validation result against the number of random trials, with confidence bands, per arm.",
        fig)


# -- 9. learning curves ---------------------------------------------------------------------------


def fig_curves(d: ReportData) -> Figure | None:
    """One row per task: error, loss and weight norm over the epochs of the evaluation runs."""
    h = d.histories
    if h.empty:
        return None
    groups = [(t, o) for t, o in d.groups() if len(h[(h.task == t) & (h.optimizer == o)])]
    fig, axes = plt.subplots(len(groups), 3, figsize=(WIDTH, 2.3 * len(groups) + 0.5), squeeze=False)
    n = 0
    for i, (task, opt) in enumerate(groups):
        g = h[(h.task == task) & (h.optimizer == opt)]
        n = max(n, int(g.groupby(["regularizer", "epoch"]).size().max()))
        row = axes[i]
        metric = d.metric(task)
        for reg in arms_in(g.regularizer):
            hr = g[g.regularizer == reg]
            c = color(reg)
            for ax, col, scale, ls in ((row[0], "train_error_running", metric.scale, "--"),
                                       (row[0], "val_error", metric.scale, "-"),
                                       (row[1], "train_loss_running", 1, "--"), (row[1], "val_loss", 1, "-"),
                                       (row[2], "weight_norm", 1, "-")):
                if col not in hr or hr[col].isna().all():
                    continue
                m = _band(hr, col)
                ax.plot(m.index + 1, scale * m["mean"], color=c, ls=ls, lw=1.1,
                        label=label(reg) if col == "weight_norm" else None)
                ax.fill_between(m.index + 1, scale * m["low"], scale * m["high"], color=c, alpha=0.15, lw=0)
            e = d.evals[(d.evals.cell == hr.cell.iloc[0]) & (d.evals.state == "COMPLETE")]
            if len(e):
                last = int(hr.epoch.max()) + 1
                row[0].plot([last], [metric.scale * e.train_error.mean()], "o", mfc="white", color=c, ms=4.5)
                row[0].plot([last], [metric.scale * e.test_error.mean()], "s", color=c, ms=3.5)
        row[0].set_ylabel(f"{task}\n{metric.axis()}", fontsize=8)
        row[1].set_ylabel(metric.loss, fontsize=8)
        row[2].set_ylabel("‖w‖₂ (regularized)", fontsize=8)
        for ax in row:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if i == len(groups) - 1:
                ax.set_xlabel("epoch")
        if i == 0:
            for ax, t in zip(row, ("error", "loss", "weight norm")):
                ax.set_title(t, fontsize=9)
            row[2].legend(fontsize=7)
    _fit(fig)
    return Figure("curves", "curves", "Learning curves of the chosen configurations", _with_note(d, (
        f"Evaluation runs of each cell's chosen configuration: mean over {n} seeds with its 95% Student-t band, "
        "one row per task. Solid: validation split (eval mode); dashed: running average over the epoch's "
        "minibatches in train mode (dropout on, weights moving), which is not the train error of the tables — "
        "that one is the hollow circle at the last epoch (an eval-mode pass over the training split); filled "
        "square: test error. Right: norm of the regularized weights at the end of each epoch.")),
        "Training and validation error, loss and weight norm over epochs, one row per task.", fig)


def _band(h: pd.DataFrame, col: str) -> pd.DataFrame:
    rows = {}
    for ep, v in h.groupby("epoch")[col]:
        ci = mean_ci(v.dropna().to_numpy(float))
        rows[int(ep)] = {"mean": ci.mean, "low": ci.low if not math.isnan(ci.low) else ci.mean,
                         "high": ci.high if not math.isnan(ci.high) else ci.mean}
    return pd.DataFrame.from_dict(rows, orient="index").sort_index()


# -- 10. importance --------------------------------------------------------------------------------


def fig_importance(d: ReportData) -> Figure | None:
    import seaborn as sns

    if d.importance.empty:
        return None
    imp = d.importance.assign(label=lambda x: x.task + " · " + x.optimizer + " · " + x.regularizer.map(label))
    long = imp.melt(id_vars=["label"], value_vars=["lr", "weight_decay"], var_name="parameter",
                    value_name="importance")
    long["parameter"] = long.parameter.map({"lr": "learning rate η", "weight_decay": "λ"})
    fig, ax = plt.subplots(figsize=(WIDTH, 0.3 * len(imp) + 1.2))
    sns.barplot(data=long, y="label", x="importance", hue="parameter", ax=ax, palette=["#edae49", "#30638e"])
    ax.set_xlabel("fANOVA importance (share of the objective's variance)")
    ax.set_ylabel("")
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(title=None, loc="lower right")
    _fit(fig)
    return Figure("importance", "importance", "Hyperparameter importance", (
        "Optuna's fANOVA importance from each cell's completed search trials: the share of the objective's "
        "variance explained by the learning rate and by λ (they sum to 100% per cell). With a dozen trials "
        "per cell it is a rough guide."),
        "Bar chart of fANOVA importance of learning rate and λ per cell.", fig)


#: every figure of the report, in reading order (a new figure is added here; :mod:`.document`
#: places it by its ``section``)
from .meaning import fig_angular, fig_norms  # noqa: E402  (the section "What the optimum means")

FIGURES = (fig_differences, fig_seeds, fig_slices, fig_landscapes, fig_coupling, fig_best_so_far, fig_tuning,
           fig_curves, fig_angular, fig_norms, fig_importance)
PNG_DPI = 150


@dataclass
class Rendered:
    """A figure drawn once as PNG (for the HTML and figures/) and once as vector PDF (for the PDF)."""

    key: str
    section: str
    title: str
    caption: str
    alt: str
    png: bytes
    pdf: bytes


def figure_bytes(fig, pdf_dpi: float | str = 200) -> tuple[bytes, bytes]:
    """``fig`` saved as PNG (at :data:`PNG_DPI`) and as vector PDF (rasterized parts, if any, at
    ``pdf_dpi``), then closed: what the HTML and the PDF of a report each embed."""
    import io

    png, pdf = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=PNG_DPI)
    fig.savefig(pdf, format="pdf", dpi=pdf_dpi)
    plt.close(fig)
    return png.getvalue(), pdf.getvalue()


def _render(d: ReportData, index: int) -> Rendered | None:
    """The figure ``FIGURES[index]`` of ``d``, drawn and saved (None: nothing to draw)."""
    with drawing():
        f = FIGURES[index](d)
        if f is None:
            return None
        return Rendered(f.key, f.section, f.title, f.caption, f.alt, *figure_bytes(f.fig))


def warm_up() -> None:
    """Draw and save one throwaway figure (log axes, a colour bar, the report's fonts and glyphs) as
    PNG and PDF, so matplotlib's first-use costs (font cache, text layout, the PDF backend) are paid
    now and inherited by the processes :func:`render_all` forks; ``launch`` calls it while the
    workers train."""
    import seaborn as sns

    with drawing():
        fig, ax = plt.subplots(figsize=(3, 2))
        points = ax.scatter([1e-3, 1e-2, 1e-1], [1e-6, 1e-4, 1e-2], c=[1, 2, 3],
                            cmap=sns.color_palette(CMAP, as_cmap=True))
        ax.plot([1e-3, 1e-1], [1e-6, 1e-2], "o-", label="L2 ★")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate η")
        ax.set_ylabel("λ · η·λ (%) − ±")
        ax.set_title("warm-up")
        ax.legend()
        fig.colorbar(points, ax=ax)
        figure_bytes(fig)


#: drawing cost, heaviest first: the two processes start on the long ones
COST = ("fig_tuning", "fig_landscapes", "fig_curves", "fig_slices", "fig_coupling", "fig_seeds", "fig_best_so_far",
        "fig_angular", "fig_norms", "fig_differences")


def render_all(d: ReportData) -> list[Rendered]:
    """Every figure, drawn and saved by two forked processes at once while this one computes the
    fANOVA importances (drawing is most of a report's time). The importance figure, which needs
    them, is drawn here last. Serially where the platform cannot fork."""
    import multiprocessing as mp

    from .tables import fill_importance

    last = FIGURES.index(fig_importance)
    if "fork" not in mp.get_all_start_methods():
        fill_importance(d)
        out = [_render(d, i) for i in range(len(FIGURES))]
        return [r for r in out if r is not None]
    import copy
    from concurrent.futures import ProcessPoolExecutor

    # the drawing processes get their own copy: fill_importance below rebinds d.importance meanwhile
    shared = copy.copy(d)
    order = sorted((i for i in range(len(FIGURES)) if i != last), key=lambda i: COST.index(FIGURES[i].__name__))
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork")) as pool:
        futures = {i: pool.submit(_render, shared, i) for i in order}
        fill_importance(d)
        out = {last: _render(d, last)}
        out.update({i: f.result() for i, f in futures.items()})
    return [out[i] for i in range(len(FIGURES)) if out[i] is not None]
