"""Reports: HTML and PDF comparing the regularizer arms of a study, from its storage alone.

:func:`build_report` reads one study (every cell study carries its own description),
computes the tables (:mod:`.tables`), draws the figures (:mod:`.figures`), lists the content
once (:mod:`.document`) and lays it out twice, and writes into the output folder:

* ``report.html``: one self-contained file (:mod:`.html`);
* ``report.pdf``: A4, typeset tables, vector figures, a bookmark per section (:mod:`.pdf`);
* ``figures/*.png`` and ``tables/*.csv``.

A study that is still running or partly failed is reported as it is; the first page says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..outputs import replacing, write_bytes, write_text
from .document import SECTIONS, build_document, study_header
from .figures import render_all
from .html import render_html
from .pdf import render_pdf
from .tables import ReportData, compare_arms, compute_tables, load_report_data

__all__ = ["SECTIONS", "ReportData", "ReportPaths", "build_report", "compare_arms", "compute_tables",
           "load_report_data"]

TABLES = ("summary", "comparison", "selection", "pruning", "coupling", "importance", "counts", "meaning",
          "diagnostics")


@dataclass
class ReportPaths:
    html: Path
    pdf: Path
    figures: list[Path]
    tables: list[Path]


def build_report(storage, study: str, out_dir: Path, storage_label: str, landscape_axis: str = "auto",
                 where: str = "landscape_axis") -> ReportPaths:
    """Write report.html, report.pdf, figures/ and tables/ for ``study`` into ``out_dir``.

    ``landscape_axis`` (:data:`wdstudy.spec.LANDSCAPE_AXES`): the landscape figure's y axis for the
    decoupled-decay arms; a bad value is refused naming ``where`` (the flag or spec key it came from)."""
    from ..spec import check_landscape_axis

    check_landscape_axis(landscape_axis, where)
    d = load_report_data(storage, study, storage_label)
    d.landscape_axis = landscape_axis
    compute_tables(d, importance=False)
    figures = render_all(d)  # computes the importances while the figures are drawn
    sections = build_document(d, figures)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir, tab_dir = out_dir / "figures", out_dir / "tables"
    fig_dir.mkdir(exist_ok=True)
    tab_dir.mkdir(exist_ok=True)
    for old in fig_dir.glob("*.png"):  # figures of an earlier layout would linger beside the new ones
        old.unlink(missing_ok=True)  # (another process writing this report may have removed it)

    tables = []
    for name in TABLES:
        p = tab_dir / f"{'trial_counts' if name == 'counts' else name}.csv"
        with replacing(p) as tmp:
            getattr(d, name).to_csv(tmp, index=False)
        tables.append(p)
    fig_paths = []
    for f in figures:
        write_bytes(fig_dir / f"{f.key}.png", f.png)
        fig_paths.append(fig_dir / f"{f.key}.png")
    html_path, pdf_path = out_dir / "report.html", out_dir / "report.pdf"
    head = study_header(d)
    write_text(html_path, render_html(head, sections))
    render_pdf(head, sections, pdf_path)
    return ReportPaths(html_path, pdf_path, fig_paths, tables)
