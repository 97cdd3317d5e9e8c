"""The verdict rules: one small function per claim, from the claim's numbers alone.

A verdict is *holds*, *does not hold*, or *holds only when …* / *holds only for …*. Because
each rule reads only the numbers a claim stores, :func:`verdict` re-checks any row of
``claims.csv`` without running anything.
"""

from __future__ import annotations

from collections.abc import Callable

from .setup import TOL

Numbers = dict[str, float]
#: the rule of each claim, by its key
RULES: dict[str, Callable[[Numbers], str]] = {}


def rule(key: str) -> Callable[[Callable[[Numbers], str]], Callable[[Numbers], str]]:
    """Register the decorated function as the verdict rule of the claim ``key``."""
    def register(fn: Callable[[Numbers], str]) -> Callable[[Numbers], str]:
        RULES[key] = fn
        return fn

    return register


def verdict(key: str, n: Numbers) -> str:
    """The verdict of a claim from its numbers alone (so claims.csv can be re-checked); KeyError for an
    unknown claim."""
    return RULES[key](n)


def _arms(n: Numbers) -> list[str]:
    """The arms (or task/arm pairs) a claim's numbers cover: those with a ``…_monotone`` entry."""
    return [k[: -len("_monotone")] for k in n if k.endswith("_monotone")]


@rule("sgd_equal")
def sgd_equal(n: Numbers) -> str:
    return "holds" if n["max_rel_diff"] <= TOL else "does not hold"


@rule("momentum_adam_differ")
def momentum_adam_differ(n: Numbers) -> str:
    return "holds" if min(n["momentum_distance"], n["adam_distance"]) > 100 * TOL else "does not hold"


@rule("rule_098")
def rule_098(n: Numbers) -> str:
    corrected = max(n["sgd_corrected"], n["adam_corrected"]) <= TOL
    uncorrected = min(n["sgd_uncorrected"], n["adam_uncorrected"]) > TOL
    if corrected and uncorrected:
        return "holds only when the learning rate is scaled by 0.98"
    return "holds" if corrected else "does not hold"


@rule("gap_vs_lambda")
def gap_vs_lambda(n: Numbers) -> str:
    """Monotone for every arm; else a significant negative trend counts, said as such."""
    arms = _arms(n)
    mono = [a for a in arms if n[f"{a}_monotone"]]
    trend = [a for a in arms if not n[f"{a}_monotone"] and n[f"{a}_rho"] < 0 and n[f"{a}_p"] < 0.05]
    rest = [a for a in arms if a not in mono and a not in trend]
    as_trend = "as a trend (negative ρ, p < 0.05, not monotone) for " + ", ".join(trend)
    if not rest:
        return "holds" if not trend else (f"holds for {', '.join(mono)}; " if mono else "") + f"only {as_trend}"
    if not (mono or trend):
        return "does not hold"
    if not trend:
        return f"holds only for {', '.join(mono)} (not for {', '.join(rest)})"
    return (f"holds only for {', '.join(mono)}, and " if mono else "holds only ") + \
        f"{as_trend} (not for {', '.join(rest)})"


@rule("norm_vs_lambda")
def norm_vs_lambda(n: Numbers) -> str:
    ok = [a for a in _arms(n) if n[f"{a}_monotone"]]
    if len(ok) == len(_arms(n)):
        return "holds"
    if not ok:
        return "does not hold"
    return f"holds only for {', '.join(ok)} (not for {', '.join(a for a in _arms(n) if a not in ok)})"


@rule("l1_zeros")
def l1_zeros(n: Numbers) -> str:
    if not (n["l1-decoupled_max_zero_fraction"] > 0 and n["l2_max_zero_fraction"] == 0):
        return "does not hold"
    if n["l1_max_zero_fraction"] == 0:
        return "holds only when L1 acts as a soft threshold (the gradient form leaves no exact zeros)"
    return "holds"


@rule("converge_faster")
def converge_faster(n: Numbers) -> str:
    if n["steps_decoupled"] < n["steps_none"]:
        return "holds"
    return "does not hold" if n["steps_decoupled"] > n["steps_none"] else "does not hold (the same number of steps)"


@rule("adam_sqrt_v")
def adam_sqrt_v(n: Numbers) -> str:
    return "holds" if n["l2_ratio"] < 0.5 and abs(n["decoupled_ratio"] - 1) < 1e-9 else "does not hold"
