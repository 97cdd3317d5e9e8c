"""The claims report's figures: the measurements behind the claims, and the regression's fitted curves.

Each figure is drawn with the study report's style (:func:`wdstudy.report.figures.drawing`) and
saved as PNG and vector PDF (:class:`~wdstudy.report.figures.Rendered`), one panel per function.
"""

from __future__ import annotations

import math

import numpy as np

from ..report.figures import WIDTH, Rendered, drawing, figure_bytes
from ..report.style import color, label
from .setup import CURVE_TASK, Claim


def measurements(claims: list[Claim]) -> Rendered:
    """Four panels: weight norm, gap and exact zeros against λ, and the per-weight shrink under Adam."""
    import matplotlib.pyplot as plt

    by = {c.key: c for c in claims}
    with drawing():
        fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 5.6))
        _norm_panel(axes[0][0], by["norm_vs_lambda"])
        _gap_panel(axes[0][1], by["gap_vs_lambda"])
        _zeros_panel(axes[1][0], by["l1_zeros"])
        _shrink_panel(axes[1][1], by["adam_sqrt_v"])
        for a in axes.flat:
            a.grid(alpha=0.3)
        fig.tight_layout()
        png, pdf = figure_bytes(fig, pdf_dpi="figure")
    return Rendered("claims", "figures", "Measurements behind the claims", (
        "Top left: norm of the regularized weights of the MLP at the end against λ, per arm (Adam). Top right: "
        "generalization gap (test − train error) against λ for the classifiers on MNIST-1D — MLP, CNN and "
        "logistic regression — mean with 95% interval over seeds. Bottom left: share of exactly-zero regularized "
        "weights against λ under plain SGD (L1 as a soft threshold, L1 as a gradient term at λ/1000, L2 at "
        "λ/100). Bottom right: per weight, the relative shrink per step its regularizer applies under Adam "
        "against √v̂: L2's falls as 1/√v̂, decoupled decay's is the same for every weight."),
        "Four panels: weight norm, gap, exact zeros against λ, and per-weight shrink against √v under Adam.",
        png, pdf)


def _norm_panel(ax, claim: Claim) -> None:
    for arm, m in claim.series["norm"].items():
        if "/" in arm:
            continue  # the linear tasks' norms are in the table
        ax.plot(m.index, m.to_numpy(), "o-", color=color(arm), label=label(arm), ms=3)
    ax.set(xscale="log", xlabel="λ (each arm in its own convention)", ylabel="‖w‖₂ at the end",
           title="weight norm against λ")
    ax.legend(fontsize=7)


def _interval(stats: dict, scale: float = 1.0) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """λ values, and the mean gap with its interval at each (the mean where the interval is undefined)."""
    lams = list(stats)
    mean = np.array([scale * stats[x].mean for x in lams])
    low = np.array([scale * (stats[x].low if not math.isnan(stats[x].low) else stats[x].mean) for x in lams])
    high = np.array([scale * (stats[x].high if not math.isnan(stats[x].high) else stats[x].mean) for x in lams])
    return lams, mean, low, high


def _gap_panel(ax, claim: Claim) -> None:
    from ..tasks.names import task_metric

    styles = {"mlp": "-", "cnn": "--", "logreg": ":"}
    for key, stats in claim.series["gap"].items():
        task, arm = key.split("/")
        if not task_metric(task).is_rate:
            continue  # a regression's gap is in MSE: drawn beside its fitted curves
        lams, mean, lo, hi = _interval(stats, 100)
        model = task.split("-")[0]
        ax.plot(lams, mean, "o" + styles.get(model, "-."), color=color(arm), label=f"{model} {label(arm)}", ms=3)
        ax.fill_between(lams, lo, hi, color=color(arm), alpha=0.12, lw=0)
    ax.set(xscale="log", xlabel="λ", ylabel="gap: test − train error (points)", title="generalization gap against λ")
    ax.legend(fontsize=6.5, ncol=2)


def _zeros_panel(ax, claim: Claim) -> None:
    for arm, zs in claim.series["zeros"].items():
        ax.plot(list(zs), [100 * z for z in zs.values()], "o-", color=color(arm), label=label(arm), ms=3)
    ax.set(xscale="log", xlabel="λ", ylabel="exactly-zero weights (%)", title="exact zeros (plain SGD)")
    ax.legend(fontsize=7)


