"""`python -m wdstudy claims --quick`: the textbook claims measured end to end, verdicts from numbers."""

from __future__ import annotations

import html
import json

import pandas as pd
import pytest

from wdstudy.claims import verdict
from wdstudy.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    assert main(["claims", "--quick", "--out", str(out)]) == 0
    return out, pd.read_csv(out / "claims.csv")


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
    assert verdict("converge_faster", {"steps_none": 100.0, "steps_decoupled": 120.0}) == "does not hold"
