"""The regularizer arms: one registry of what each arm is, read by every module that names arms.

A spec lists arms by :attr:`Arm.name` (:mod:`wdstudy.spec` accepts :data:`NAMES`),
:mod:`wdstudy.regularizers` has one callback class per arm (its ``REGULARIZERS`` is keyed by
:data:`NAMES`), and the report orders, labels, colours and compares the arms from here
(:mod:`wdstudy.report.style`, :data:`PAIRS`). Plain data only (no torch), so reading a study
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Arm:
    """One regularizer arm."""

    #: the registry name: in specs, cell names and the storage
    name: str
    #: as tables and legends show it
    label: str
    #: its colour in every figure
    colour: str
    #: ``penalty``: a term added to the gradient (it goes through the optimizer); ``decay``: a
    #: shrink of the weights outside the optimizer; ``none``: the baseline
    kind: Literal["none", "penalty", "decay"]
    #: the norm it penalizes or shrinks (None for the baseline)
    norm: Literal["L2", "L1"] | None
    #: what its λ means, read as the slope of log λ on log η among the best trials ('' for the baseline)
    convention: str
    #: whether its per-step shrink is η·λ (True), or λ times the schedule alone (``independent``)
    shrink_scales_with_lr: bool = True
    #: the regularized arms it is compared with, as this arm − that arm (each arm is also compared
    #: with the baseline)
    compared_with: tuple[str, ...] = ()


_GRADIENT_TERM = "a gradient term: with plain SGD the shrink is η·λ (slope −1 if it matters); Adam rescales it"

#: every arm, in the order every table, legend and axis uses: the baseline first
ARMS: tuple[Arm, ...] = (
    Arm("none", "none", "#8d8d8d", "none", None, ""),
    Arm("l2", "L2", "#d1495b", "penalty", "L2", _GRADIENT_TERM),
    Arm("decoupled", "decoupled", "#00798c", "decay", "L2",
        "PyTorch's convention shrinks by η·λ per step: if that shrink is what matters, slope −1",
        compared_with=("l2",)),
    Arm("independent", "independent", "#edae49", "decay", "L2",
        "shrinks by λ per step (times the schedule): the AdamW paper expects slope 0 (separable)",
        shrink_scales_with_lr=False, compared_with=("l2", "decoupled")),
    Arm("l1", "L1", "#66a182", "penalty", "L1", _GRADIENT_TERM),
    Arm("l1-decoupled", "L1 decoupled", "#2e4057", "decay", "L1",
        "shrinks by η·λ per step: if that shrink is what matters, slope −1", compared_with=("l1",)),
)

BY_NAME: dict[str, Arm] = {a.name: a for a in ARMS}
#: the arm names, in report order
NAMES: tuple[str, ...] = tuple(BY_NAME)
#: the baseline arm, which every regularized arm is compared with
BASELINE = "none"
#: arms whose shrink is a multiple of the weights, outside the optimizer (decoupled L2 decay)
WEIGHT_DECAYS: tuple[str, ...] = tuple(a.name for a in ARMS if a.kind == "decay" and a.norm == "L2")

#: (arm, reference) pairs compared where a study has both, as arm − reference: the regularized arms
#: with each other first, then each with the baseline
PAIRS: tuple[tuple[str, str], ...] = (
    tuple((a.name, ref) for a in ARMS for ref in a.compared_with)
    + tuple((a.name, BASELINE) for a in ARMS if a.name != BASELINE)
)


def arm(name: str) -> Arm | None:
    """The arm registered as ``name`` (None for a name that is no arm)."""
    return BY_NAME.get(name)
