"""The review's charts as inline SVG, drawn with matplotlib: credits per run or day, pages per
status, the latency distribution.

Why matplotlib: it writes static SVG with no script and no external reference (the page's
Content-Security-Policy allows neither), does the axes, ticks, binning and label layout a
hand-written SVG would have to re-invent, and runs offline. SVG-first libraries either
load JavaScript from a CDN for their interactivity (pygal, plotly, vega) or are far less
maintained. Text stays text (`svg.fonttype = "none"`), so a chart is a few KB. Labels may
come from the data (run ids): matplotlib escapes text it writes into the SVG, and mathtext
is off (`usetex`/`$...$` parsing disabled per label) so a `$` in a name is plain text.

Legible with 1 bar or 60: bars are horizontal (a label needs a line, not a column), named
by short labels (a run by its time and id suffix, a day by its date), and tick labels that
would touch are left out, every k-th kept (`_declutter`, measured after layout). Latency
bins are logarithmic once answers differ by more than 4x, so one slow answer is a bar of its
own instead of squeezing the rest into one; quantiles and the maximum are named in a legend
under the plot, never on a bar.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from ernie_batch.vocab import UnitStatus

STATUS_COLOURS = {UnitStatus.OK: "#2e7d32", UnitStatus.INVALID_ANSWER: "#c62828",
                  UnitStatus.API_ERROR: "#ad1457", UnitStatus.INPUT_ERROR: "#ef6c00",
                  UnitStatus.SKIPPED: "#757575", UnitStatus.DUPLICATE: "#1565c0"}
BAR_COLOUR = "#546e7a"
MARK_COLOUR = "#d84315"
LOG_SPREAD = 4.0  # latencies whose max/min is wider than this get logarithmic bins
_PROLOG = re.compile(r"^.*?(?=<svg)", re.DOTALL)  # XML declaration, DOCTYPE, comments
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)  # RDF: nothing to see
_RC = {"svg.fonttype": "none", "font.family": "sans-serif",
       "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"]}
_GAP_PX = 3.0  # the least room between two texts of a chart (browsers' text differs slightly)
_RUN_ID = re.compile(r"^(\d{8}T\d{6}Z)-(\w+)$")


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


def bar_labels(keys: Sequence[str]) -> list[str]:
    """Short names for bars of run ids or dates: a run by its time (and its date when the
    runs span days) and the suffix that makes its id unique; a date as Mar 01."""
    runs = [_RUN_ID.match(k) for k in keys]
    if keys and all(runs):
        starts = [datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ") for m in runs if m]
        fmt = "%H:%M:%S" if len({s.date() for s in starts}) == 1 else "%b %d %H:%M"
        return [f"{s:{fmt}} {m.group(2)}" for s, m in zip(starts, runs, strict=True) if m]
    try:
        days = [datetime.strptime(k, "%Y-%m-%d") for k in keys]
    except ValueError:
        return [_short(k) for k in keys]
    fmt = "%b %d" if len({d.year for d in days}) <= 1 else "%Y-%m-%d"
    return [f"{d:{fmt}}" for d in days]


def common_day(keys: Sequence[str]) -> str | None:
    """The one UTC day all run ids (or dates) share, None when they span several."""
    days = {k[:8] if _RUN_ID.match(k) else k.replace("-", "") for k in keys}
    if len(days) != 1:
        return None
    day = days.pop()
    return f"{day[:4]}-{day[4:6]}-{day[6:8]}" if re.fullmatch(r"\d{8}", day) else None


@_styled
def bar_chart(name: str, title: str, labels: Sequence[str], values: Sequence[float],
              xlabel: str, colours: Sequence[str] | None = None) -> str:
    """Horizontal bars, one per label, the first on top; labels that would touch thinned."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = _figure(title)
    positions = list(range(len(values)))
    ax.barh(positions, values, height=0.75, color=list(colours) if colours else BAR_COLOUR)
    ax.set_yticks(positions, list(labels))
    ax.tick_params(axis="y", length=0)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
    ax.set_xlabel(xlabel, fontsize=8)
    if not values:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes,
                parse_math=False)
    _declutter(fig, ax)
    return _svg(fig, name)