def _shrink_panel(ax, claim: Claim) -> None:
    for arm, (v, s) in claim.series["adam_v"].items():
        idx = np.random.default_rng(0).choice(len(v), size=min(3000, len(v)), replace=False)
        ax.scatter(v[idx], s[idx], s=2, color=color(arm), label=label(arm), alpha=0.5)
    ax.set(xscale="log", yscale="log", xlabel="√v̂ of the weight (Adam)", ylabel="relative shrink per step",
           title="who gets regularized under Adam")
    ax.legend(fontsize=7, markerscale=4)


def has_curves(claims: list[Claim]) -> bool:
    """Whether the claims hold the regression's fitted curves (the λ sweeps ran its task)."""
    gap = next((c for c in claims if c.key == "gap_vs_lambda"), None)
    return gap is not None and bool(gap.series.get("curves", {}).get("fits"))


def curves(claims: list[Claim]) -> Rendered:
    """The regression's fitted curves for the smallest and the largest λ of each arm over its
    training points, and its gap (in MSE) against λ."""
    import matplotlib.pyplot as plt

    gap = next(c for c in claims if c.key == "gap_vs_lambda")
    sw = gap.series["sweeps"]
    sw = sw[sw.task == CURVE_TASK]
    seed = int(sw.seed.min())
    arms = [a for a in ("l2", "decoupled") if (sw.arm == a).any()]
    with drawing():
        fig, axes = plt.subplots(1, len(arms) + 1, figsize=(WIDTH, 3.5),
                                 gridspec_kw={"width_ratios": [1.25] * len(arms) + [1]})
        for ax, arm in zip(axes, arms):
            _fit_panel(ax, gap.series["curves"], sw[(sw.arm == arm) & (sw.seed == seed)], arm, seed)
        axes[0].set_ylabel("y")
        _mse_gap_panel(axes[-1], gap, arms)
        for a in axes:
            a.grid(alpha=0.3)
        fig.tight_layout()
        png, pdf = figure_bytes(fig, pdf_dpi="figure")
    return Rendered("curves", "figures", "A linear regression with a rich feature expansion, weakly and strongly "
                    "regularized", (
        f"linreg-curve1d: 40 fixed Gaussian RBF features of x, one linear layer, mean squared error, Adam "
        f"(seed {seed}). Left panels, one per arm: the fitted curve at the smallest λ of the sweep (thin) follows "
        "the noise between the training points (black dots; dashed: the curve they were drawn around, "
        "sin(2πx) + x/2, noise σ = 0.3); at the largest λ (thick) it is smooth and shrunk towards the mean. "
        "Each label gives the fit's train and test MSE (1,000 test points; the noise alone costs 0.09). "
        "Right: the generalization gap in MSE (test − train) against λ, each arm in its own convention, mean with "
        "95% interval over seeds."),
        "Fitted curves of a linear regression on RBF features for a small and a large λ per arm over the "
        "training points, and the gap in MSE against λ.", png, pdf)


def _fit_panel(ax, cv: dict, runs, arm: str, seed: int) -> None:
    """One arm's fitted curves at its smallest and largest λ (``runs``: its sweep rows of ``seed``)."""
    lo_y, hi_y = float(np.min(cv["y"])), float(np.max(cv["y"]))
    pad = 0.25 * (hi_y - lo_y)
    ax.plot(cv["grid"], cv["truth"], color="black", lw=0.9, ls="--", label="true curve", zorder=2)
    ax.scatter(cv["x"], cv["y"], s=7, color="black", zorder=3, label=f"{len(cv['x'])} training points")
    lams = sorted(runs.lam.unique())
    for lam, lw, alpha in ((lams[0], 1.0, 0.75), (lams[-1], 2.2, 1.0)):
        r = runs[runs.lam == lam].iloc[0]
        ax.plot(cv["grid"], cv["fits"][(arm, lam, seed)], color=color(arm), lw=lw, alpha=alpha, zorder=4,
                label=f"λ = {lam:.0e}: train MSE {r.train_error:.3f}, test {r.test_error:.3f}")
    ax.set(ylim=(lo_y - pad, hi_y + pad), xlabel="x", title=f"{label(arm)}: smallest and largest λ")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)


