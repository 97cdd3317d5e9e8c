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
                            "l1_zeros", "converge_faster", "adam_sqrt_v"]
    for r in df.itertuples():
        assert r.verdict == verdict(r.key, json.loads(r.numbers))
        assert r.verdict.startswith(("holds", "does not hold"))
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
