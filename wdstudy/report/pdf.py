"""The report as an A4 PDF: typeset text and tables (fpdf2), vector figures, bookmarks.

fpdf2 lays out the pages: headings (each one a bookmark), paragraphs, real tables that wrap
their cells and repeat their header across pages, and an empty box of the right size for
each figure. pypdf then stamps every figure, drawn by matplotlib's own PDF backend (vectors;
rasterized parts at 200 dpi), into its box, and sets the title and subject metadata.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from fpdf import FPDF
from fpdf.enums import MethodReturnValue
from fpdf.fonts import FontFace
from pypdf import PdfReader, PdfWriter
from pypdf.generic import ArrayObject, DecodedStreamObject, DictionaryObject, FloatObject, NameObject

from ..outputs import replacing
from .document import DocumentHeader, Listing, Para, Section, Table
from .figures import Rendered

MARGIN = 15.0  # mm
PT_PER_MM = 72 / 25.4
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
RED = (176, 0, 0)


@dataclass
class Placement:
    page: int  # 1-based
    x: float  # mm from the left
    y: float  # mm from the top
    w: float
    h: float
    pdf: bytes


class _Doc(FPDF):
    study = ""

    def footer(self) -> None:
        self.set_y(-10)
        self.set_font("sans", size=7)
        self.set_text_color(120)
        self.cell(0, 4, f"wdstudy report · {self.study} · page {self.page_no()} of {{nb}}", align="C")
        self.set_text_color(0)


def render_pdf(head: DocumentHeader, sections: list[Section], path: Path) -> None:
    pdf = _Doc(orientation="P", unit="mm", format="A4")
    pdf.study = head.name
    pdf.set_margins(MARGIN, MARGIN, MARGIN)
    pdf.set_auto_page_break(True, margin=14)
    pdf.add_font("sans", "", str(FONT_DIR / "DejaVuSans.ttf"))
    pdf.add_font("sans", "B", str(FONT_DIR / "DejaVuSans-Bold.ttf"))
    pdf.add_font("sans", "I", str(FONT_DIR / "DejaVuSans-Oblique.ttf"))
    pdf.add_font("mono", "", str(FONT_DIR / "DejaVuSansMono.ttf"))
    pdf.set_title(f"wdstudy report: {head.name}")
    pdf.set_subject("Decoupled weight decay vs L2 regularization: paired comparisons, (η, λ) landscapes, "
                    "coupling, search audits")
    pdf.set_author("wdstudy")
    pdf.set_creator("wdstudy")
    pdf.set_keywords("weight decay, L2 regularization, AdamW, hyperparameter search, Optuna")
    pdf.add_page()
    pdf.set_font("sans", "B", 14)
    pdf.multi_cell(0, 6.5, head.heading, align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("sans", "", 8)
    pdf.set_text_color(90)
    pdf.multi_cell(0, 4, head.generated, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0)
    pdf.ln(2)
    placements: list[Placement] = []
    for s in sections:
        for i, b in enumerate(s.blocks):
            sized = _size_figure(pdf, b) if isinstance(b, Rendered) else None
            if i == 0:  # the heading stays with the first block of its section
                _heading(pdf, s.title, keep=sized.total if sized else _min_height(pdf, b))
            if isinstance(b, Para):
                _para(pdf, b)
            elif isinstance(b, Table):
                _table(pdf, b)
            elif isinstance(b, Rendered):
                placements.append(_figure(pdf, b, sized))
            elif isinstance(b, Listing):
                _listing(pdf, b)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(bytes(pdf.output()))))
    stamps: dict[int, list[bytes]] = {}
    for i, p in enumerate(placements):
        fig = PdfReader(io.BytesIO(p.pdf)).pages[0]
        box = fig.mediabox
        page = writer.pages[p.page - 1]
        s = p.w * PT_PER_MM / float(box.width)
        x = p.x * PT_PER_MM - float(box.left) * s
        y = float(page.mediabox.height) - (p.y + p.h) * PT_PER_MM - float(box.bottom) * s
        name = f"/wdFig{i}"
        _xobjects(page)[NameObject(name)] = _form(writer, fig)
        stamps.setdefault(p.page - 1, []).append(f"q {s:.6f} 0 0 {s:.6f} {x:.4f} {y:.4f} cm {name} Do Q".encode())
    for index, ops in stamps.items():
        page = writer.pages[index]
        content = DecodedStreamObject()
        content.set_data(page.get_contents().get_data() + b"\n" + b"\n".join(ops) + b"\n")
        page.replace_contents(content)
        page.compress_content_streams()
    writer.add_metadata({"/Title": f"wdstudy report: {head.name}", "/Subject": pdf.subject or "",
                         "/Author": "wdstudy", "/Keywords": pdf.keywords or ""})
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        writer.write(fh)


def _form(writer: PdfWriter, fig) -> object:
    """A figure's page as a form XObject of ``writer`` (its drawing is kept as it is, not re-parsed)."""
    form = DecodedStreamObject()
    form.set_data(fig.get_contents().get_data())
    form[NameObject("/Type")] = NameObject("/XObject")
    form[NameObject("/Subtype")] = NameObject("/Form")
    form[NameObject("/BBox")] = ArrayObject([FloatObject(float(v)) for v in fig.mediabox])
    form[NameObject("/Resources")] = fig["/Resources"].get_object().clone(writer)
    return writer._add_object(form)


