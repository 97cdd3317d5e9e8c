"""Section "What the optimum means": the mechanics of each cell's pick, over its evaluation seeds.

From the runs' mechanics (:func:`wdstudy.analysis.diagnostics_frame`; measured by
:mod:`wdstudy.mechanics`): the pick's timescale in epochs against the band "one epoch … training
length" (Wang & Aitchison 2025), whether its layers reach the rotational equilibrium predicted for
its optimizer and arm (Kosson et al. 2024), how unevenly its layers rotate, its weight norms, one
sentence per task computed from these numbers, and the timescale rule's transfer line.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..arms import WEIGHT_DECAYS
from .style import arm_rank, arms_in, color, label, missing, num

#: a layer is "at equilibrium" when its measured angular update is within this factor of the prediction
EQUILIBRIUM_BAND = 1.25
#: the data multiples of the transfer line
TRANSFER = (2, 4, 10)
CITE_TIMESCALE = "Wang & Aitchison 2025"
CITE_EQUILIBRIUM = "Kosson et al. 2024"


def band_of(tau_epoch: float | None, run_epochs: float | None) -> str:
    """Where a timescale in epochs sits against the band [one epoch, the training length]."""
    if missing(tau_epoch) or missing(run_epochs):
        return ""
    if tau_epoch < 1:
        return "below one epoch"
    if tau_epoch > run_epochs:
        return "beyond the training length"
    return "inside the band"


def meaning_table(diag: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with evaluation runs: the pick's (η, λ), its timescale, equilibrium ratio,
    imbalance across layers and final weight norm, each the mean over its evaluation seeds."""
    cols = ["cell", "task", "optimizer", "regularizer", "lr", "weight_decay", "seeds", "tau_iter", "tau_epoch",
            "run_epochs", "band", "integrated_shrink", "equilibrium_ratio", "equilibrium_ratio_min",
            "equilibrium_ratio_max", "angular_imbalance", "l2_shrink_p10", "l2_shrink_p90", "mechanics_overhead"]
    if diag.empty or "phase" not in diag:
        return pd.DataFrame(columns=cols)
    ev = diag[(diag.phase == "eval") & (diag.state == "COMPLETE") & diag.get("pick", True)]
    rows = []
    for cell, g in ev.groupby("cell", sort=False):
        runs = g.drop_duplicates("trial")
        last = g[g.step == g.groupby("trial").step.transform("max")]
        mean = lambda col, frame=runs: float(pd.to_numeric(frame[col], errors="coerce").mean())  # noqa: E731
        r = runs.iloc[0]
        tau, length = mean("tau_epoch"), mean("run_epochs")
        rows.append({
            "cell": cell, "task": r.task, "optimizer": r.optimizer, "regularizer": r.regularizer, "lr": r.lr,
            "weight_decay": r.weight_decay, "seeds": len(runs), "tau_iter": mean("tau_iter"), "tau_epoch": tau,
            "run_epochs": length, "band": band_of(None if math.isnan(tau) else tau, length),
            "integrated_shrink": mean("integrated_shrink"), "equilibrium_ratio": mean("equilibrium_ratio"),
            "equilibrium_ratio_min": float(pd.to_numeric(runs.equilibrium_ratio_min, errors="coerce").min()),
            "equilibrium_ratio_max": float(pd.to_numeric(runs.equilibrium_ratio_max, errors="coerce").max()),
            "angular_imbalance": mean("angular_imbalance"),
            "l2_shrink_p10": mean("shrink_p10", last) if "shrink_p10" in last else math.nan,
            "l2_shrink_p90": mean("shrink_p90", last) if "shrink_p90" in last else math.nan,
            "mechanics_overhead": mean("mechanics_overhead"),
        })
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["task", "optimizer", "regularizer"], key=arm_rank).reset_index(drop=True)


def _reached(ratio: float) -> str:
    if 1 / EQUILIBRIUM_BAND <= ratio <= EQUILIBRIUM_BAND:
        return "at the predicted equilibrium"
    return "below the predicted equilibrium" if ratio < 1 else "above the predicted equilibrium"


