"""One order, one colour and one name per regularizer arm, and the number formats, for every
table and figure of the report."""

from __future__ import annotations

import math

import pandas as pd

#: the arms in the order every table, legend and axis uses: the baseline first
ARMS = ("none", "l2", "decoupled", "independent", "l1", "l1-decoupled")
PALETTE = {"none": "#8d8d8d", "l2": "#d1495b", "decoupled": "#00798c", "independent": "#edae49",
           "l1": "#66a182", "l1-decoupled": "#2e4057"}
LABEL = {"none": "none", "l2": "L2", "decoupled": "decoupled", "independent": "independent",
         "l1": "L1", "l1-decoupled": "L1 decoupled"}


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
    return float(wd) if reg == "independent" else float(lr) * float(wd)


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
