"""The optimization history as a small inline SVG: no plotting library in the browser, no CDN."""

from __future__ import annotations

import math

WIDTH, HEIGHT, PAD = 640, 220, 36


def history_svg(points: list[dict]) -> str:
    """CV loss of each complete trial (dots) and the best so far (line); log scale when it spans a decade."""
    if not points:
        return '<p class="muted">No completed trial yet.</p>'
    values = [p["value"] for p in points]
    log = min(values) > 0 and max(values) / min(values) >= 10
    f = math.log10 if log else (lambda v: v)
    lo, hi = f(min(values)), f(max(values))
    hi = hi if hi > lo else lo + 1
    first, last = points[0]["number"], points[-1]["number"]
    span = max(1, last - first)

    def xy(number: int, value: float) -> tuple[float, float]:
        x = PAD + (number - first) / span * (WIDTH - 2 * PAD)
        y = HEIGHT - PAD - (f(value) - lo) / (hi - lo) * (HEIGHT - 2 * PAD)
        return round(x, 1), round(y, 1)

    dots = "".join(f'<circle cx="{x}" cy="{y}" r="3"><title>trial {p["number"]}: {p["value"]:.4f}</title></circle>'
                   for p in points for x, y in [xy(p["number"], p["value"])])
    best = " ".join(f"{x},{y}" for p in points for x, y in [xy(p["number"], p["best"])])
    axis = (f'<text x="{PAD}" y="{HEIGHT - 8}">trial {first}</text>'
            f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end">trial {last}</text>'
            f'<text x="4" y="{PAD - 10}">{max(values):.4g}</text><text x="4" y="{HEIGHT - PAD + 14}">{min(values):.4g}</text>')
    label = "CV loss (log scale)" if log else "CV loss"
    return (f'<svg class="history" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label} by trial">'
            f'<rect x="{PAD}" y="{PAD - 6}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD + 12}" class="frame"/>'
            f'<polyline points="{best}" class="best"/>{dots}{axis}'
            f'<text x="{WIDTH / 2}" y="14" text-anchor="middle">{label}: trials (dots), best so far (line)</text></svg>')
