"""Building blocks of the self-contained HTML pages (``report.html``, ``compare.html``).

Escaping, number formatting, tables, definition lists, base64-embedded figures and the one
stylesheet. The pages load nothing from the network.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: The one stylesheet of report.html and compare.html.
CSS = (
    "\n"
    'body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;'
    "color:#1d1d1f;background:#fafafa}\n"
    "header{background:#22303c;color:#fff;padding:18px 32px}\n"
    "header h1{margin:0 0 4px;font-size:24px} header .sub{opacity:.85;font-size:14px}\n"
    "nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 32px;"
    "z-index:2;font-size:14px}\n"
    "nav a{margin-right:14px;color:#1a5fb4;text-decoration:none} nav a:hover{text-decoration:underline}\n"
    "main{max-width:1320px;margin:0 auto;padding:8px 32px 48px}\n"
    "section{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:8px 22px 18px;margin:18px 0}\n"
    "h2{font-size:20px;border-bottom:2px solid #e8e8e8;padding-bottom:6px} h3{font-size:16px;margin-top:22px}\n"
    "table{border-collapse:collapse;font-size:13px;margin:8px 0}\n"
    "th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}\n"
    "th{background:#f0f3f6} td.l,th.l{text-align:left}\n"
    "tr:nth-child(even) td{background:#fafbfc}\n"
    "tr.fail td{background:#fde2e1 !important}\n"
    ".badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}\n"
    ".pass{background:#d4f4dd;color:#135d2a} .failb{background:#c62828;color:#fff}\n"
    ".banner{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:600}\n"
    ".banner.bad{background:#fde2e1;border:1px solid #c62828;color:#8e1b1b}\n"
    ".banner.warn{background:#fff4d6;border:1px solid #d49b00;color:#6b4e00}\n"
    "figure{margin:14px 0} figure img{max-width:100%;height:auto;border:1px solid #eee}\n"
    "figcaption{font-size:13px;color:#555;margin-top:4px}\n"
    ".row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}\n"
    ".figs figure{flex:1 1 480px;max-width:620px;margin:6px 0}\n"
    ".hover{position:relative;display:inline-block;line-height:0} .hover .cell{position:absolute;z-index:1}\n"
    ".hover .cell:hover{outline:2px solid #000}\n"
    ".note{color:#666;font-style:italic}\n"
    ".sig{font-weight:700;color:#0b5394}\n"
    "pre{background:#f3f3f3;padding:10px;border-radius:6px;white-space:pre-wrap;word-break:break-all;font-size:13px}\n"
    "code{font-size:12px;background:#f3f3f3;padding:0 3px;border-radius:3px}\n"
    "details summary{cursor:pointer;color:#1a5fb4;margin:8px 0}\n"
    "dl.kv{display:grid;grid-template-columns:max-content auto;gap:3px 16px;font-size:14px} "
    "dl.kv dt{font-weight:600} dl.kv dd{margin:0}\n"
)


def escape(x: Any) -> str:
    """``str(x)`` with HTML's special characters escaped (text for a page)."""
    return html.escape(str(x))


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: '–' for missing, scientific for very small/large, else ``digits`` significant."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return escape(x)
    if f != f:
        return "–"
    if f == 0:
        return "0"
    if abs(f) < 1e-3 or abs(f) >= 1e5:
        return f"{f:.{max(1, digits - 1)}e}"
    return f"{f:.{digits}g}"


def fmt_p(p: Any) -> str:
    """A p-value; bold when < 0.05."""
    s = fmt(p, 2)
    try:
        if p is not None and float(p) < 0.05:
            return f'<span class="sig">{s}</span>'
    except (TypeError, ValueError):
        pass
    return s


def table(
    header: list[str], rows: Iterable[list[str]], left: int | set[int] = 0, row_classes: list[str] | None = None
) -> str:
    """An HTML table. ``left``: the first ``left`` columns (int) or these column indices (set) are
    left-aligned (text); the rest right-aligned (numbers). Cells are inserted as given (already escaped)."""
    rows = list(rows)
    left = set(range(left)) if isinstance(left, int) else set(left)
    out = ["<table><thead><tr>"]
    out += [f'<th class="l">{escape(h)}</th>' if i in left else f"<th>{escape(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        out.append(f"<tr{cls}>")
        out += [f'<td class="l">{c}</td>' if i in left else f"<td>{c}</td>" for i, c in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def kv_list(d: dict) -> str:
    """A definition list of ``d`` (numbers formatted, dicts and lists as JSON)."""
    items = []
    for k, v in d.items():
        if isinstance(v, float):
            val = fmt(v, 4)
        else:
            val = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        items.append(f"<dt>{escape(k)}</dt><dd><code>{escape(val)}</code></dd>")
    return f'<dl class="kv">{"".join(items)}</dl>' if items else '<p class="note">none recorded</p>'


def embed_png(path: Path, caption: str) -> str:
    """A <figure> with the PNG inlined as base64 (and a relative link to the SVG if it exists)."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    svg = path.with_suffix(".svg")
    link = f' (<a href="figures/{escape(svg.name)}">SVG</a>)' if svg.is_file() else ""
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}{link}</figcaption></figure>"
    )