def _xobjects(page) -> DictionaryObject:
    res = page["/Resources"].get_object()
    if "/XObject" not in res:
        res[NameObject("/XObject")] = DictionaryObject()
    return res["/XObject"].get_object()


def _space(pdf: FPDF) -> float:
    return pdf.h - pdf.b_margin - pdf.get_y()


def _min_height(pdf: FPDF, b) -> float:
    """Height (mm) a block needs below its heading so the heading is not left alone."""
    if isinstance(b, Listing):
        return min(_listing_height(pdf, b), 60)
    return 30 if isinstance(b, Table) else 14


def _heading(pdf: FPDF, title: str, keep: float) -> None:
    if _space(pdf) < 12 + keep:  # never a heading alone at the foot of a page
        pdf.add_page()
    pdf.ln(3)
    pdf.start_section(title)
    pdf.set_font("sans", "B", 12)
    pdf.cell(0, 7, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_draw_color(210)
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.w - pdf.r_margin, pdf.get_y())
    pdf.ln(1.5)


def _para(pdf: FPDF, p: Para) -> None:
    if p.kind == "status":
        pdf.set_font("sans", "B", 8.5)
        pdf.set_fill_color(255, 244, 229)
        pdf.multi_cell(0, 4.2, p.text, fill=True, padding=1.5, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1.5)
        return
    pdf.set_font("sans", "I" if p.kind == "note" else "", 8.5)
    pdf.multi_cell(0, 4.2, p.text, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1.2)


def _table(pdf: FPDF, t: Table) -> None:
    pdf.set_font("sans", "", 6.8)
    pdf.set_draw_color(200)
    head = FontFace(emphasis="BOLD", fill_color=(240, 240, 240))
    warn = FontFace(color=RED)
    with pdf.table(col_widths=tuple(t.widths), text_align="LEFT", line_height=3.1, headings_style=head,
                   borders_layout="HORIZONTAL_LINES", padding=(0.8, 1.0), first_row_as_headings=True) as table:
        table.row(t.head)
        for r in t.rows:
            row = table.row()
            for h, v in zip(t.head, r):
                row.cell(str(v), style=warn if (h in t.warn_cols and v) else None)
    if t.caption:
        pdf.set_font("sans", "I", 7.2)
        pdf.set_text_color(70)
        pdf.multi_cell(0, 3.4, t.caption, new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(0)
    pdf.ln(2)


@dataclass
class _Sized:
    data: bytes
    w: float
    h: float
    cap_h: float

    @property
    def total(self) -> float:
        return 5 + self.h + 1 + self.cap_h


def _size_figure(pdf: FPDF, f: Rendered) -> _Sized:
    """The size a figure takes on the page (mm): the text width, or less for a small drawing."""
    data = f.pdf
    box = PdfReader(io.BytesIO(data)).pages[0].mediabox
    fw, fh = float(box.width) / PT_PER_MM, float(box.height) / PT_PER_MM
    usable_w = pdf.w - pdf.l_margin - pdf.r_margin
    usable_h = pdf.h - pdf.t_margin - pdf.b_margin
    pdf.set_font("sans", "I", 7.2)
    cap_h = 3.4 * len(pdf.multi_cell(usable_w, 3.4, f.caption, dry_run=True, output=MethodReturnValue.LINES)) + 2.5
    w = min(usable_w, fw)
    h = fh * w / fw
    if h + cap_h + 6 > usable_h:  # taller than a page: shrink to fit
        h = usable_h - cap_h - 6
        w = fw * h / fh
    return _Sized(data, w, h, cap_h)


def _figure(pdf: FPDF, f: Rendered, sized: _Sized) -> Placement:
    short = sized.total - _space(pdf)
    if 0 < short <= 0.2 * sized.h:  # nearly fits: shrink it a little rather than leave the page half empty
        sized = _Sized(sized.data, sized.w * (sized.h - short) / sized.h, sized.h - short, sized.cap_h)
    if _space(pdf) < sized.total:
        pdf.add_page()
    pdf.set_font("sans", "B", 8.8)
    pdf.cell(0, 5, f.title, new_x="LMARGIN", new_y="NEXT")
    x = pdf.l_margin + (pdf.w - pdf.l_margin - pdf.r_margin - sized.w) / 2
    place = Placement(pdf.page_no(), x, pdf.get_y(), sized.w, sized.h, sized.data)
    pdf.set_y(pdf.get_y() + sized.h + 1)
    pdf.set_font("sans", "I", 7.2)
    pdf.set_text_color(70)
    pdf.multi_cell(0, 3.4, f.caption, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0)
    pdf.ln(2.5)
    return place


def _listing_height(pdf: FPDF, b: Listing) -> float:
    pdf.set_font("mono", "", 6.8)
    lines = pdf.multi_cell(0, 3.0, b.text.rstrip(), dry_run=True, output=MethodReturnValue.LINES, padding=1.5)
    return 5 + 3.0 * len(lines) + 3


def _listing(pdf: FPDF, b: Listing) -> None:
    """A listing that fits on one page is kept on one page (no stray last lines)."""
    need = _listing_height(pdf, b)
    if need > _space(pdf) and need <= pdf.h - pdf.t_margin - pdf.b_margin:
        pdf.add_page()
    pdf.set_font("sans", "B", 9)
    pdf.cell(0, 5, b.title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("mono", "", 6.8)
    pdf.set_fill_color(246, 248, 250)
    pdf.multi_cell(0, 3.0, b.text.rstrip(), fill=True, padding=1.5, new_x="LMARGIN", new_y="NEXT")
