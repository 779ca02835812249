"""The review's charts as inline SVG, drawn with matplotlib: credits per run or day, pages per
status, the latency distribution.

Why matplotlib: it writes static SVG with no script and no external reference (the page's
Content-Security-Policy allows neither), does the axes, ticks, binning and label layout a
hand-written SVG would have to re-invent, and runs offline. SVG-first libraries either
load JavaScript from a CDN for their interactivity (pygal, plotly, vega) or are far less
maintained. Text stays text (`svg.fonttype = "none"`), so a chart is a few KB. Labels may
come from the data (run ids): matplotlib escapes text it writes into the SVG, and mathtext
is off (`usetex`/`$...$` parsing disabled per label) so a `$` in a name is plain text.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Sequence
from typing import Any

STATUS_COLOURS = {"ok": "#2e7d32", "invalid_answer": "#c62828", "api_error": "#ad1457",
                  "input_error": "#ef6c00", "skipped": "#757575", "duplicate": "#1565c0"}
_PROLOG = re.compile(r"^.*?(?=<svg)", re.DOTALL)  # XML declaration, DOCTYPE, comments
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)  # RDF: nothing to see
_RC = {"svg.fonttype": "none", "font.family": "sans-serif",
       "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"]}


def _svg(fig, name: str) -> str:  # noqa: ANN001 - matplotlib Figure
    from matplotlib import rc_context
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    buf = io.StringIO()
    # a salt per chart: ids of clip paths and markers stay unique among the page's charts
    with rc_context({"svg.hashsalt": f"ernie-review-{name}"}):
        FigureCanvasSVG(fig).print_svg(buf, metadata={"Date": None, "Creator": None})
    svg = _PROLOG.sub("", buf.getvalue(), count=1)
    return _METADATA.sub("", svg, count=1).strip()


def _figure(title: str):  # noqa: ANN202 - matplotlib Figure, imported lazily
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.8, 2.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10, usetex=False, parse_math=False)
    ax.tick_params(labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _styled(draw: Callable[..., str]) -> Callable[..., str]:
    """Draw under the review's rc settings (text properties are read when text is made)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        from matplotlib import rc_context

        with rc_context(_RC):
            return draw(*args, **kwargs)

    return wrapper


@_styled
def bar_chart(name: str, title: str, labels: Sequence[str], values: Sequence[float],
              ylabel: str, colours: Sequence[str] | None = None) -> str:
    """Vertical bars, one per label (long labels shortened, shown at an angle)."""
    fig, ax = _figure(title)
    short = [_short(label) for label in labels]
    positions = range(len(values))
    ax.bar(positions, values, color=list(colours) if colours else "#37474f")
    ax.set_xticks(list(positions), short, rotation=30 if len(labels) > 3 else 0,
                  ha="right" if len(labels) > 3 else "center")
    for tick in ax.get_xticklabels():
        tick.set_parse_math(False)
    ax.set_ylabel(ylabel, fontsize=8)
    if not values:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes,
                parse_math=False)
    return _svg(fig, name)


@_styled
def histogram(name: str, title: str, values: Sequence[float], xlabel: str) -> str:
    """The distribution of `values` (latencies), with the median and p95 marked."""
    fig, ax = _figure(title)
    if values:
        import numpy as np

        ax.hist(values, bins=min(30, max(5, len(values) // 4)), color="#546e7a")
        for q, style in ((50, "-"), (95, "--")):
            at = float(np.percentile(values, q))
            ax.axvline(at, color="#d84315", linestyle=style, linewidth=1)
            ax.annotate(f"p{q} {at:.2f}", (at, 1), xycoords=("data", "axes fraction"),
                        fontsize=7, rotation=90, va="top", ha="right")
    else:
        ax.text(0.5, 0.5, "no answered requests", ha="center", va="center",
                transform=ax.transAxes, parse_math=False)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("pages", fontsize=8)
    return _svg(fig, name)


def _short(label: str, limit: int = 24) -> str:  # a run id is 23
    return label if len(label) <= limit else label[: limit - 1] + "…"
