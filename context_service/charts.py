"""Server-rendered SVG for the dashboard: line charts by day and a run's waterfall.

Plain SVG markup built here, so a page needs no script and no build step to show a chart,
and a test can read the chart's geometry from the DOM: every point and bar carries what
it stands for in ``data-`` attributes (its day and value, a test's offset and duration).
Text is escaped with markupsafe, as jinja2 escapes the rest of the page.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta

import msgspec
from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#c0262d", "#17803d", "#b66a00", "#7c3aed", "#0e7490", "#be185d")
WIDTH, HEIGHT = 640, 180
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 10, 26


class Series(msgspec.Struct, frozen=True):
    name: str
    points: list[tuple[date, float]]
    """(day, value), one per day with data: a day without data has no point."""


def _number(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _label(value: float, unit: str) -> str:
    if unit == "ms" and value >= 10_000:
        return f"{value / 1000:.0f} s"
    return f"{_number(value)}{' ' + unit if unit else ''}"


def line_chart(
    series: Sequence[Series], *, since: date, until: date, unit: str, top: float | None = None
) -> Markup:
    """Lines over the days ``since``..``until``, a point per day that has a value. ``top``
    fixes the y axis' top (100 for a percentage); otherwise the largest value sets it."""
    days = max(1, (until - since).days)
    peak = top if top is not None else max((v for s in series for _, v in s.points), default=0)
    peak = peak or 1.0
    inner_w, inner_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def x(day: date) -> float:
        return _LEFT + inner_w * (day - since).days / days

    def y(value: float) -> float:
        return _TOP + inner_h * (1 - value / peak)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"'
        f' role="img" data-since="{since}" data-until="{until}" data-unit="{escape(unit)}">',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP + inner_h}" x2="{WIDTH - _RIGHT}"'
        f' y2="{_TOP + inner_h}"/>',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + inner_h}"/>',
    ]
    for value in (0.0, peak / 2, peak):
        parts.append(
            f'<text class="tick" x="{_LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end">'
            f"{escape(_label(value, unit))}</text>"
        )
    for day, anchor in ((since, "start"), (until, "end")):
        parts.append(
            f'<text class="tick" x="{x(day):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">'
            f"{day:%b %d}</text>"
        )
    for index, line in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        name = escape(line.name)
        coords = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v in line.points)
        parts.append(f'<g class="series" data-series="{name}" stroke="{colour}" fill="{colour}">')
        if len(line.points) > 1:
            parts.append(f'<polyline fill="none" stroke-width="1.5" points="{coords}"/>')
        for day, value in line.points:
            parts.append(
                f'<circle class="point" cx="{x(day):.1f}" cy="{y(value):.1f}" r="2.5"'
                f' data-day="{day}" data-value="{value}"><title>{name} {day}:'
                f" {escape(_label(value, unit))}</title></circle>"
            )
        parts.append("</g>")
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><svg width="10" height="10"><rect width="10" height="10"'
        f' fill="{PALETTE[i % len(PALETTE)]}"/></svg> {escape(line.name)}</span>'
        for i, line in enumerate(series)
    )
    return Markup("".join(parts) + (f'<div class="legend">{legend}</div>' if legend else ""))


def by_series(
    rows: Iterable[tuple[str, date, float | None]],
) -> list[Series]:
    """(series name, day, value) rows as series, in the order names first appear; a row
    without a value is no point."""
    found: dict[str, list[tuple[date, float]]] = {}
    for name, day, value in rows:
        points = found.setdefault(name, [])
        if value is not None:
            points.append((day, float(value)))
    return [Series(name, sorted(points)) for name, points in found.items()]


# ---- the waterfall ------------------------------------------------------------------------


class Bar(msgspec.Struct, frozen=True):
    """A test of a run: when it started and ended, from the run's start."""

    test: str
    status: str
    offset_ms: float | None
    """From the run's start to the test's first TestStarted; None if it never started."""
    duration_ms: float | None
    """From its start to its verdict; None until it has one (or for a skipped test)."""
    critical: bool = False