def latency_bins(values: Sequence[float]) -> list[float]:
    """Bin edges for latencies: logarithmic when the slowest answer is more than LOG_SPREAD
    times the fastest (a slow one gets a bar of its own, the rest keep their shape), else
    even; between 5 and 30 bins by the count."""
    import numpy as np

    lo, hi = min(values), max(values)
    bins = min(30, max(5, round(2 * len(values) ** 0.5)))
    if lo <= 0 or hi / lo <= LOG_SPREAD:
        if hi - lo < 1e-9:
            return [lo - 0.05, hi + 0.05]
        return [float(x) for x in np.linspace(lo, hi, bins + 1)]
    return [float(x) for x in np.geomspace(lo, hi, bins + 1)]


@_styled
def histogram(name: str, title: str, values: Sequence[float], xlabel: str) -> str:
    """The distribution of `values` (latencies), with the median, p95 and maximum marked by
    lines and named in a legend under the plot."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(title)
    if values:
        edges = latency_bins(values)
        ax.hist(values, bins=edges, color="#90a4ae", edgecolor="#546e7a", linewidth=0.5)
        log = edges[-1] / max(edges[0], 1e-9) > LOG_SPREAD and edges[0] > 0
        if log:
            _log_axis(ax, edges[0], edges[-1])
            xlabel = f"{xlabel} (log scale)"
        ordered = sorted(values)
        marks = (("p50", percentile(ordered, 50), "-"), ("p95", percentile(ordered, 95), "--"),
                 ("max", ordered[-1], ":"))
        for label, at, style in marks:
            ax.axvline(at, color=MARK_COLOUR, linestyle=style, linewidth=1,
                       label=f"{label} {at:.2f} s")
        fig.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False,
                   handlelength=1.5, columnspacing=1.0)
    else:
        ax.text(0.5, 0.5, "no answered requests", ha="center", va="center",
                transform=ax.transAxes, parse_math=False)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("pages", fontsize=8)
    _declutter(fig, ax)
    return _svg(fig, name)


def _log_axis(ax, lo: float, hi: float) -> None:  # noqa: ANN001 - matplotlib Axes
    """A log x axis with plain-number ticks at 1-2-3-5 steps (no minor labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log")
    ax.set_xlim(lo / 1.05, hi * 1.05)
    first = math.floor(math.log10(lo))
    ticks = [m * 10.0 ** e for e in range(first, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 3, 5) if lo / 1.05 <= m * 10.0 ** e <= hi * 1.05]
    ax.xaxis.set_major_locator(FixedLocator(ticks or [lo, hi]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _declutter(fig, ax) -> None:  # noqa: ANN001 - matplotlib Figure, Axes
    """Leave out tick labels that would touch another text of the figure, measured after
    layout: along each axis every k-th label is kept (k as small as fits), then any tick label
    still on a title, an axis label or a legend entry goes."""
    fig.draw_without_rendering()
    thinned = False
    for axis in (ax.xaxis, ax.yaxis):
        labels = [t for t in axis.get_ticklabels() if t.get_text() and t.get_visible()]
        for t in labels:
            t.set_parse_math(False)
        boxes = [t.get_window_extent() for t in labels]
        step = 1
        while step < len(labels) and any(
                _touch(boxes[i], boxes[i + step]) for i in range(0, len(labels) - step, step)):
            step += 1
        for i, t in enumerate(labels):
            t.set_visible(i % step == 0)
        thinned = thinned or step > 1
    if thinned:  # the layout may move once labels are gone
        fig.draw_without_rendering()
    ticks = [t for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels()
             if t.get_text() and t.get_visible()]
    others = [t for t in fig.findobj(_is_text) if t.get_visible() and t.get_text()
              and t not in ticks]
    kept = [t.get_window_extent() for t in others]
    for t in ticks:
        box = t.get_window_extent()
        if any(_touch(box, k) for k in kept):
            t.set_visible(False)
        else:
            kept.append(box)


def _is_text(artist: Any) -> bool:
    from matplotlib.text import Text

    return isinstance(artist, Text)


def _touch(a, b) -> bool:  # noqa: ANN001 - matplotlib Bbox
    """Two boxes closer than _GAP_PX (or overlapping)."""
    return not (a.x1 + _GAP_PX <= b.x0 or b.x1 + _GAP_PX <= a.x0
                or a.y1 + _GAP_PX <= b.y0 or b.y1 + _GAP_PX <= a.y0)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (as the review's header gives it)."""
    return ordered[max(1, math.ceil(len(ordered) * q / 100)) - 1]


def _compact(v: float) -> str:
    """An axis number in few characters: 950, 15k, 1.2M."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:.3g}"


def _short(label: str, limit: int = 20) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"
