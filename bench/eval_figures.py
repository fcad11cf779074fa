"""Self-contained SVG figures for the evaluation docs (render on GitHub; no plotly/matplotlib/kaleido needed).

Usage::

    svg = svg_heatmap(matrix, rows, cols, "title")                     # task x expert mean routing weight
    svg = svg_intervals(["base", "MBC"], [(0.3, 0.25, 0.35), ...], "title", chance=0.5)
    svg = svg_lines([0, 1, 2], {"centre none": [0.2, 0.5, 0.9]}, "title", "layer", "accuracy")   # 0..1 curves
    write_figure("name.svg", svg)                                     # docs/figures/name.svg
"""
from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"


def repo_relative(path: Path) -> str:
    """A path inside the repository as relative to it (results never point at one machine's folders)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _color(v: float) -> str:
    """White (0) to dark blue (1)."""
    v = min(max(v, 0.0), 1.0)
    r, g, b = (int(255 - v * (255 - c)) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def _svg_open(width, height, title: str) -> list[str]:
    """The opening of every figure: the svg element on a white background and its bold title."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
            f'<text x="5" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']


def svg_heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, cell: int = 28) -> str:
    """A self-contained SVG heatmap (renders on GitHub without plotly or matplotlib). Values are scaled by
    the matrix maximum; each cell also prints its value."""
    m = np.asarray(matrix, float)
    top = max(len(c) for c in cols) * 6 + 40
    left = max(len(r) for r in rows) * 7 + 10
    w, h = left + cell * len(cols) + 10, top + cell * len(rows) + 10
    vmax = m.max() if m.size and m.max() > 0 else 1.0
    parts = _svg_open(w, h, title)
    for j, c in enumerate(cols):
        x = left + j * cell + cell / 2
        parts.append(f'<text transform="translate({x + 4},{top - 4}) rotate(-60)">{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell
        parts.append(f'<text x="{left - 5}" y="{y + cell / 2 + 4}" text-anchor="end">{escape(r)}</text>')
        for j in range(len(cols)):
            v = m[i, j] / vmax
            parts.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="{_color(v)}" '
                         f'stroke="#ddd"/>')
            parts.append(f'<text x="{left + j * cell + cell / 2}" y="{y + cell / 2 + 3}" text-anchor="middle" '
                         f'font-size="8" fill="{"white" if v > 0.6 else "black"}">{m[i, j]:.2f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_intervals(labels: list[str], stats: list[tuple[float, float, float]], title: str,
                  chance: float | None = None, width: int = 520) -> str:
    """Horizontal dot-and-whisker chart of (mean, low, high) per label on a 0..1 axis, chance as a dashed line."""
    left, row, top = max(len(l) for l in labels) * 7 + 15, 26, 40
    plot_w = width - left - 20
    h = top + row * len(labels) + 30
    x = lambda v: left + plot_w * min(max(v, 0.0), 1.0)  # noqa: E731
    parts = _svg_open(width, h, title)
    for t in np.linspace(0, 1, 6):
        parts.append(f'<line x1="{x(t)}" y1="{top - 8}" x2="{x(t)}" y2="{h - 25}" stroke="#eee"/>'
                     f'<text x="{x(t)}" y="{h - 10}" text-anchor="middle">{t:.1f}</text>')
    if chance is not None:
        parts.append(f'<line x1="{x(chance)}" y1="{top - 8}" x2="{x(chance)}" y2="{h - 25}" stroke="red" '
                     f'stroke-dasharray="4,3"/><text x="{x(chance) + 3}" y="{top - 10}" fill="red">chance</text>')
    for i, (lab, (m, lo, hi)) in enumerate(zip(labels, stats)):
        y = top + i * row + row / 2
        parts.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{escape(lab)}</text>'
                     f'<line x1="{x(lo)}" y1="{y}" x2="{x(hi)}" y2="{y}" stroke="#08306b" stroke-width="2"/>'
                     f'<circle cx="{x(m)}" cy="{y}" r="4" fill="#08306b"/>'
                     f'<text x="{x(hi) + 5}" y="{y + 4}" fill="#555">{m:.3f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


PALETTE = ("#08306b", "#e6550d", "#31a354", "#756bb1", "#de2d26", "#636363", "#3182bd", "#fdae6b")


def svg_lines(xs: list, series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
              width: int = 560, height: int = 300) -> str:
    """Curves on a 0..1 y axis (e.g. routing accuracy per layer, one curve per centring option), one colour
    per series, a legend on the right; None values are skipped."""
    left, right, top, bottom = 45, 170, 35, 40
    pw, ph = width - left - right, height - top - bottom
    n = max(len(xs) - 1, 1)
    x = lambda i: left + pw * i / n  # noqa: E731
    y = lambda v: top + ph * (1 - min(max(v, 0.0), 1.0))  # noqa: E731
    parts = _svg_open(width, height, title)
    for t in np.linspace(0, 1, 6):
        parts.append(f'<line x1="{left}" y1="{y(t)}" x2="{left + pw}" y2="{y(t)}" stroke="#eee"/>'
                     f'<text x="{left - 5}" y="{y(t) + 4}" text-anchor="end">{t:.1f}</text>')
    step = max(1, len(xs) // 12)  # at most ~12 tick labels
    for i in range(0, len(xs), step):
        parts.append(f'<text x="{x(i)}" y="{top + ph + 15}" text-anchor="middle">{escape(str(xs[i]))}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>'
                 f'<text transform="translate(12,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
                 f'{escape(ylabel)}</text>')
    for j, (label, values) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if v is not None)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>'
                  for i, v in enumerate(values) if v is not None]
        ly = top + 14 * j + 5
        parts.append(f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 28}" y2="{ly}" stroke="{colour}" '
                     f'stroke-width="2"/><text x="{left + pw + 32}" y="{ly + 4}">{escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_figure(name: str, svg: str, folder: Path = FIGURES) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(svg)
    return path


def layers_figure(result: dict, label: str, split: str, figures: Path) -> Path:
    """The per-layer own-text accuracy of every centring row that routed, one curve each (an SVG under figures)."""
    curves = {f"centre {c['centre']}" + (f"/{c['scope']}" if c["scope"] else "")
              + (" + input" if c.get("input_centre", "none") != "none" else ""): c["per_layer"]
              for c in result["centring"] if "per_layer" in c}
    return write_figure(f"routing-{label}-{split}-layers.svg", svg_lines(
        result["per_layer"]["layers"], curves, f"{label} ({split}): own-text accuracy per layer", "layer",
        "accuracy"), figures)
