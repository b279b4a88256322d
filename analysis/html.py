"""HTML building blocks for the report pages: escaping, tables, figures, the page and its CSS.

Plain strings, no template engine: every piece of text goes through ``esc``,
every number through analysis.fmt. The CSS is sized for a projector (large
type, high contrast, wide tables that wrap).
"""
from __future__ import annotations

import html

import pandas as pd

from .fmt import MISSING, is_number, num

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 22px;
       line-height: 1.45; color: #111; max-width: 1500px; margin: 0 auto; padding: 1em 1.5em; }
h1 { font-size: 2em; margin-bottom: 0.2em; } h2 { font-size: 1.5em; border-bottom: 3px solid #ddd;
     margin-top: 2em; } h3 { font-size: 1.2em; }
.summary { background: #eef6ff; border-left: 8px solid #1f77b4; padding: 0.6em 1.2em; font-size: 1.1em; }
.warnings { background: #fff4e5; border-left: 8px solid #ff7f0e; padding: 0.6em 1.2em; }
.missing { background: #f3f3f3; border-left: 8px solid #999; padding: 0.6em 1.2em; }
.finding { font-size: 1.1em; background: #f7f7f7; padding: 0.5em 1em; margin: 0.3em 0 1.5em; }
figure { margin: 1em 0 0; } figure img { width: 100%; max-width: 1400px; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.8em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.met { background: #e3f6e3; } td.missed { background: #fde2e2; } td.not-measured { color: #777; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.3em; }
.small { font-size: 0.75em; color: #555; }
"""


def esc(text) -> str:
    return html.escape("" if text is None else str(text))


def cell(value) -> tuple[str, str]:
    """(css class, text) for one table cell."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "num", MISSING
    if is_number(value):
        return "num", num(value)
    return "", str(value)


def table(frame: pd.DataFrame, status_column: str | None = None, swatch=None) -> str:
    """A DataFrame as an HTML table; ``status_column`` cells get a class (met/missed); ``swatch`` colours rows."""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for column in frame.columns:
            css, text = cell(row[column])
            if column == status_column:
                css = str(row[column]).replace(" ", "-")
            mark = ""
            if swatch and column == "variant" and isinstance(row[column], str):
                mark = f'<span class="swatch" style="background:{swatch(row[column])}"></span>'
            cells.append(f'<td class="{css}">{mark}{esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(png: str, svg: str, alt: str) -> str:
    return (f'<figure><a href="{esc(svg)}"><img src="{esc(png)}" alt="{esc(alt)}"></a></figure>')


def bullets(items, css: str) -> str:
    items = [i for i in items if i]
    if not items:
        return ""
    return f'<div class="{css}"><ul>' + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul></div>"


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
