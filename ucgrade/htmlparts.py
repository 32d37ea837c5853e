"""HTML building blocks of a report page: the style sheet, tables, embedded PNGs, headline tiles, and the page.

Each page is one self-contained file (every image inside it), so that it can be opened or e-mailed alone.
"""

import base64
import datetime
import html
import io
import re
from pathlib import Path

from PIL import Image

from . import files

# Plots are shown at their size in inches (96 CSS pixels each), so that their 10-point labels read as 10 points;
# on a screen 1200 px wide or more, a pair of plots (the confusion matrices) stays side by side, shrunk if need be.
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
  color:#222;line-height:1.35}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
  vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.settings td{white-space:pre-line;overflow-wrap:anywhere}table.settings td:first-child{white-space:nowrap}
.card{border:1px solid #c9d3e0;border-radius:6px;background:#f6f8fb;padding:0 1.2em .6em;margin-top:1.2em}
.card h2{border:0;margin-top:.6em}
.tiles{display:flex;flex-wrap:wrap;gap:.6em;margin:.7em 0}
.tile{flex:1 1 0;min-width:7.5em;max-width:14em;background:#fff;border:1px solid #d5dbe5;border-radius:4px;
  padding:.35em .8em}
.tile span{display:block;color:#555;font-size:.9em}.tile b{display:block;font-size:1.7em;
  font-variant-numeric:tabular-nums}.tile small{display:block;color:#666;font-size:.8em;overflow-wrap:anywhere}
.pair{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
@media screen and (min-width:1200px){.pair{flex-wrap:nowrap}.pair img{min-width:0;flex:0 1 auto}}
img{max-width:100%;height:auto;border:1px solid #eee}.note{color:#666;font-size:.9em}.warn{color:#a40}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;width:250px}.gallery img{width:100%}
.gallery figcaption{font-size:.85em}
@page{size:A4;margin:14mm 12mm}
@media print{
  body{max-width:none;margin:0;padding:0;font-size:10pt}
  h2{break-after:avoid;page-break-after:avoid}
  img{max-height:250mm;object-fit:contain}
  img,figure,tr,.card,.tile{break-inside:avoid;page-break-inside:avoid}
  .gallery figure{width:30%}
}
"""


INTERVAL = re.compile(r"-?\d+\.\d+(-| to )-?\d+\.\d+")


def table(header, rows, numbers=True, css_class=None):
    """An HTML table. With numbers, numbers are right-aligned so that their digits line up; text stays left."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c, numbers) for c in row) + "</tr>" for row in rows)
    return f"<table{f' class={css_class}' if css_class else ''}><tr>{head}</tr>{body}</table>"


def cell(value, numbers=True):
    """A <td>: a number, a number with its spread ('0.81 ± 0.03') or an interval ('0.20-0.35') is right-aligned,
    and never wrapped."""
    aligned = numbers and (files.is_number(str(value).split(" ± ")[0]) or INTERVAL.fullmatch(str(value)))
    return f"<td{' class=num' if aligned else ''}>{html.escape(str(value))}</td>"


def embed_png(path, alt=""):
    """An <img> with the PNG inside, as wide as its figure is in inches (at 96 CSS pixels an inch); a plot that
    could not be drawn is named instead."""
    if not Path(path).is_file():
        return f'<p class="warn">{html.escape(Path(path).name)} could not be drawn (metrics.json says why).</p>'
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        dpi = image.info.get("dpi", (96, 96))[0] or 96
        width = round(image.width * 96 / dpi)
    return (
        f'<img alt="{html.escape(alt)}" width="{width}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
    )


def pair(*images):
    return '<div class="pair">' + "".join(images) + "</div>"


def tiles(items):
    """The headline figures of the summary card: (label, value, details) each, details a list of short lines."""
    return (
        '<div class="tiles">'
        + "".join(
            f'<div class="tile"><span>{html.escape(label)}</span><b>{html.escape(value)}</b>'
            + "".join(f"<small>{html.escape(detail)}</small>" for detail in details)
            + "</div>"
            for label, value, details in items
        )
        + "</div>"
    )


def write_page(path, title, summary, sections):
    """One self-contained page, every image embedded: the summary card, then sections, a list of (heading, html)."""
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = f'<section class="card">\n<h2>Summary</h2>\n{summary}\n</section>\n' + "\n".join(
        f"<section>\n<h2>{html.escape(heading)}</h2>\n{content}\n</section>" for heading, content in sections
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f'<p class="note">Generated {generated} by ucgrade. '
        "Research tool: not a medical device; review the results before relying on them.</p>\n"
        f"{body}\n</body></html>\n"
    )
    files.write_text(path, page)