_ROW, _NAME_W, _BAR_W = 22, 150, 470
_NAME_CHARS = 22
"""What fits left of the bars at the waterfall's font; a longer name is cut there (the
whole name is in the bar's title and ``data-test``), else it runs off the chart."""


def _fitted(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 1] + "…"


def critical_path(ends: Mapping[str, float], needs: Mapping[str, Iterable[str]]) -> list[str]:
    """The chain of tests that decided when the run ended: from the test that ended last,
    back through the dependency each one waited for longest (the one that ended last)."""
    if not ends:
        return []
    path = [max(ends, key=lambda test: (ends[test], test))]
    while True:
        waited = [dep for dep in needs.get(path[-1], ()) if dep in ends]
        if not waited:
            return path[::-1]
        path.append(max(waited, key=lambda test: (ends[test], test)))


def bars(
    run_started: datetime,
    tests: Sequence[tuple[str, str, datetime | None, datetime | None]],
    needs: Mapping[str, Iterable[str]],
) -> list[Bar]:
    """(test, status, started_at, ended_at) as bars, the critical path marked."""

    def ms(at: datetime | None, since: datetime) -> float | None:
        return None if at is None else max(0.0, (at - since) / timedelta(milliseconds=1))

    ends = {
        name: end
        for name, _, started, ended in tests
        if started is not None and (end := ms(ended, run_started)) is not None
    }
    on_path = set(critical_path(ends, needs))
    made = []
    for name, status, started, ended in tests:
        offset = ms(started, run_started)
        duration = None if started is None else ms(ended, started)
        made.append(Bar(name, status, offset, duration, name in on_path))
    return made


def waterfall(bars: Sequence[Bar], *, total_ms: float | None = None) -> Markup:
    """A row per test, its bar from its offset to its verdict on one time axis; bars on the
    critical path are marked (class ``critical``)."""
    ends = [(bar.offset_ms or 0) + (bar.duration_ms or 0) for bar in bars]
    span = max([total_ms or 0.0, *ends]) or 1.0
    height = _ROW * len(bars) + 24
    width = _NAME_W + _BAR_W + 20

    def x(ms: float) -> float:
        return _NAME_W + _BAR_W * ms / span

    parts = [
        f'<svg id="waterfall" class="waterfall" viewBox="0 0 {width} {height}" width="{width}"'
        f' height="{height}" role="img" data-span-ms="{span:.3f}">'
    ]
    for row, bar in enumerate(bars):
        top = row * _ROW + 4
        name = escape(bar.test)
        attrs = (
            f'class="bar s-{escape(bar.status)}{" critical" if bar.critical else ""}"'
            f' data-test="{name}" data-status="{escape(bar.status)}"'
            f' data-offset-ms="{"" if bar.offset_ms is None else f"{bar.offset_ms:.3f}"}"'
            f' data-duration-ms="{"" if bar.duration_ms is None else f"{bar.duration_ms:.3f}"}"'
            f' data-critical="{"yes" if bar.critical else "no"}"'
        )
        parts.append(f"<g {attrs}>")
        parts.append(f'<text class="name" x="{_NAME_W - 6}" y="{top + 13}" text-anchor="end">')
        parts.append(f"{escape(_fitted(bar.test))}</text>")
        if bar.offset_ms is not None:
            start = x(bar.offset_ms)
            length = max(2.0, _BAR_W * (bar.duration_ms or 0) / span)
            what = bar.status if bar.duration_ms is None else f"{bar.duration_ms:.0f} ms"
            parts.append(
                f'<rect x="{start:.1f}" y="{top}" width="{length:.1f}" height="{_ROW - 8}"'
                f' rx="2"><title>{name}: starts at {bar.offset_ms:.0f} ms, {what}</title></rect>'
            )
        parts.append("</g>")
    axis = height - 18
    parts.append(f'<line class="axis" x1="{_NAME_W}" y1="{axis}" x2="{x(span)}" y2="{axis}"/>')
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        at = span * fraction
        parts.append(
            f'<text class="tick" x="{x(at):.1f}" y="{height - 4}" text-anchor="middle">'
            f"{escape(_label(at, 'ms'))}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
