"""The claims report: ``claims.csv``, ``report.html`` and ``report.pdf``, laid out as a study's report is
(:mod:`wdstudy.report.html`, :mod:`wdstudy.report.pdf`) under a header of its own."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .setup import Claim

TITLE = "What the textbooks claim about weight decay, measured"


def write(out_dir: Path, claims: list[Claim], quick: bool, seconds: float) -> None:
    """Write the claims (with their verdicts) into ``out_dir``; ``seconds``: how long their runs took."""
    import pandas as pd

    from ..report.document import DocumentHeader, Para, Section, Table
    from ..report.html import render_html
    from ..report.pdf import render_pdf
    from .figures import (  # matplotlib: imported when drawing
        curves,
        has_curves,
        has_mechanics,
        measurements,
        mechanics,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"key": c.key, "claim": c.claim, "how": c.how, "measured": c.measured, "verdict": c.verdict,
                   "numbers": json.dumps(c.numbers)} for c in claims]).to_csv(out_dir / "claims.csv", index=False)
    figs = [measurements(claims)] + ([curves(claims)] if has_curves(claims) else []) + \
        ([mechanics(claims)] if has_mechanics(claims) else [])
    head = DocumentHeader("claims", TITLE,
                          f"Measured by `python -m wdstudy claims{' --quick' if quick else ''}` on "
                          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: small training runs "
                          "through wdstudy.train.train_run on MNIST-1D and curve1d, no search, no storage.")
    smaller = " (--quick: fewer epochs, λ values and seeds)" if quick else ""
    sections = [
        Section("claims", "1. Claims and verdicts", [
            Para(f"Each claim was tested by small training runs{smaller}, {seconds:.0f} s in all. A verdict is "
                 "computed from the numbers in its row by wdstudy.claims.verdict; claims.csv holds them."),
            Table("claims", ["claim", "verdict", "measured", "how it was tested"],
                  [[c.claim, c.verdict, c.measured, c.how] for c in claims], [3.2, 1.6, 3.2, 3.0])]),
        Section("figures", "2. Measurements", figs),
    ]
    (out_dir / "report.html").write_text(render_html(head, sections))
    render_pdf(head, sections, out_dir / "report.pdf")
