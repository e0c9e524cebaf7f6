"""Small inline SVG charts for the HTML report: bars, a line with a marked point, a histogram.

Inline SVG keeps the report one self-contained file that any browser opens offline, with no plotting
library in the run's environment. Every chart is a pure function of its numbers; labels are escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

WIDTH, BAR_HEIGHT, PAD = 520, 18, 6
LABEL_WIDTH = 170
CHART_HEIGHT = 180
COLOUR, MARK = "#4c78a8", "#e45756"


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}" class="chart">'
    )
    return head + f"<title>{html.escape(title)}</title>" + "".join(body) + "</svg>"


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 11) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-family="sans-serif">{html.escape(text)}</text>'
    )


def bars(labels: Sequence[str], values: Sequence[float], title: str, unit: str = "") -> str:
    """Horizontal bars, one per label, with the value written beside each."""
    top = max((v for v in values if math.isfinite(v)), default=0.0) or 1.0
    span = WIDTH - LABEL_WIDTH - 80
    body = [_text(0, 12, title, size=12)]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 20 + i * (BAR_HEIGHT + PAD)
        length = max(0.0, value) / top * span if math.isfinite(value) else 0.0
        body.append(_text(LABEL_WIDTH - 6, y + 13, label, anchor="end"))
        body.append(
            f'<rect x="{LABEL_WIDTH}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" fill="{COLOUR}"/>'
        )
        body.append(_text(LABEL_WIDTH + length + 4, y + 13, f"{value:,.3g}{unit}"))
    return _svg(WIDTH, 26 + len(labels) * (BAR_HEIGHT + PAD), body, title)


def line(xs: Sequence[float], ys: Sequence[float], title: str, mark: float | None = None) -> str:
    """A line through (x, y) points with dots, the point at ``mark`` drawn in the highlight colour."""
    left, bottom, right, top_pad = 60, CHART_HEIGHT - 24, WIDTH - 10, 24
    if not xs:
        return _svg(WIDTH, 40, [_text(0, 12, f"{title}: no data", size=12)], title)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (right - left) / ((x1 - x0) or 1)
    sy = (bottom - top_pad) / ((y1 - y0) or 1)

    def point(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) * sx, bottom - (y - y0) * sy

    path = " ".join(f"{px:.1f},{py:.1f}" for px, py in (point(x, y) for x, y in zip(xs, ys, strict=True)))
    body = [
        _text(0, 12, title, size=12),
        f'<polyline points="{path}" fill="none" stroke="{COLOUR}" stroke-width="2"/>',
        _text(left - 4, top_pad + 4, f"{y1:,.4g}", anchor="end"),
        _text(left - 4, bottom, f"{y0:,.4g}", anchor="end"),
    ]
    for x, y in zip(xs, ys, strict=True):
        px, py = point(x, y)
        colour = MARK if mark is not None and x == mark else COLOUR
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{5 if colour == MARK else 3}" fill="{colour}"/>')
        body.append(_text(px, CHART_HEIGHT - 6, f"{x:g}", anchor="middle", size=10))
    return _svg(WIDTH, CHART_HEIGHT, body, title)


def histogram(values: Sequence[float], title: str, bins: int = 20) -> str:
    """Counts of ``values`` in ``bins`` equal-width bins between their minimum and maximum."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return _svg(WIDTH, 40, [_text(0, 12, f"{title}: no values", size=12)], title)
    low, high = min(finite), max(finite)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for v in finite:
        counts[min(int((v - low) / width), bins - 1)] += 1
    left, bottom, top_pad = 40, CHART_HEIGHT - 24, 24
    step = (WIDTH - left - 10) / bins
    tallest = max(counts)
    body = [_text(0, 12, f"{title} ({len(finite):,} values)", size=12)]
    for i, count in enumerate(counts):
        height = count / tallest * (bottom - top_pad)
        body.append(
            f'<rect x="{left + i * step:.1f}" y="{bottom - height:.1f}" width="{step - 1:.1f}" '
            f'height="{height:.1f}" fill="{COLOUR}"><title>{count}</title></rect>'
        )
    body.append(_text(left, CHART_HEIGHT - 6, f"{low:.3g}", size=10))
    body.append(_text(WIDTH - 10, CHART_HEIGHT - 6, f"{high:.3g}", anchor="end", size=10))
    body.append(_text(left - 4, top_pad + 4, str(tallest), anchor="end", size=10))
    return _svg(WIDTH, CHART_HEIGHT, body, title)
