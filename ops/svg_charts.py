"""Inline SVG line charts for self-contained HTML reports: no scripts, no network.

``line_chart`` draws one or more series of (x, y) points on shared axes with "nice" ticks
(1, 2, 2.5 or 5 times a power of ten), a grid, axis labels and a legend, in the style of
``eval_report``'s charts. Every point within ``DOT_LIMIT`` points carries a dot with a tooltip
giving its value; a longer series is thinned to ``MAX_POINTS`` points (its last one always kept)
so a run of many thousand rollouts still gives a small page. Every label is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .eval_report import _esc

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac")
DOT_LIMIT = 60  # series this short get a dot (with its value as a tooltip) at every point
MAX_POINTS = 1000  # longer series are thinned to about this many points
LABEL_ROOM = 48  # characters of a legend label


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    colour: str = ""  # default: the palette's colour for the series' position


def finite_points(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points with both coordinates finite numbers (NaN or inf would break the scale)."""
    return [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _thin(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def _legend(items: Sequence[tuple[str, str]], left: float, right: float, top: float) -> tuple[str, float]:
    """Colour keys and labels from ``left``, wrapping before ``right``; returns the SVG and the
    height it takes. A label longer than ``LABEL_ROOM`` is cut, the full text in its tooltip."""
    out, x, y = [], left, top + 12
    for label, colour in items:
        shown = label if len(label) <= LABEL_ROOM else label[: LABEL_ROOM - 1] + "…"
        room = 26 + 6.5 * len(shown)
        if x > left and x + room > right:
            x, y = left, y + 16
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14:.1f}" y="{y:.1f}"><title>{_esc(label)}</title>{_esc(shown)}</text>')
        x += room
    return "".join(out), y - top + 6


def nice_ticks(low: float, high: float, *, count: int = 4, integer: bool = False) -> list[float]:
    """About ``count`` + 1 round tick values covering [low, high] (a flat range is widened)."""
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, float(round(step)))
    start = math.floor(low / step + 1e-9) * step
    ticks = [start]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(start + len(ticks) * step)
    return ticks


def format_number(value: float, step: float = 0.0) -> str:
    """A tick or value label: as many decimals as ``step`` needs (3 significant digits without
    one); very large or very small magnitudes in exponent form."""
    if value == 0:
        return "0"
    scale = step or abs(value)
    if abs(value) >= 1e6 or scale < 1e-3:
        return f"{value:.2g}" if step else f"{value:.3g}"
    if step:
        decimals = next(d for d in range(7) if abs(round(step, d) - step) <= 1e-9 * step or d == 6)
        return f"{value:.{decimals}f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def format_percent(value: float, step: float = 0.0) -> str:
    return f"{100 * value:.0f}%" if not step or step >= 0.01 else f"{100 * value:.1f}%"


def line_chart(
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str = "",
    percent: bool = False,
    y_floor: float | None = None,
    integer_x: bool = False,
    width: int = 460,
    height: int = 210,
    empty: str = "no data",
) -> str:
    """One SVG chart of ``series`` (a paragraph saying ``empty`` when no series has a point).

    ``percent`` puts y on a fixed 0..100% axis; ``y_floor`` keeps that value inside the y range
    (0 for counts and rates, so a flat line is not drawn as a wild swing); ``integer_x`` keeps
    the x ticks on whole numbers (steps, versions). The legend goes below ``height``, one row per
    line of labels."""
    drawn = [(s, _thin(finite_points(s.points))) for s in series]
    drawn = [(s, pts) for s, pts in drawn if pts]
    if not drawn:
        return f'<p class="none">{_esc(empty)}</p>'
    xs = [x for _, pts in drawn for x, _ in pts]
    ys = [y for _, pts in drawn for _, y in pts]
    fmt_y = format_percent if percent else format_number
    if percent:
        y_ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
        if max(ys) > 1 or min(ys) < 0:
            y_ticks = nice_ticks(min(0.0, *ys), max(1.0, *ys))
    else:
        extra = [] if y_floor is None else [y_floor]
        y_ticks = nice_ticks(min(ys + extra), max(ys + extra))
    x_ticks = nice_ticks(min(xs), max(xs), count=5, integer=integer_x)

    left, right, top = 58, 14, 10
    plot_w, plot_h = width - left - right, height - top - 40
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    y_step, x_step = y_ticks[1] - y_ticks[0], x_ticks[1] - x_ticks[0]
    parts = []
    for tick in y_ticks:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">{_esc(fmt_y(tick, y_step))}</text>'
        )
    for tick in x_ticks:
        parts.append(
            f'<line x1="{px(tick):.1f}" x2="{px(tick):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#f0f0f0"/>'
            f'<text x="{px(tick):.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
            f"{_esc(format_number(tick, x_step))}</text>"
        )
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 31}" text-anchor="middle">'
                 f"{_esc(x_label)}</text>")
    if y_label:
        mid = top + plot_h / 2
        parts.append(f'<text x="12" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 12 {mid:.1f})">'
                     f"{_esc(y_label)}</text>")
    legend = []
    for i, (s, pts) in enumerate(drawn):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        legend.append((s.label, colour))
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        last = fmt_y(pts[-1][1])
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6">'
                     f"<title>{_esc(f'{s.label}: last {last}')}</title></polyline>")
        dots = pts if len(pts) <= DOT_LIMIT else [pts[-1]]
        for x, y in dots:
            tip = f"{s.label}: {format_number(x)} → {fmt_y(y)}"
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{colour}">'
                         f"<title>{_esc(tip)}</title></circle>")
    keys, keys_h = _legend(legend, left, left + plot_w, height - 4)
    total_h = height - 4 + keys_h
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h:.0f}" role="img">'
            + "".join(parts) + keys + "</svg>")