def task_sentences(m: pd.DataFrame) -> list[str]:
    """One sentence per task and optimizer, computed from the numbers of :func:`meaning_table`."""
    out = []
    for (task, opt), g in m.groupby(["task", "optimizer"], sort=True):
        parts = []
        for r in g.itertuples():
            if not missing(r.tau_epoch):
                parts.append(f"the {label(r.regularizer)} pick averages over τ = {num(r.tau_epoch, '.3g')} epochs "
                             f"({r.band}; training {num(r.run_epochs, '.3g')} epochs)")
            if not missing(r.equilibrium_ratio):
                parts.append(f"its layers rotate at {num(r.equilibrium_ratio, '.2f')}× the predicted angular update "
                             f"(layers {num(r.equilibrium_ratio_min, '.2f')}–{num(r.equilibrium_ratio_max, '.2f')}×: "
                             f"{_reached(r.equilibrium_ratio)} over the second half of training)")
            if not missing(r.l2_shrink_p10) and r.l2_shrink_p10 > 0:
                parts.append(f"under {label(r.regularizer)} Adam's per-weight shrink η·λ/(√v̂+ε) spans "
                             f"{num(r.l2_shrink_p10, '.2g')}–{num(r.l2_shrink_p90, '.2g')} per step (10th–90th "
                             f"percentile, a factor {num(r.l2_shrink_p90 / r.l2_shrink_p10, '.2g')})")
        imb = {label(r.regularizer): r.angular_imbalance for r in g.itertuples() if not missing(r.angular_imbalance)}
        if len(imb) > 1:
            parts.append("the fastest layer rotates " + ", ".join(f"{num(v, '.2g')}× the slowest under {k}"
                                                                 for k, v in imb.items()))
        if parts:
            out.append(f"{task} · {opt}: " + "; ".join(parts) + ".")
    return out


def transfer_lines(m: pd.DataFrame) -> list[str]:
    """The timescale rule's suggestion for λ at k× the data and the same epochs (λ/k at the same η)."""
    out = []
    for r in m.itertuples():
        if missing(r.tau_epoch) or r.regularizer not in WEIGHT_DECAYS:
            continue
        lams = ", ".join(f"λ = {num(r.weight_decay / k, '.2g')} at {k}×" for k in TRANSFER)
        out.append(f"{r.task} · {r.optimizer} · {label(r.regularizer)}: to keep τ = {num(r.tau_epoch, '.3g')} "
                   f"epochs with k× the training data and the same epochs and η = {num(r.lr, '.2g')}: {lams} "
                   f"(a rule from the literature, {CITE_TIMESCALE}; not a measurement of this study).")
    return out


def layer_curves(diag: pd.DataFrame, cell: str) -> pd.DataFrame:
    """Per layer and checkpoint of a cell's evaluation runs: the mean over seeds of the epoch, weight
    norm, angular update and its prediction."""
    g = diag[(diag.cell == cell) & (diag.phase == "eval") & (diag.state == "COMPLETE") & diag.get("pick", True)]
    if g.empty:
        return g
    num_cols = ["epoch", "weight_norm", "angular_update", "predicted_angular_update"]
    g = g.assign(**{c: pd.to_numeric(g[c], errors="coerce") for c in num_cols})
    return g.groupby(["layer", "step"], sort=False)[num_cols].mean().reset_index()


