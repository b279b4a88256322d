"""The look of every chart: one colour per backend variant, fonts big enough to project, saving.

``VARIANT_COLORS`` is the only place a backend gets its colour; every chart asks
``color(variant)``. The switch microbenchmarks borrow the colour of the model
they stand for (``BENCH_MODEL``), so a greenlet switch is gevent's colour
everywhere. Charts are written twice, PNG (for the page) and SVG (to zoom).

Figures are ``matplotlib.figure.Figure`` objects, not pyplot's: no GUI backend,
no global figure list to leak, nothing switched for a notebook that imports
this; PNGs are rendered by Agg.
"""
from __future__ import annotations

import os
import textwrap

import matplotlib
from matplotlib.figure import Figure
from PIL import Image

# The lab's order (experiments.variants) and one colour each; colour-blind-safe-ish, distinct.
VARIANT_COLORS = {
    "threads": "#d62728",              # red: one OS thread per connection
    "threadpool": "#ff7f0e",           # orange: the pool, a worker per connection
    "threadpool-request": "#bcbd22",   # olive: the pool, a worker per request
    "asyncio": "#1f77b4",              # blue
    "uvloop": "#9467bd",               # purple
    "gevent": "#2ca02c",               # green
    "epoll": "#8c564b",                # brown
    "go": "#00add8",                   # Go's own cyan
}
VARIANT_ORDER = tuple(VARIANT_COLORS)
FALLBACK_COLORS = ("#e377c2", "#7f7f7f", "#17becf", "#393b79", "#637939", "#8c6d31")
NEUTRAL = "#555555"                    # ceilings, reference lines, anything that is not a backend

# A microbenchmark (switch.csv ``bench``) -> the variant whose colour it wears.
BENCH_MODEL = {
    "generator": "asyncio", "asyncio": "asyncio", "uvloop": "uvloop", "greenlet": "gevent",
    "thread": "threads", "process_pipe": None, "goroutine": "go",
}

PERCENTILE_STYLES = {"p50_us": "-", "p99_us": "--", "p999_us": ":"}   # line style per percentile

FIGSIZE = (11, 6.2)                    # inches; 16:9-ish, fills a projected page
FIGSIZE_WIDE = (14, 6.2)
DPI = 100                              # PNG pixels per inch: 1100 x 620 px, small files
PNG_COLORS = 256                       # palette PNGs: charts have few colours, the files get 3x smaller
RC = {
    "font.size": 15, "axes.titlesize": 16, "axes.labelsize": 15, "xtick.labelsize": 13,
    "ytick.labelsize": 13, "legend.fontsize": 12, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none",
    "figure.autolayout": False, "svg.hashsalt": "conclab",
}
TITLE_WRAP = 70                        # characters per title line


def color(variant: str) -> str:
    """The variant's colour; an unknown variant gets a stable fallback."""
    if variant in VARIANT_COLORS:
        return VARIANT_COLORS[variant]
    return FALLBACK_COLORS[sum(map(ord, str(variant))) % len(FALLBACK_COLORS)]


def bench_color(bench: str) -> str:
    model = BENCH_MODEL.get(bench)
    return color(model) if model else NEUTRAL


def order(variants) -> list:
    """Variants in the lab's order, unknown ones last (alphabetically)."""
    known = [v for v in VARIANT_ORDER if v in set(variants)]
    return known + sorted(set(variants) - set(VARIANT_ORDER))


def context():
    """``with style.context():`` around building a chart: the lab's fonts and grid, nothing global."""
    return matplotlib.rc_context(RC)


def figure(ncols: int = 1, nrows: int = 1, wide: bool = False, **kwargs):
    """A new figure (call inside ``context()``); returns (fig, axes)."""
    size = FIGSIZE_WIDE if wide or ncols > 1 else FIGSIZE
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def wrap(text: str, width: int = TITLE_WRAP) -> str:
    return "\n".join(textwrap.wrap(text, width))


def title(fig, text: str) -> None:
    fig.suptitle(wrap(text, TITLE_WRAP if len(fig.axes) < 2 else int(TITLE_WRAP * 1.3)),
                 fontsize=RC["axes.titlesize"] + 1, fontweight="bold")


def save(fig, directory: str, name: str) -> dict:
    """Write NAME.png and NAME.svg into directory; return {"png": path, "svg": path}."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for ext in ("png", "svg"):
        path = os.path.join(directory, f"{name}.{ext}")
        fig.savefig(path, dpi=DPI, metadata=_metadata(ext))
        paths[ext] = path
    _shrink_png(paths["png"])
    return paths


def _shrink_png(path: str) -> None:
    """Re-save with a PNG_COLORS palette: about a third of the bytes, no visible change for line charts."""
    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(PNG_COLORS)
    palette.save(path, optimize=True)


def _metadata(ext: str) -> dict:
    """No timestamps or tool versions in the files: the same data gives the same bytes (clean diffs)."""
    if ext == "svg":
        return {"Date": None, "Creator": None}
    return {"Software": None}
