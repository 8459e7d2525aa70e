"""Small self-contained SVG charts for the reports (no dependency): lines against steps, grouped bars.

    line_chart([("train loss", [(1, 4.9), (25, 1.5), ...]), ("valid loss", [...])], title=..., x_label="step")
    bar_chart(["Level 1", "Level 2"], [("base", [12.0, 3.5]), ("checkpoint-best", [40.0, None])], title=...)

Each returns the text of one standalone .svg file (fixed size, system font, one colour per series, a legend);
browsers and GitHub render it inline from a Markdown link. `write(path, text)` writes it.
"""
from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
FONT = 'font-family="sans-serif" font-size="12"'
W, H = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 36, 48  # plot margins in pixels


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """log10 tick positions for a log axis over [lo, hi] (log10 values): whole decades, plus 2 and 5 times
    each decade when the range spans at most two decades."""
    d0, d1 = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    mults = (1, 2, 5) if d1 - d0 <= 2 else (1,)
    return [math.log10(m) + d for d in range(d0, d1 + 1) for m in mults if math.log10(m) + d <= d1]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.0e}" if abs(v) < 1e-3 else f"{v:,.0f}"
    return f"{v:.4g}"


def _frame(title: str, x_label: str, y_label: str, height: int = H) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
            f'viewBox="0 0 {W} {height}" {FONT}>',
            f'<rect width="{W}" height="{height}" fill="white"/>',
            f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
            f'<text x="{LEFT + (W - LEFT - RIGHT) / 2}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text x="14" y="{TOP + (height - TOP - BOTTOM) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 14 {TOP + (height - TOP - BOTTOM) / 2})">{escape(y_label)}</text>']


def _legend(labels: list[str], x0: float) -> list[str]:
    out = []
    for i, label in enumerate(labels):
        y = TOP + 6 + 16 * i
        out += [f'<rect x="{x0}" y="{y - 9}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>',
                f'<text x="{x0 + 14}" y="{y}">{escape(label)}</text>']
    return out


def line_chart(series: list[tuple[str, list[tuple[float, float]]]], title: str, x_label: str = "step",
               y_label: str = "", log_y: bool = False, y_range: tuple[float, float] | None = None) -> str:
    """One polyline per (label, [(x, y), ...]) series; points with a non-finite y are skipped."""
    series = [(label, [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(y)
                       and (y > 0 or not log_y)]) for label, pts in series]
    series = [(label, pts) for label, pts in series if pts]
    parts = _frame(title, x_label, y_label + (" (log scale)" if log_y else ""))
    if not series:
        parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>')
        return "\n".join(parts + ["</svg>"]) + "\n"
    tf = math.log10 if log_y else (lambda v: v)
    xs = [x for _, pts in series for x, _ in pts]
    ys = [tf(y) for _, pts in series for _, y in pts]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = log_ticks(min(ys), max(ys)) if log_y else nice_ticks(*(y_range or (min(ys), max(ys))))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    px = lambda x: LEFT + (x - x0) / (x1 - x0 or 1) * (W - LEFT - RIGHT)
    py = lambda y: H - BOTTOM - (y - y0) / (y1 - y0 or 1) * (H - TOP - BOTTOM)
    for t in y_ticks:
        label = _fmt(10 ** t) if log_y else _fmt(t)
        parts += [f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>',
                  f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{label}</text>']
    for t in x_ticks:
        parts.append(f'<text x="{px(t):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
                 'fill="none" stroke="#888"/>')
    for i, (_, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(tf(y)):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(pts) <= 40:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(tf(y)):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
    parts += _legend([label for label, _ in series], W - RIGHT - 180)
    return "\n".join(parts + ["</svg>"]) + "\n"


def bar_chart(categories: list[str], series: list[tuple[str, list[float | None]]], title: str,
              y_label: str = "accuracy (%)", y_max: float = 100.0) -> str:
    """Grouped bars: one group per category, one bar per series (None: no bar); the value above each bar."""
    legend_h = 16 * len(series)
    tilt = len(categories) > 5 or any(len(c) > 10 for c in categories)  # long labels: slanted, more room
    label_h = 60 if tilt else 0
    height = H + legend_h + label_h
    parts = _frame(title, "", y_label, height)
    bottom = height - BOTTOM - legend_h - label_h
    top = TOP
    plot_w = W - LEFT - RIGHT
    group_w = plot_w / max(len(categories), 1)
    bar_w = 0.8 * group_w / max(len(series), 1)
    py = lambda v: bottom - v / (y_max or 1) * (bottom - top)
    for t in nice_ticks(0, y_max):
        if t <= y_max + 1e-9:
            parts += [f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>',
                      f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>']
    for c, name in enumerate(categories):
        gx = LEFT + c * group_w + 0.1 * group_w
        for s, (_, values) in enumerate(series):
            v = values[c]
            if v is None:
                continue
            x, y = gx + s * bar_w, py(min(max(v, 0.0), y_max))
            parts += [f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.92:.1f}" height="{bottom - y:.1f}" '
                      f'fill="{COLORS[s % len(COLORS)]}"/>',
                      f'<text x="{x + bar_w * 0.46:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                      f'font-size="10">{v:.0f}</text>']
        cx, cy = LEFT + (c + 0.5) * group_w, bottom + 16
        turn = f' transform="rotate(-30 {cx:.1f} {cy})"' if tilt else ""
        parts.append(f'<text x="{cx:.1f}" y="{cy}" text-anchor="{"end" if tilt else "middle"}" font-size="11"'
                     f'{turn}>{escape(name[:24])}</text>')
    parts.append(f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{bottom - top}" fill="none" stroke="#888"/>')
    for i, (label, _) in enumerate(series):
        y = bottom + label_h + 30 + 16 * i
        parts += [f'<rect x="{LEFT}" y="{y - 9}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>',
                  f'<text x="{LEFT + 14}" y="{y}">{escape(label)}</text>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def write(path: str | os.PathLike, text: str) -> Path:
    """Write an SVG through a temporary file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
