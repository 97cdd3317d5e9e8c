"""`python -m wdstudy claims --quick`: the textbook claims measured end to end, verdicts from numbers."""

from __future__ import annotations

import base64
import html
import json
import re

import pandas as pd
import pytest
from pypdf import PdfReader

from wdstudy.claims import verdict
from wdstudy.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    assert main(["claims", "--quick", "--out", str(out)]) == 0
    return out, pd.read_csv(out / "claims.csv")


@pytest.mark.integration
def test_every_claim_has_a_verdict_recomputable_from_its_numbers(quick):
    out, df = quick
    assert list(df.key) == ["sgd_equal", "momentum_adam_differ", "rule_098", "norm_vs_lambda", "gap_vs_lambda",
                            "l1_zeros", "converge_faster", "adam_sqrt_v", "equilibrium", "timescale"]
    for r in df.itertuples():
        assert r.verdict == verdict(r.key, json.loads(r.numbers))
        assert r.verdict.startswith(("holds", "does not hold", "cannot tell"))
        assert r.claim and r.how and r.measured
    page = (out / "report.html").read_text()
    assert all(html.escape(c) in page for c in df.claim) and (out / "report.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.integration
def test_sgd_equivalence_and_the_corrected_098_rule_hold_to_rounding(quick):
    _, df = quick
    n = {r.key: json.loads(r.numbers) for r in df.itertuples()}
    assert n["sgd_equal"]["max_rel_diff"] <= 1e-6  # plain SGD: L2 and decoupled are one update
    assert n["rule_098"]["sgd_corrected"] <= 1e-6 and n["rule_098"]["adam_corrected"] <= 1e-6
    assert n["rule_098"]["sgd_uncorrected"] > 1e-4 and n["rule_098"]["adam_uncorrected"] > 1e-4
    assert n["momentum_adam_differ"]["momentum_distance"] > 1e-4 and n["momentum_adam_differ"]["adam_distance"] > 1e-4
    assert n["l1_zeros"]["l2_max_zero_fraction"] == 0.0
    assert n["adam_sqrt_v"]["decoupled_ratio"] == pytest.approx(1.0) and n["adam_sqrt_v"]["l2_ratio"] < 1.0


def test_verdict_rules_on_fixed_numbers():
    assert verdict("sgd_equal", {"max_rel_diff": 3e-7}) == "holds"
    assert verdict("sgd_equal", {"max_rel_diff": 3e-2}) == "does not hold"
    assert verdict("rule_098", {"sgd_corrected": 1e-7, "adam_corrected": 2e-7, "sgd_uncorrected": 1e-2,
                                "adam_uncorrected": 2e-2}) == "holds only when the learning rate is scaled by 0.98"
    gap = {"mlp/l2_monotone": 0.0, "mlp/l2_rho": -0.6, "mlp/l2_p": 0.01, "mlp/decoupled_monotone": 1.0,
           "mlp/decoupled_rho": -0.9, "mlp/decoupled_p": 0.001}
    assert verdict("gap_vs_lambda", gap) == ("holds for mlp/decoupled; only as a trend (negative ρ, p < 0.05, "
                                             "not monotone) for mlp/l2")
    gap["mlp/l2_rho"] = 0.3
    assert verdict("gap_vs_lambda", gap) == "holds only for mlp/decoupled (not for mlp/l2)"
    gap.update({"cnn/l2_monotone": 0.0, "cnn/l2_rho": -0.7, "cnn/l2_p": 0.01})  # monotone, a trend, neither
    assert verdict("gap_vs_lambda", gap) == ("holds only for mlp/decoupled, and as a trend (negative ρ, p < 0.05, "
                                             "not monotone) for cnn/l2 (not for mlp/l2)")
    gap["mlp/decoupled_monotone"] = 0.0
    assert verdict("gap_vs_lambda", gap) == ("holds only as a trend (negative ρ, p < 0.05, not monotone) for "
                                             "mlp/decoupled, cnn/l2 (not for mlp/l2)")
    assert verdict("converge_faster", {"steps_none": 100.0, "steps_decoupled": 120.0}) == "does not hold"


@pytest.mark.integration
def test_the_linear_tasks_are_measured_and_the_fitted_curves_drawn(quick):
    out, df = quick
    n = {r.key: json.loads(r.numbers) for r in df.itertuples()}
    gap, norm = n["gap_vs_lambda"], n["norm_vs_lambda"]
    for arm in ("l2", "decoupled"):  # the regression's gap (in MSE) and weight norm enter the verdicts
        assert {f"linreg-curve1d/{arm}_{k}" for k in ("monotone", "rho", "p", "change")} <= set(gap)
        assert f"linreg-curve1d/{arm}_monotone" in norm and norm[f"linreg-curve1d/{arm}_ratio"] < 1
    measured = df.set_index("key").measured["gap_vs_lambda"]
    assert re.search(r"linreg-curve1d l2: gap [+-]\d\.\d{3} MSE → [+-]\d\.\d{3} MSE", measured)
    assert re.search(r"mlp-mnist1d l2: gap [+-]\d+\.\d pts", measured)
    page = (out / "report.html").read_text()
    fig = page[page.index('<figure id="fig-curves">'):]
    fig = fig[:fig.index("</figure>")]
    assert 'src="data:image/png;base64,' in fig and "fitted curve at the smallest λ" in fig
    png = base64.b64decode(re.search(r'base64,([^"]+)"', fig).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a drawing, not an empty canvas
    assert "A linear regression with a rich feature expansion" in PdfReader(str(out / "report.pdf")).pages[-1].extract_text()


@pytest.mark.integration
def test_the_fitted_curves_follow_the_noise_at_small_lambda():
    """The figure's data: the quick setup's weak fit is wigglier than its strong one, for both arms."""
    from dataclasses import replace

    import numpy as np

    from wdstudy import claims as C
    from wdstudy.train import quiet_lightning

    quiet_lightning()
    setup = replace(C.QUICK, gap_tasks=(C.CURVE_TASK,), seeds=[0], runs={C.CURVE_TASK: {
        "lr": 0.1, "epochs": None, "lams": {"l2": [1e-5, 1e-1], "decoupled": [1e-3, 3.0]}}})
    sw, curves = C.sweeps(setup, None)
    assert len(curves["x"]) == 50 and len(curves["grid"]) == len(curves["truth"]) == C.GRID
    for arm, (weak, strong) in (("l2", (1e-5, 1e-1)), ("decoupled", (1e-3, 3.0))):
        tv = {lam: np.abs(np.diff(curves["fits"][(arm, lam, 0)])).sum() for lam in (weak, strong)}
        assert tv[weak] > 1.5 * tv[strong]
        g = sw[sw.arm == arm].set_index("lam")
        assert g.train_error[weak] < g.train_error[strong] and g.gap_error[weak] > g.gap_error[strong]


@pytest.mark.integration
def test_the_sweeps_give_the_same_numbers_in_two_processes_as_in_one():
    """The λ sweeps' runs are independent: shared by two spawned processes (one torch thread each)
    they give exactly the numbers and fitted curves one process with one thread gives."""
    import dataclasses

    import numpy as np
    import torch

    from wdstudy.claims import CURVE_TASK, QUICK, sweeps

    tiny = dataclasses.replace(QUICK, epochs=1, seeds=[0, 1], max_train=200, lams={"l2": [1e-3], "decoupled": [0.1]},
                               runs={CURVE_TASK: {"lr": 0.1, "epochs": 3, "lams": {"l2": [1e-3], "decoupled": [0.1]}}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, c1 = sweeps(dataclasses.replace(tiny, processes=1), tiny.task().load_data(with_test=True))
    finally:
        torch.set_num_threads(threads)
    two, c2 = sweeps(dataclasses.replace(tiny, processes=2), None)
    assert len(one) == 8 and set(one.task) == {"mlp-mnist1d", CURVE_TASK}
    pd.testing.assert_frame_equal(one, two)
    assert c1["fits"].keys() == c2["fits"].keys() and len(c1["fits"]) == 4
    for k in c1["fits"]:
        np.testing.assert_array_equal(c1["fits"][k], c2["fits"][k])


def _equilibrium_numbers(decoupled: dict, l2: dict, invariant=("conv1", "conv2")) -> dict:
    n = {"tol": 0.2, **{f"decoupled/{k}_ratio": v for k, v in decoupled.items()},
         **{f"l2/{k}_ratio": v for k, v in l2.items()}}
    n.update({f"{k}_invariant": float(k in invariant) for k in decoupled})
    return n


def test_equilibrium_rule_on_fixed_numbers():
    n = _equilibrium_numbers({"conv1": 0.95, "conv2": 1.1, "head": 0.9}, {"conv1": 0.4, "conv2": 1.0, "head": 0.9})
    assert verdict("equilibrium", n) == "holds"
    n = _equilibrium_numbers({"conv1": 0.95, "conv2": 1.1, "head": 0.9}, {"conv1": 0.9, "conv2": 1.0, "head": 1.15})
    assert verdict("equilibrium", n).startswith("does not hold: Adam + L2's layers sit within 20%")
    n = _equilibrium_numbers({"conv1": 0.95, "conv2": 1.1, "head": 0.45}, {"conv1": 0.3, "conv2": 1.0, "head": 0.4})
    assert verdict("equilibrium", n) == ("holds only for the scale-invariant layers (conv1, conv2); AdamW's head "
                                         "(not scale-invariant) sits at 0.45 of the prediction")
    n = _equilibrium_numbers({"conv1": 0.6, "conv2": 1.1, "head": 0.45}, {"conv1": 0.3, "conv2": 1.0, "head": 0.4})
    assert verdict("equilibrium", n) == "does not hold: AdamW's conv1, head sit outside 20% of the prediction (0.60, 0.45)"


def _timescale_numbers(best: dict, near: dict | None = None, lams=(0.25, 0.5, 1.0, 2.0, 4.0), lr=1e-2) -> dict:
    n = {"grid_step": 2.0, "seeds": 2.0, "noise": 0.01}
    for size, lam in best.items():
        spe = size // 120
        lo, hi = (near or {}).get(size, (lam, lam))
        n.update({f"n{size}_best_lam": lam, f"n{size}_tau_epoch": 1 / (lr * lam * spe),
                  f"n{size}_steps_per_epoch": float(spe), f"n{size}_best_error": 0.3,
                  f"n{size}_edge": float(lam in (lams[0], lams[-1])), f"n{size}_near_lo": lo, f"n{size}_near_hi": hi})
    return n


def test_timescale_rule_on_fixed_numbers():
    # λ halves with each doubling of the data: τ_epoch stays put
    assert verdict("timescale", _timescale_numbers({960: 2.0, 1920: 1.0, 3840: 0.5})).startswith("holds (best λ 2 → 1 → 0.5")
    # λ stays put: τ_epoch grows 4×
    assert verdict("timescale", _timescale_numbers({960: 1.0, 1920: 1.0, 3840: 1.0})).startswith(
        "does not hold: the best λ does not fall")
    # λ falls 16× over 4× the data: τ_epoch moves 4×
    wider = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert verdict("timescale", _timescale_numbers({960: 4.0, 1920: 0.5, 3840: 0.25}, lams=wider)).startswith(
        "holds only in part: the best λ falls, but τ_epoch moves 4×")
    assert verdict("timescale", _timescale_numbers({960: 4.0, 1920: 1.0, 3840: 0.5})) == (
        "cannot tell: the best λ is at the edge of the grid at 960 examples (λ = 4)")
    # the seeds' noise admits both a λ that stays put and one that falls as 1/size
    wide = {960: (0.5, 2.0), 1920: (0.5, 2.0), 3840: (0.5, 2.0)}
    assert verdict("timescale", _timescale_numbers({960: 2.0, 1920: 1.0, 3840: 0.5}, wide)).startswith(
        "cannot tell at this grid and noise")


@pytest.mark.integration
def test_the_mechanics_claims_are_measured_and_drawn(quick):
    out, df = quick
    n = {r.key: json.loads(r.numbers) for r in df.itertuples()}
    eq, ts = n["equilibrium"], n["timescale"]
    for arm in ("decoupled", "l2"):  # the CNN's three convolutions and its head, each arm
        assert {f"{arm}/{x}_ratio" for x in ("conv1", "conv2", "conv3", "head")} <= set(eq)
    assert eq["conv1_invariant"] == 1.0 and eq["head_invariant"] == 0.0 and eq["l2_median_shrink"] > 0
    measured = df.set_index("key").measured
    assert re.search(r"AdamW: conv1 \d\.\d\d, conv2 \d\.\d\d, conv3 \d\.\d\d, head \(not scale-invariant\) \d",
                     measured["equilibrium"])
    for size in (150, 300, 600):  # the quick setup's sizes: best λ and its τ_epoch from the runs' own numbers
        lam, spe = ts[f"n{size}_best_lam"], ts[f"n{size}_steps_per_epoch"]
        assert lam in (0.25, 1.0, 4.0) and ts[f"n{size}_tau_epoch"] == pytest.approx(1 / (1e-2 * lam * spe))
        assert f"{size} examples" in measured["timescale"]
    page = (out / "report.html").read_text()
    fig = page[page.index('<figure id="fig-mechanics">'):]
    assert "rotational equilibrium √(2ηλ(1−β₁)/(1+β₁))" in fig[:fig.index("</figure>")]
