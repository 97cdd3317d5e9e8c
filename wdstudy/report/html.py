"""The report as one self-contained HTML file (figures embedded as PNG data URIs).

Readable at 1280 px and on a phone: the page is one column; a wide table scrolls inside its
own box, its first column stays in view, and the key columns come first.
"""

from __future__ import annotations

import base64
import html

from .document import DocumentHeader, Listing, Para, Section, Table
from .figures import PNG_DPI, Rendered

CSS = """
*{box-sizing:border-box}
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;
color:#222;line-height:1.45;font-size:15px}
h1{font-size:1.55em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em;font-size:1.25em}
nav{font-size:.9em;line-height:1.9}nav a{margin-right:.9em;white-space:nowrap}
.tw{overflow-x:auto;margin:.6em 0;border:1px solid #e3e3e3}
table{border-collapse:collapse;font-size:.84em;width:100%}
th,td{border-bottom:1px solid #e6e6e6;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4;white-space:nowrap}
td{white-space:nowrap}td.wrap{white-space:normal;min-width:16em}
th:first-child,td:first-child{position:sticky;left:0;background:#fff;box-shadow:1px 0 0 #e6e6e6}
th:first-child{background:#f4f4f4}
.warn{color:#a00}
.status{background:#fff4e5;border-left:4px solid #f0a500;padding:.5em 1em;margin:.6em 0}
.note{color:#555;font-style:italic}
.cap{font-size:.88em;color:#444;margin:.2em 0 1em}
figure{margin:1.2em 0}figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.88em;color:#444}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.82em}
@media (max-width:600px){body{font-size:14px;padding:0 .6em}td.wrap{min-width:13em}}
"""


def render_html(head: DocumentHeader, sections: list[Section]) -> str:
    e = html.escape
    code = f" <code>{e(head.code)}</code>" if head.code else ""
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>wdstudy report: {e(head.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(head.title)}{code}</h1>",
             f"<p>{e(head.generated)}</p>",
             "<nav>" + " ".join(f'<a href="#{e(s.key)}">{e(s.title)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        parts.append(f'<h2 id="{e(s.key)}">{e(s.title)}</h2>')
        parts += [_block(b) for b in s.blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


def _block(b) -> str:
    e = html.escape
    if isinstance(b, Para):
        cls = {"status": ' class="status"', "note": ' class="note"'}.get(b.kind, "")
        return f"<p{cls}>{e(b.text)}</p>"
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Rendered):
        return (f'<figure id="fig-{e(b.key)}"><img alt="{e(b.alt)}" style="max-width:{_css_width(b.png)}px" '
                f'src="data:image/png;base64,{base64.b64encode(b.png).decode()}">'
                f"<figcaption><b>{e(b.title)}.</b> {e(b.caption)}</figcaption></figure>")
    if isinstance(b, Listing):
        return f"<h3>{e(b.title)}</h3><pre>{e(b.text)}</pre>"
    raise TypeError(f"unknown block {type(b).__name__}")


def _table(t: Table) -> str:
    e = html.escape
    # long text wraps instead of widening the table: a wide column, or one holding sentences
    wide = {i for i, w in enumerate(t.widths) if w >= 2.7 or max((len(str(r[i])) for r in t.rows), default=0) > 40}
    out = [f'<div class="tw" id="table-{e(t.key)}"><table><thead><tr>',
           *(f"<th>{e(h)}</th>" for h in t.head), "</tr></thead><tbody>"]
    for row in t.rows:
        cells = []
        for i, (h, v) in enumerate(zip(t.head, row)):
            cls = [c for c, on in (("wrap", i in wide), ("warn", h in t.warn_cols and v)) if on]
            cells.append(f"<td{' class=' + chr(34) + ' '.join(cls) + chr(34) if cls else ''}>{e(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if t.caption:
        out.append(f'<p class="cap">{e(t.caption)}</p>')
    return "".join(out)


def _css_width(png: bytes) -> int:
    """A figure's display width (120 CSS px per inch of the drawing: its 9-pt text reads at ~11 px)."""
    return int(int.from_bytes(png[16:20], "big") * 120 / PNG_DPI)
