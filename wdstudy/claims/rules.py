"""The verdict rules: one small function per claim, from the claim's numbers alone.

A verdict is *holds*, *does not hold*, *holds only when …* / *holds only for …*, or *cannot tell …*
(the measurement cannot decide: a grid too coarse or too narrow, or the seeds' noise). Because
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


def _layers(n: Numbers, arm: str) -> dict[str, float]:
    """An arm's measured / predicted angular update, by layer."""
    head, tail = f"{arm}/", "_ratio"
    return {k[len(head): -len(tail)]: v for k, v in n.items() if k.startswith(head) and k.endswith(tail)}


@rule("equilibrium")
def equilibrium(n: Numbers) -> str:
    """AdamW within ``tol`` of the prediction on every layer and Adam + L2 not: holds. Where that is true
    of the scale-invariant layers only (the ones the prediction is derived for), it holds only for them."""
    tol = n["tol"]
    dec, l2 = _layers(n, "decoupled"), _layers(n, "l2")
    off = {arm: [layer for layer, r in ratios.items() if abs(r - 1) > tol] for arm, ratios in (("decoupled", dec),
                                                                                               ("l2", l2))}
    invariant = [layer for layer in dec if n.get(f"{layer}_invariant")]
    if not off["decoupled"] and off["l2"]:
        return "holds"
    if not off["decoupled"]:
        return f"does not hold: Adam + L2's layers sit within {100 * tol:.0f}% of the reference too"
    dec_inv = [layer for layer in off["decoupled"] if layer in invariant]
    l2_inv = [layer for layer in off["l2"] if layer in invariant]
    if invariant and not dec_inv and l2_inv:
        return (f"holds only for the scale-invariant layers ({', '.join(invariant)}); AdamW's "
                f"{', '.join(off['decoupled'])} (not scale-invariant) sit{'s' if len(off['decoupled']) == 1 else ''} "
                f"at {', '.join(f'{dec[x]:.2f}' for x in off['decoupled'])} of the prediction")
    return (f"does not hold: AdamW's {', '.join(off['decoupled'])} sit{'s' if len(off['decoupled']) == 1 else ''} "
            f"outside {100 * tol:.0f}% of the prediction ({', '.join(f'{dec[x]:.2f}' for x in off['decoupled'])})")


@rule("timescale")
def timescale(n: Numbers) -> str:
    """From the best λ per size: it falls (non-increasing with size, lower at the largest than at the
    smallest) and τ_epoch of the best stays within a factor 2 — holds; an edge of the grid, or seeds'
    noise that admits both a λ that stays put and one that falls as 1/size — cannot tell."""
    sizes = sorted(int(k[1: -len("_best_lam")]) for k in n if k.endswith("_best_lam"))
    best = [n[f"n{s}_best_lam"] for s in sizes]
    tau = [n[f"n{s}_tau_epoch"] for s in sizes]
    edge = [s for s in sizes if n[f"n{s}_edge"]]
    if edge:
        at = ", ".join(f"{s:,} examples (λ = {b:g})" for s, b in zip(sizes, best) if s in edge)
        return f"cannot tell: the best λ is at the edge of the grid at {at}"
    spread = max(tau) / min(tau)
    falls = all(b >= a for a, b in zip(best[1:], best)) and best[-1] < best[0]
    small, large = sizes[0], sizes[-1]
    # within the seeds' noise: the λ values near the best at the smallest and the largest size
    lo_s, hi_s, lo_l, hi_l = (n[f"n{s}_near_{e}"] for s in (small, large) for e in ("lo", "hi"))
    stays_fits = lo_l <= hi_s and lo_s <= hi_l  # one λ near the best at both sizes
    k = large / small
    falls_fits = hi_s / lo_l >= k / 2 and lo_s / hi_l <= 2 * k  # a ratio within 2× of 1/size fits
    said = f"best λ {' → '.join(f'{b:g}' for b in best)}, τ_epoch {' → '.join(f'{t:.2g}' for t in tau)}"
    if stays_fits and falls_fits:
        return (f"cannot tell at this grid and noise ({said}): within the seeds' noise a best λ that stays put fits "
                "as well as one that falls as 1/size")
    if falls and spread <= 2:
        return f"holds ({said})"
    if falls:
        return f"holds only in part: the best λ falls, but τ_epoch moves {spread:.2g}× ({said})"
    return f"does not hold: the best λ does not fall with the data ({said})"
