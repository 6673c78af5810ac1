"""The report's HTML pieces: sections, tables, embedded figures and the page around them.

Everything the page shows travels inside it: figures are data URIs (SVG for plots, PNG
for images), styles are inline, there is no script and no font, stylesheet or image
fetched from anywhere. Values are escaped by Jinja2's autoescape; a section's body is
`Markup` built here, so nothing else writes raw HTML.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from markupsafe import Markup
from matplotlib.figure import Figure

from mechhi.figures.style import STYLE
from probes.statistics import p_text

_ENV = jinja2.Environment(
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
)


@dataclass(frozen=True)
class Section:
    """One part of the page: an anchor id, a heading, its HTML body."""

    id: str
    title: str
    body: Markup


def render(template: str, **values: Any) -> Markup:
    """A small Jinja2 template string, autoescaped, as Markup."""
    return Markup(_ENV.from_string(template).render(**values))


def join(parts: Iterable[Markup | str]) -> Markup:
    """Concatenate pieces, escaping any plain string."""
    return Markup("").join(parts)


def paragraph(text: str, cls: str = "") -> Markup:
    return render("<p{% if cls %} class='{{ cls }}'{% endif %}>{{ text }}</p>", text=text, cls=cls)


def heading(text: str) -> Markup:
    return render("<h3>{{ text }}</h3>", text=text)


_TABLE = """<table{% if id %} id="{{ id }}"{% endif %} class="{{ cls }}">
{% if caption %}<caption>{{ caption }}</caption>{% endif %}
<thead><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>"""


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    id: str = "",
    caption: str = "",
    cls: str = "data",
) -> Markup:
    """An HTML table; cells may be plain values (escaped) or Markup (kept). The `number` and
    `p_value` cells of a column are written in one format, chosen from all of them
    (`column_formats`), so a column never mixes ``0``, ``0.0909`` and ``1``."""
    return render(
        _TABLE, columns=columns, rows=column_formats([list(r) for r in rows]), id=id, caption=caption, cls=cls
    )


class Number(str):
    """A number as `number` wrote it (`digits` significant digits), keeping its value so that a
    table can rewrite its column in one format."""

    value: float
    digits: int


class PValue(Markup):
    """A p-value cell as `p_value` wrote it, keeping its value for the column's format."""

    value: float


def number(value: Any, digits: int = 3) -> str:
    """A number: `digits` significant digits, 'n/a' for None or NaN. In a `table` its column's
    numbers share one format (`column_formats`)."""
    value = math.nan if value is None else float(value)
    out = Number("n/a" if math.isnan(value) else f"{value:.{digits}g}")
    out.value, out.digits = value, digits
    return out


def _bold_if_small(text: str, value: float) -> Markup:
    return render("<b>{{ t }}</b>", t=text) if value < 0.001 else Markup.escape(text)


def p_value(value: Any) -> Markup:
    """A p-value, bold below 0.001 (as the paper highlights them); '< 5e-324' where float64 underflows."""
    p = math.nan if value is None else float(value)
    text = p_text(None if value is None else p)
    out = PValue(_bold_if_small(text, p))
    out.value = p
    return out


MAX_DECIMALS = 6  # beyond this a column is written in scientific notation


def number_format(values: Sequence[float], digits: int) -> Callable[[float], str]:
    """One format for a column of numbers: fixed decimals enough for the smallest nonzero
    magnitude to keep `digits` significant digits (so no value loses digits), integers
    as integers; scientific for the whole column when that needs over MAX_DECIMALS decimals.

    >>> [number_format([0, 0.0909, 1], 3)(v) for v in (0, 0.0909, 1)]
    ['0.0000', '0.0909', '1.0000']
    >>> [number_format([0.354, 0.2244], 3)(v) for v in (0.354, 0.2244)]
    ['0.354', '0.224']
    """
    finite = [abs(v) for v in values if math.isfinite(v)]
    nonzero = [v for v in finite if v > 0]
    if all(v == round(v) for v in finite) and max(finite, default=0) < 1e6:
        decimals = 0
    else:
        decimals = max(0, digits - 1 - math.floor(math.log10(min(nonzero))))
    if decimals > MAX_DECIMALS:
        return lambda v: "n/a" if math.isnan(v) else f"{v:.{digits - 1}e}"
    return lambda v: "n/a" if math.isnan(v) else f"{v:.{decimals}f}"


