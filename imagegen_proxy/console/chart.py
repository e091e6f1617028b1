"""The console's charts, drawn on the server as plain SVG.

The Spend page shows spend per day as stacked bars, one colour per group (a project, a key or
a model). The chart is a string the template writes out as-is, so the page needs no JavaScript
and loads nothing from elsewhere; for the same reason every piece of text that comes from data
(group names, day labels) is escaped here. Amounts are micro-USD integers throughout: the
`data-*` attributes carry them exactly for tests and tools, only the drawing is approximate.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence

from ..governance.pricing import usd

# Okabe-Ito: eight colours that stay apart under the common colour blindnesses; black last.
_PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#56b4e9", "#cc79a7", "#f0e442", "#000")
_TOP, _BOTTOM, _LEGEND, _ROW = 12, 26, 240, 18
_TURNED = 44  # the bottom margin when the day labels are turned to fit
_LABEL, _TURNED_LABEL = 40, 14  # the width a day label needs: level, and turned
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
# XML 1.0 forbids most control characters even when escaped: a group name carrying one must
# not make the page's SVG ill-formed.
_NOT_XML = re.compile(r"[^\t\n\r\x20-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


def dollars(micros: int) -> str:
    """Micro-USD as dollars for people, exact: "$0.04356", "$1.20", "$12,345.60". A total
    is then the sum of the amounts shown, to the digit."""
    whole, _, cents = usd(abs(micros)).partition(".")
    return f"{'-' if micros < 0 else ''}${int(whole):,}.{cents}"


def stacked_bars(
    days: Sequence[str],
    series: Mapping[str, Sequence[int]],
    *,
    title: str = "Spend per day",
    width: int = 1200,
    height: int = 320,
) -> str:
    """An <svg> ... </svg> string: one bar per day, the groups of `series` stacked in order.
    `width` is the drawing's: the page scales it to the width of its card."""
    _check(days, series)
    total = sum(sum(values) for values in series.values())
    if total:
        label = f"{title}: {dollars(total)} from {days[0]} to {days[-1]}"
        body = _bars(days, series, width, height)
    else:
        label = f"{title}: no spend in this range"
        body = [
            f'<text class="empty" x="{_num(width / 2)}" y="{_num(height / 2)}" '
            'text-anchor="middle" dominant-baseline="middle">No spend in this range</text>'
        ]
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_text(label)}" '
        f'data-total-micros="{total}" font-family="system-ui, sans-serif" font-size="11" '
        f'fill="#333">'
    )
    return "\n".join([head, f"<title>{_text(title)}</title>", *body, "</svg>"])


def _check(days: Sequence[str], series: Mapping[str, Sequence[int]]) -> None:
    """Raise ValueError unless every series has one non-negative int per day."""
    for name, values in series.items():
        if len(values) != len(days):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(days)} days")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"series {name!r} has {value!r}, not a micro-USD amount")


def _bars(
    days: Sequence[str], series: Mapping[str, Sequence[int]], width: int, height: int
) -> list[str]:
    """The axes, the bars and the legend of a chart with something to show."""
    day_totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    ticks = _ticks(max(day_totals))
    left = 12 + 7 * max(len(dollars(tick)) for tick in ticks)  # room for the longest label
    right = width - _LEGEND - 12
    slot = (right - left) / len(days)
    turned = slot < _LABEL  # every day still gets a label, turned, while they fit so
    bottom = height - (_TURNED if turned else _BOTTOM)

    def y(micros: int) -> float:
        return bottom - (bottom - _TOP) * micros / ticks[-1]

    out = []
    for tick in ticks:
        colour, at = ("#999" if tick == 0 else "#e5e5e5"), y(tick)
        out.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{_num(at)}" y2="{_num(at)}" '
            f'stroke="{colour}" stroke-width="1"/>'
            f'<text class="tick" data-micros="{tick}" x="{left - 6}" y="{_num(at + 4)}" '
            f'text-anchor="end">{_text(dollars(tick))}</text>'
        )
    bar = min(48.0, max(1.0, slot * 0.8))  # a few days should not look like a wall
    for i, day in enumerate(days):
        x, below = left + i * slot + (slot - bar) / 2, 0
        for (name, values), colour in zip(series.items(), _colours(len(series)), strict=True):
            value = values[i]
            if not value:
                continue
            top = y(below + value)
            out.append(
                f'<rect class="bar" x="{_num(x)}" y="{_num(top)}" width="{_num(bar)}" '
                f'height="{_num(y(below) - top)}" fill="{colour}" data-day="{_text(day)}" '
                f'data-series="{_text(name)}" data-micros="{value}">'
                f"<title>{_text(f'{name} · {day}: {dollars(value)}')}</title></rect>"
            )
            below += value
    every = 1 if slot >= _TURNED_LABEL else math.ceil(_TURNED_LABEL / slot)
    for i in range(0, len(days), every):  # a steady step: no day skipped at random
        short = days[i][-5:] if _DAY.fullmatch(days[i]) else days[i]
        middle = _num(left + (i + 0.5) * slot)
        if turned:
            place = f'x="{middle}" y="{bottom + 10}" text-anchor="end" '
            place += f'transform="rotate(-50 {middle} {bottom + 10})"'
        else:
            place = f'x="{middle}" y="{bottom + 16}" text-anchor="middle"'
        out.append(f'<text class="day" {place}>{_text(short)}</text>')
    return out + _legend(series, width - _LEGEND, height)


def _legend(series: Mapping[str, Sequence[int]], left: int, height: int) -> list[str]:
    """One row per group, swatch, name and total; "+N more" when they do not all fit."""
    fits = max(1, (height - _TOP - _BOTTOM) // _ROW)
    shown = len(series) if len(series) <= fits else fits - 1
    out = []
    entries = zip(series.items(), _colours(len(series)), strict=True)
    for row, ((name, values), colour) in enumerate(entries):
        if row == shown:
            break
        y = _TOP + row * _ROW
        short = name if len(name) <= 20 else name[:19] + "…"
        out.append(
            f'<g class="legend" data-series="{_text(name)}"><title>{_text(name)}</title>'
            f'<rect x="{left}" y="{y}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{left + 16}" y="{y + 9}">{_text(short)}</text>'
            f'<text x="{left + _LEGEND - 4}" y="{y + 9}" text-anchor="end">'
            f"{_text(dollars(sum(values)))}</text></g>"
        )
    if shown < len(series):
        more = len(series) - shown
        out.append(
            f'<text class="more" x="{left + 16}" y="{_TOP + shown * _ROW + 9}">+{more} more</text>'
        )
    return out


def _ticks(top: int) -> list[int]:
    """0 and three to five round steps (micro-USD), the last at least `top` (> 0)."""
    scale = 10  # ten micro-USD: small enough for a day of a few cheap images
    while True:
        for tenths in (10, 20, 25, 50):
            step = scale * tenths // 10
            if step * 5 >= top:
                # The previous step fell short five times over, so this one needs at least three.
                return [i * step for i in range(max(3, -(-top // step)) + 1)]
        scale *= 10


def _colours(n: int) -> list[str]:
    """A colour for each of `n` groups, the palette repeating."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(n)]


def _text(value: object) -> str:
    """Data made safe for XML (and HTML) text and attribute values."""
    return html.escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def _num(x: float) -> str:
    """A coordinate: two decimals at most, so the output is short and stable."""
    return f"{x:.2f}".rstrip("0").rstrip(".")
