"""Charts as small inline SVGs (a study's optimization history, a comparison's intervals): no plotting library
in the browser, no CDN."""

from __future__ import annotations

import math

from bottle import html_escape

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 44  # room for the tick labels and the axis titles


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values for a log axis over [lo, hi] (positive): 1-2-5 per decade, only the decades when they are many."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    marks = (1,) if len(decades) > 3 else (1, 2, 5)
    return [m * 10.0**d for d in decades for m in marks if lo <= m * 10.0**d <= hi]


def history_svg(points: list[dict]) -> str:
    """CV loss of each complete trial (dots) and the best so far (a step line), with ticked axes; log scale
    when it spans a decade."""
    if not points:
        return '<p class="muted">No completed trial yet.</p>'
    values = [p["value"] for p in points]
    log = min(values) > 0 and max(values) / min(values) >= 10
    f = math.log10 if log else (lambda v: v)
    low, high = min(values), max(values)
    if high == low:  # one value: a band around it
        low, high = (low / 2, low * 2) if log else (low - (abs(low) or 1) * 0.1, high + (abs(high) or 1) * 0.1)
    first, last = points[0]["number"], points[-1]["number"]
    span = max(1, last - first)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(number: float) -> float:
        return round(LEFT + (number - first) / span * plot_w, 1)

    def y(value: float) -> float:
        return round(TOP + plot_h - (f(value) - f(low)) / (f(high) - f(low)) * plot_h, 1)

    y_ticks = log_ticks(low, high) if log else nice_ticks(low, high)
    if len(y_ticks) < 2:  # a narrow log range: linear ticks read better
        y_ticks = nice_ticks(low, high)
    x_ticks = [t for t in nice_ticks(first, last, 6) if t == int(t)] if last > first else [first]
    grid = "".join(
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(t)}" y2="{y(t)}" class="grid"/>'
        f'<text x="{LEFT - 6}" y="{y(t) + 4}" text-anchor="end" class="tick">{t:.4g}</text>'
        for t in y_ticks
    )
    grid += "".join(
        f'<line x1="{x(t)}" x2="{x(t)}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 5}" class="axis"/>'
        f'<text x="{x(t)}" y="{TOP + plot_h + 18}" text-anchor="middle" class="tick">{int(t)}</text>'
        for t in x_ticks
    )
    # best so far holds until the next improvement: horizontal runs, vertical drops
    step = [(x(points[0]["number"]), y(points[0]["best"]))]
    for before, p in zip(points, points[1:]):
        step += [(x(p["number"]), y(before["best"]))] + (
            [(x(p["number"]), y(p["best"]))] if p["best"] != before["best"] else []
        )
    best = " ".join(f"{px},{py}" for px, py in step)
    dots = "".join(
        f'<circle cx="{x(p["number"])}" cy="{y(p["value"])}" r="3"><title>trial {p["number"]}: '
        f"{p['value']:.4f}</title></circle>"
        for p in points
    )
    label = "CV loss (log scale)" if log else "CV loss"
    return (
        f'<svg class="history" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label} by trial">'
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>{grid}'
        f'<polyline points="{best}" class="best"/>{dots}'
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle" class="title">trial number</text>'
        f'<text x="14" y="{TOP + plot_h / 2}" text-anchor="middle" class="title" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2})">{label}</text>'
        f'<text x="{LEFT}" y="16" class="title">trials (dots) and the best so far (step line)</text></svg>'
    )


def intervals_svg(cells: list[dict], seeds: int) -> str:
    """Each re-evaluated cell's mean CV loss and its 95 % interval (compare.png's picture), best on top."""
    from nas.compare.report import ranked

    shown = [c for c in ranked({"cells": cells}) if c["stats"] is not None]
    if not shown:
        return '<p class="muted">No cell re-evaluated yet.</p>'
    loss = [c["stats"]["loss"] for c in shown]
    ends = [v for v in (x for s in loss for x in (s["low"], s["high"], s["mean"])) if math.isfinite(v)]
    low, high = min(ends), max(ends)
    if high == low:
        low, high = low - (abs(low) or 1) * 0.1, high + (abs(high) or 1) * 0.1
    row, top = 26, 28
    height = top + row * len(shown) + BOTTOM
    left = 12 + 7 * max(len(c["label"]) for c in shown)  # room for the longest cell label
    span = WIDTH - LEFT - RIGHT

    def x(value: float) -> float:
        return round(left + (value - low) / (high - low) * span, 1)

    marks = []
    for k, (cell, s) in enumerate(zip(shown, loss)):
        y = top + row * k + row / 2
        verdict = cell["stats"]["verdict"]
        lo, hi = (
            (s["low"], s["high"]) if math.isfinite(s["low"]) and math.isfinite(s["high"]) else (s["mean"], s["mean"])
        )  # one seed
        marks.append(
            f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" class="tick">{html_escape(cell["label"])}</text>'
            f'<line x1="{x(lo)}" x2="{x(hi)}" y1="{y}" y2="{y}" class="ci ci-{verdict}"/>'
            f'<circle cx="{x(s["mean"])}" cy="{y}" r="4" class="ci-{verdict}"><title>{html_escape(cell["label"])}: '
            f"{s['mean']:.4f} [{s['low']:.4f}, {s['high']:.4f}] ({verdict})</title></circle>"
        )
    ticks = "".join(
        f'<line x1="{x(t)}" x2="{x(t)}" y1="{top}" y2="{height - BOTTOM}" class="grid"/>'
        f'<text x="{x(t)}" y="{height - BOTTOM + 16}" text-anchor="middle" class="tick">{t:.4g}</text>'
        for t in nice_ticks(low, high)
    )
    label = f"CV loss, mean and 95 % CI over {seeds} seeds"
    return (
        f'<svg class="intervals" viewBox="0 0 {left + span + RIGHT} {height}" role="img" aria-label="{label}">'
        f"{ticks}{''.join(marks)}"
        f'<text x="{left + span / 2}" y="{height - 8}" text-anchor="middle" class="title">{label}</text></svg>'
    )