def p_format(values: Sequence[float]) -> Callable[[float], str]:
    """One format for a column of p-values: three decimals when every p is at least 0.001,
    else scientific with three significant digits for all ("< 5e-324" for an underflowed 0)."""
    finite = [v for v in values if math.isfinite(v)]
    if all(v >= 0.001 for v in finite):
        return lambda v: "n/a" if math.isnan(v) else f"{v:.3f}"
    return lambda v: "n/a" if math.isnan(v) else "< 5e-324" if v == 0 else f"{v:.2e}"


def column_formats(rows: list[list[Any]]) -> list[list[Any]]:
    """`rows` with each column's `number` / `p_value` cells rewritten in the column's one format."""
    out = [list(r) for r in rows]
    for j in range(max((len(r) for r in out), default=0)):
        cells = [(i, r[j]) for i, r in enumerate(out) if j < len(r)]
        numbers = [(i, c) for i, c in cells if isinstance(c, Number)]
        if numbers:
            write = number_format([c.value for _, c in numbers], max(c.digits for _, c in numbers))
            for i, c in numbers:
                out[i][j] = write(c.value)
        ps = [(i, c) for i, c in cells if isinstance(c, PValue)]
        if ps:
            write = p_format([c.value for _, c in ps])
            for i, c in ps:
                out[i][j] = (
                    Markup.escape("n/a") if math.isnan(c.value) else _bold_if_small(write(c.value), c.value)
                )
    return out


def figure_uri(fig: Figure, fmt: str = "svg", dpi: int = 110) -> str:
    """The figure as a data URI (it never touches the disk)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buffer, format=fmt, dpi=dpi, facecolor="white", metadata={"svg": {"Date": None}}.get(fmt))
    mime = {"svg": "image/svg+xml", "png": "image/png"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


DISPLAY_PX_PER_INCH = 150  # a 6.4 in figure shows 960 px wide: its 8-9 pt text reads at 100 % zoom


def image(fig: Figure, alt: str, *, fmt: str = "svg", dpi: int = 110, cls: str = "figure") -> Markup:
    """An <img> of the figure, embedded (a PNG rasterised at `dpi`), shown DISPLAY_PX_PER_INCH
    pixels per inch of figure (at most the column's width): at 110 px per inch the figures
    sat small in a wide window, their text below the page's."""
    width = round(fig.get_figwidth() * DISPLAY_PX_PER_INCH)
    return render(
        '<img class="{{ cls }}" alt="{{ alt }}" width="{{ width }}" src="{{ src }}">',
        cls=cls,
        alt=alt,
        width=width,
        src=figure_uri(fig, fmt, dpi),
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 0; color: #222; }
header { background: #23395d; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; } header p { margin: 0; opacity: .85; }
nav { padding: 8px 32px; background: #eef1f6; position: sticky; top: 0; }
nav a { margin-right: 16px; color: #23395d; text-decoration: none; }
main { padding: 0 32px 48px; max-width: 1600px; }
h2 { border-bottom: 2px solid #23395d; padding-bottom: 4px; margin-top: 32px; }
section { scroll-margin-top: 44px; padding-top: 1px; }  /* anchors clear the sticky nav */
table.data { border-collapse: collapse; margin: 8px 0 16px; font-size: 13.5px; }
table.data th, table.data td { border: 1px solid #d5d9e0; padding: 3px 9px; text-align: right; }
table.data th { background: #eef1f6; } \
table.data td:first-child, table.data th:first-child { text-align: left; }
table.provenance td, table.provenance th { text-align: left; }
table.data caption { text-align: left; font-weight: 600; padding: 4px 0; }
.columns { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
img.figure { max-width: 100%; height: auto; border: 1px solid #eee; margin: 6px 0; }
table.gallery td { vertical-align: top; text-align: center; font-size: 12.5px; }
table.gallery img { width: 150px; height: auto; display: block; }
.note { color: #666; font-size: 13px; }
</style></head>
<body>
<header><h1>{{ title }}</h1><p>{{ subtitle }}</p></header>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}</nav>
<main>
{% for s in sections %}<section id="{{ s.id }}"><h2>{{ s.title }}</h2>
{{ s.body }}
</section>
{% endfor %}</main></body></html>
"""


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole self-contained page."""
    return str(render(_PAGE, title=title, subtitle=subtitle, sections=sections))
