"""HTML pieces of the report page (``samtune.finetune.report.page``): escaping, numbers as the
tables show them, tables, images, notes and definition lists; no script, CSS in the page."""

from __future__ import annotations

import base64
import html
import math
import re


def esc(value) -> str:
    return html.escape(str(value))


def num(value, digits: int = 3) -> str:
    """A metric as the tables show it; NaN (absent class, undefined HD95) and missing as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{value:.{digits}f}"


def table(header: list[str], rows: list[tuple[dict, list[str]]], cls: str, attrs: str = "") -> str:
    """``rows``: (attributes of the <tr>, cells already escaped); cells starting with a digit, sign or dash are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for tr, cells in rows:
        tr_attrs = "".join(f' {k}="{esc(v)}"' for k, v in tr.items())
        tds = "".join(f'<td class="n">{c}</td>' if re.sub("<[^>]+>", "", c)[:1] in "0123456789-+—" else f"<td>{c}</td>" for c in cells)
        body.append(f"<tr{tr_attrs}>{tds}</tr>")
    return f'<div class="scroll"><table class="{cls}"{attrs}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{esc(alt)}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def dl(pairs: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for key, value in d.items():
        if isinstance(value, dict):
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", esc("—" if value is None else value)))
    return out