def _mse_gap_panel(ax, gap: Claim, arms: list[str]) -> None:
    for arm in arms:
        lams, mean, low, high = _interval(gap.series["gap"][f"{CURVE_TASK}/{arm}"])
        ax.plot(lams, mean, "o-", color=color(arm), label=label(arm), ms=3)
        ax.fill_between(lams, low, high, color=color(arm), alpha=0.12, lw=0)
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xscale="log", xlabel="λ", ylabel="gap: test − train MSE", title="gap against λ (MSE)")
    ax.legend(fontsize=7, loc="lower left")


def has_mechanics(claims: list[Claim]) -> bool:
    """Whether the claims hold the rotational-equilibrium and timescale measurements."""
    keys = {c.key for c in claims}
    return {"equilibrium", "timescale"} <= keys


def mechanics(claims: list[Claim]) -> Rendered:
    """Two panels: per layer, the angular update over its prediction for both arms; the test error against
    τ_epoch for each training-set size, its best λ marked."""
    import matplotlib.pyplot as plt

    by = {c.key: c for c in claims}
    with drawing():
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.3))
        _equilibrium_panel(axes[0], by["equilibrium"])
        _timescale_panel(axes[1], by["timescale"])
        for a in axes:
            a.grid(alpha=0.3)
        fig.tight_layout()
        png, pdf = figure_bytes(fig, pdf_dpi="figure")
    tol = by["equilibrium"].numbers["tol"]
    return Rendered("mechanics", "figures", "Rotational equilibrium per layer, and the timescale at three data sizes", (
        "Left: CNN with batch norm on MNIST-1D, per regularized layer (conv: scale-invariant; head: not), the mean "
        "angular update per step over the second half of training divided by the rotational equilibrium "
        "√(2ηλ(1−β₁)/(1+β₁)) — for Adam + L2, which has no prediction, by AdamW's at L2's median per-weight "
        f"shrink. Shaded: within {100 * tol:.0f}% of 1. Right: MLP on MNIST-1D with AdamW at three training-set "
        "sizes, the same epochs and η: test error (mean over seeds) against τ_epoch = 1/(η·λ·steps per epoch); "
        "each size's best λ is the larger marker. If the best τ_epoch stays put, the markers line up vertically."),
        "Per-layer angular update over its prediction for AdamW and Adam + L2, and test error against the "
        "timescale in epochs at three training-set sizes.", png, pdf)


def _equilibrium_panel(ax, claim: Claim) -> None:
    series = claim.series["equilibrium"]
    arms = [a for a in ("decoupled", "l2") if a in series]
    layers = list(series[arms[0]])
    width = 0.8 / len(arms)
    tol = claim.numbers["tol"]
    ax.axhspan(1 - tol, 1 + tol, color="#999999", alpha=0.18, lw=0)
    ax.axhline(1, color="black", lw=0.7)
    for j, arm in enumerate(arms):
        ratios = [series[arm][layer]["measured"] / series[arm][layer]["predicted"] for layer in layers]
        xs = np.arange(len(layers)) + (j - (len(arms) - 1) / 2) * width
        ax.bar(xs, ratios, width, color=color(arm), label=label(arm))
        for x, r in zip(xs, ratios):
            ax.text(x, r + 0.02, f"{r:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(np.arange(len(layers)), [f"{x}\n(not scale-inv.)" if not series[arms[0]][x]["invariant"] else x
                                           for x in layers], fontsize=7)
    ax.set(ylabel="angular update / predicted", title="rotational equilibrium per layer",
           ylim=(0, max(1.35, ax.get_ylim()[1])))
    ax.legend(fontsize=7, loc="upper left")


def _timescale_panel(ax, claim: Claim) -> None:
    import matplotlib as mpl

    series = claim.series["timescale"]
    shades = mpl.colormaps["viridis"](np.linspace(0.1, 0.8, len(series)))
    for shade, (n, m) in zip(shades, sorted(series.items())):
        ax.plot(m.tau_epoch, 100 * m.test_error, "o-", color=shade, ms=3, label=f"{n:,} examples")
        best = m.test_error.idxmin()
        ax.plot([m.tau_epoch[best]], [100 * m.test_error[best]], "o", color=shade, ms=9, mfc="none", mew=1.6)
    ax.set(xscale="log", xlabel="τ_epoch = 1/(η·λ·steps per epoch)", ylabel="test error (%)",
           title="AdamW: test error against the timescale")
    ax.legend(fontsize=7)
