"""One order, one colour and one name per regularizer arm (from :mod:`wdstudy.arms`), and the
number formats, for every table and figure of the report."""

from __future__ import annotations

import math

import pandas as pd

from ..arms import ARMS as _ARMS
from ..arms import arm

#: the arms in the order every table, legend and axis uses: the baseline first
ARMS = tuple(a.name for a in _ARMS)
PALETTE = {a.name: a.colour for a in _ARMS}
LABEL = {a.name: a.label for a in _ARMS}


def arms_in(regs) -> list[str]:
    """The arms of ``regs`` in report order (unknown names last, as given)."""
    regs = list(dict.fromkeys(regs))
    return [a for a in ARMS if a in regs] + [r for r in regs if r not in ARMS]


def arm_rank(col: pd.Series) -> pd.Series:
    """Sort key for a ``regularizer`` column (other columns sort as they are)."""
    if col.name in ("regularizer", "arm"):
        return col.map({a: i for i, a in enumerate(ARMS)}).fillna(len(ARMS))
    return col


def label(reg: str) -> str:
    return LABEL.get(reg, reg)


def color(reg: str) -> str:
    return PALETTE.get(reg, "#555555")


def shrink(reg: str, lr: float, wd: float) -> float:
    """The per-step shrink an arm's (η, λ) stands for, at the base learning rate: the axis on
    which arms of different conventions are comparable. ``independent`` shrinks by λ·η_t/η_0
    (λ at the start of the schedule); the others by η·λ (for L2 and L1 that is what plain SGD
    applies; Adam rescales their gradient term)."""
    if wd is None or lr is None:
        return math.nan
    a = arm(reg)
    return float(wd) if a is not None and not a.shrink_scales_with_lr else float(lr) * float(wd)


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x, fmt: str = ".3g") -> str:
    return "—" if missing(x) else format(x, fmt)


def pct(x, digits: int = 2) -> str:
    return "—" if missing(x) else f"{100 * x:.{digits}f}%"


def pts_ci(mean, lo, hi) -> str:
    """A difference in percentage points with its 95% interval: ``+0.42 [−0.10, +0.94]``."""
    if missing(mean):
        return "—"
    if missing(lo):
        return f"{100 * mean:+.2f}"
    return f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def pm(mean, lo, hi, scale: float = 100, fmt: str = ".2f", suffix: str = "") -> str:
    """``mean ± half-width`` of a 95% interval (the mean alone when there is no interval)."""
    if missing(mean):
        return "—"
    if missing(lo):
        return f"{scale * mean:{fmt}}{suffix}"
    return f"{scale * mean:{fmt}} ± {scale * (hi - lo) / 2:{fmt}}{suffix}"


# -- a task's error metric: the classification error rate (in %) or a regression's MSE ------------


def err(metric, x) -> str:
    """One value of a task's error: ``12.34%``, or ``0.1234 MSE`` for a regression."""
    return pct(x) if metric.is_rate else ("—" if missing(x) else f"{x:.4f} MSE")


def err_pm(metric, mean, lo, hi, diff: bool = False) -> str:
    """A task's error (``diff``: a difference or gap of it) as ``mean ± half-width``: in % or points
    for an error rate, in MSE for a regression."""
    if metric.is_rate:
        return pm(mean, lo, hi, fmt="+.2f") if diff else pm(mean, lo, hi, suffix="%")
    return pm(mean, lo, hi, scale=1, fmt="+.4f" if diff else ".4f", suffix=" MSE")


def err_ci(metric, mean, lo, hi) -> str:
    """A difference of a task's error with its 95% interval: points, or MSE for a regression."""
    if metric.is_rate:
        return pts_ci(mean, lo, hi)
    if missing(mean):
        return "—"
    if missing(lo):
        return f"{mean:+.4f} MSE"
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] MSE"


def err_head(metrics, rate: str, mse: str) -> str:
    """A column head over tasks whose error is a rate (``rate``), an MSE (``mse``), or both."""
    kinds = {m.key for m in metrics}
    if kinds == {"mse"}:
        return mse
    return f"{rate} / {mse}" if "mse" in kinds else rate
