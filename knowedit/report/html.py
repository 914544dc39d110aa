"""The self-contained HTML report: inline CSS, figures as data: URIs, no external resources, so it
opens in a browser with no network."""
from __future__ import annotations

import html

import pandas as pd

from .tables import _fmt

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td.t{text-align:left;max-width:420px;white-space:pre-wrap}
img{max-width:100%;margin:0.4em 0}.note{color:#555;font-size:0.9em}
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def table_html(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "<p class='note'>(no data)</p>"
    d = df.reset_index() if df.index.names[0] is not None else df
    head = "".join(f"<th>{esc(c)}</th>" for c in d.columns)
    body = []
    for row in d.itertuples(index=False):
        cells = "".join(f"<td class='t'>{esc(v)}</td>" if isinstance(v, str) else f"<td>{esc(_fmt(v))}</td>"
                        for v in row)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def img(b64: str | None, alt: str) -> str:
    if not b64:
        return "<p class='note'>(no data for this figure)</p>"
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{b64}'>"


def page(title: str, sections: list[tuple[str, str]], meta: dict | None = None) -> str:
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    if meta:
        items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in meta.items())
        parts.append(f"<ul class='note'>{items}</ul>")
    for heading, body in sections:
        parts.append(f"<h2>{esc(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