def _grid(d, value: str, ylabel: str, key: str, title: str, caption: str, alt: str):
    import matplotlib.pyplot as plt

    from .figures import WIDTH, Figure, _fit, panels

    diag = d.diagnostics
    if diag is None or diag.empty or not (diag.phase == "eval").any():
        return None
    groups = [(r.task, r.optimizer) for r in d.meaning.drop_duplicates(["task", "optimizer"]).itertuples()]
    arms = arms_in(d.meaning.regularizer)
    if not groups or not arms:
        return None
    fig, axes = plt.subplots(len(groups), len(arms), figsize=(WIDTH, 1.9 * len(groups) + 0.4), squeeze=False,
                             sharex="row")
    for ax, row in panels(axes, groups, arms, d.meaning):
        task, arm = row.task, row.regularizer
        curves = layer_curves(diag, row.cell)
        shades = np.linspace(0.35, 1.0, max(1, curves.layer.nunique()))
        for shade, (layer, c) in zip(shades, curves.groupby("layer", sort=False)):
            c = c[c[value].notna() & (c[value] > 0)]
            ax.plot(c.epoch, c[value], "o-", ms=2.5, lw=1, color=color(arm), alpha=float(shade), label=layer)
        if value == "angular_update":
            pred = curves.groupby("step")[["epoch", "predicted_angular_update"]].mean().dropna()
            if len(pred):
                ax.plot(pred.epoch, pred.predicted_angular_update, "k--", lw=1, label="predicted equilibrium")
        ax.set_yscale("log")
        ax.set_title(f"{task} · {label(arm)}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(ylabel, fontsize=7)
        ax.legend(fontsize=5, loc="best")
    _fit(fig)
    return Figure(key, "meaning", title, caption, alt, fig)


def fig_angular(d):
    """Per task and arm: each layer's mean angular update per step against the predicted equilibrium."""
    return _grid(d, "angular_update", "angular update per step (rad)", "angular",
                 "Angular update per step of each layer, against the predicted equilibrium",
                 "Each regularized layer's mean angle of rotation per step between checkpoints (mean over the "
                 "evaluation seeds of each cell's pick), lighter for earlier layers; dashed: the rotational "
                 f"equilibrium predicted for the arm and optimizer ({CITE_EQUILIBRIUM}), which follows the "
                 "learning-rate schedule. Adam + L2 and no decay have no prediction. The prediction is exact for "
                 "scale-invariant weights (followed by a normalization); other layers need not meet it.",
                 "Angular update per layer against epochs, one panel per task and arm.")


def fig_norms(d):
    """Per task and arm: each layer's weight norm through training."""
    return _grid(d, "weight_norm", "weight norm ‖w‖₂", "norms", "Weight norm of each layer through training",
                 "Each regularized layer's weight norm at the checkpoints (mean over the evaluation seeds of each "
                 "cell's pick), lighter for earlier layers.",
                 "Weight norm per layer against epochs, one panel per task and arm.")


def meaning_blocks(d) -> list:
    """The section's paragraphs and table (the figures are added with the others)."""
    from .document import Para, Table

    m = d.meaning
    if m is None or m.empty:
        return []
    rows = [[f"{r.task} · {r.optimizer}", label(r.regularizer), num(r.lr), num(r.weight_decay),
             "—" if missing(r.tau_epoch) else f"{num(r.tau_epoch, '.3g')} ({num(r.tau_iter, '.3g')} steps)",
             f"{num(r.run_epochs, '.3g')}", r.band,
             "—" if missing(r.equilibrium_ratio) else
             f"{num(r.equilibrium_ratio, '.2f')} [{num(r.equilibrium_ratio_min, '.2f')}, "
             f"{num(r.equilibrium_ratio_max, '.2f')}]",
             num(r.angular_imbalance, ".2g"), str(r.seeds)] for r in m.itertuples()]
    table = Table("meaning", ["task · optimizer", "arm", "η", "λ", "τ, epochs (steps)", "training, epochs",
                              "τ against one epoch … training", "angular update / predicted [layers]",
                              "imbalance across layers", "seeds"], rows,
                  [2.2, 1.2, 0.9, 0.9, 1.7, 1.0, 1.6, 2.0, 1.1, 0.7],
                  f"Mechanics of each cell's pick, mean over its evaluation seeds. τ = 1/(η·λ) steps at the peak "
                  f"learning rate (1/λ for independent) — the window of updates the weights average over "
                  f"({CITE_TIMESCALE}: the best τ in epochs stays roughly constant as model and data grow, "
                  f"between about one epoch and the training length). Angular update / predicted: each layer's "
                  f"measured rotation per step over the second half of training against the rotational "
                  f"equilibrium for its optimizer and arm ({CITE_EQUILIBRIUM}); the median over layers, [the "
                  f"slowest, the fastest]; 1 means the layer sits at the equilibrium; Adam + L2 and no decay have "
                  f"none. Imbalance: the fastest layer's angular update over the slowest's in that half.")
    blocks = [Para("What the chosen configurations mean, measured in every run: the timescale of the decay, how "
                   "each layer's rotation compares with its predicted equilibrium, and how evenly the layers "
                   "learn. These numbers carry a result to a longer run or a larger data set better than λ does; "
                   "docs/explanation/mechanics.md explains how to read them."), table]
    blocks += [Para(s) for s in task_sentences(m)]
    transfer = transfer_lines(m)
    if transfer:
        blocks.append(Para("Transfer, by the timescale rule: " + " ".join(transfer), "note"))
    return blocks
