"""Build a review: gather the selected pages, re-create their thumbnails, draw the charts,
write the HTML (split into linked files past `review.pages_per_file` pages)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ernie_batch.config import JobConfig
from ernie_batch.location import OutputRoot
from ernie_batch.review import charts
from ernie_batch.review.gather import Selection, Totals, gather
from ernie_batch.review.page import Part, render
from ernie_batch.review.thumbs import Want, previews
from ernie_batch.run.summary import RunSummary
from ernie_batch.store.files import write_text_atomic

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReviewResult:
    files: list[Path]  # the parts written, the first one first (empty: no pages selected)
    pages: int
    seconds: dict[str, float] = field(default_factory=dict)  # gather, previews, charts, write


def part_paths(first: Path, count: int) -> list[Path]:
    """`review.html`, `review-2.html`, … beside the first."""
    return [first] + [first.with_name(f"{first.stem}-{n}{first.suffix}")
                      for n in range(2, count + 1)]


def build_review(cfg: JobConfig, run_ids: list[str], html_path: Path,
                 statuses: list[str] | None = None, describe: str = "") -> ReviewResult:
    """Write the review of `run_ids` (their pages, perhaps only some statuses) to `html_path`."""
    from ernie_batch.answers.prompt import fingerprint

    root = cfg.output.root()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    props = cfg.resolved.schema.get("properties")
    sel = gather(root, run_ids, statuses, list(props) if isinstance(props, dict) else [],
                 fingerprint(cfg))
    seconds["gather"] = time.perf_counter() - t0
    if not sel.cards:
        return ReviewResult([], 0, seconds)
    t0 = time.perf_counter()
    shown = previews([(c.row.source_path, c.row.doc_type,
                       Want(c.row.page, c.row.page_last, c.row.source_sha256, c.row.content_sha256))
                      for c in sel.cards], cfg)
    seconds["previews"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    svgs = chart_svgs(sel.totals)
    seconds["charts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    size = cfg.review.pages_per_file
    chunks = [list(zip(sel.cards[i:i + size], shown[i:i + size], strict=True))
              for i in range(0, len(sel.cards), size)]
    paths = part_paths(html_path, len(chunks))
    names = tuple(p.name for p in paths)
    title = "ernie-batch review"
    subtitle = _subtitle(sel, describe, root)
    for number, (path, chunk) in enumerate(zip(paths, chunks, strict=True), 1):
        write_text_atomic(path, render(sel, chunk, svgs, Part(number, names), title, subtitle))
    seconds["write"] = time.perf_counter() - t0
    return ReviewResult(paths, len(sel.cards), seconds)


def chart_svgs(t: Totals) -> list[str]:
    """Credits per run (or per day, for many runs), pages per status, latency distribution."""
    statuses = sorted(t.statuses)
    keys = list(t.credits_by)
    day = charts.common_day(keys) if t.credits_by_what == "run" else None
    return [
        charts.bar_chart("credits", f"Credits per {t.credits_by_what}"
                         + (f", {day} UTC" if day else ""), charts.bar_labels(keys),
                         list(t.credits_by.values()), "credits"),
        charts.bar_chart("statuses", "Pages per status", statuses,
                         [t.statuses[s] for s in statuses], "pages",
                         [charts.STATUS_COLOURS.get(s, "#37474f") for s in statuses]),
        charts.histogram("latency", "Latency of answered requests", t.latencies, "seconds"),
    ]


def _subtitle(sel: Selection, describe: str, root: OutputRoot) -> str:
    runs = sel.totals.runs
    which = describe or ("run " + ", ".join(runs) if len(runs) <= 3 else f"{len(runs)} runs")
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{which} · {root} · made {made}"


def review_of_run(cfg: JobConfig, summary: RunSummary) -> RunSummary:
    """`[review] html = true`: the run's review at OUTPUT/review/<run_id>.html (an output on
    object storage: under its local state folder), named in the summary. A review that
    cannot be written is a warning: the run's outcome stands."""
    base = cfg.output.state_folder() if cfg.output.path.is_remote else Path(cfg.output.path)
    path = base / "review" / f"{summary.run_id}.html"
    try:
        result = build_review(cfg, [summary.run_id], path, describe=f"run {summary.run_id}")
    except Exception as exc:  # noqa: BLE001 - the run is done; its review is a by-product
        log.warning("review of run %s not written: %s: %s", summary.run_id,
                    type(exc).__name__, exc)
        return summary
    if not result.files:
        return summary
    return summary.model_copy(update={"review_html": str(result.files[0])})
