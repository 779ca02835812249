"""`ernie-batch plan`: what a run would send and cost, without sending anything.

Counts pages from the files' structure (no page is split or resized), subtracts what the
output already holds, and prices the rest: calibrated from earlier runs of the same
fingerprint when there are any (median credits per unit of ok rows), else from the
configured price and the token rules the simulator bills by.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ernie_batch import prompt, store, tokens
from ernie_batch.config import CREDITS_PER_USD, JobConfig
from ernie_batch.discover import discover
from ernie_batch.images import ImageError, frames_to_send, open_image, target_size
from ernie_batch.pdf import PdfError, chunks, open_pdf, select_pages
from ernie_batch.units import Document
from ernie_batch.vocab import UnitStatus


@dataclass
class Plan:
    documents: int = 0
    documents_unreadable: int = 0
    pages: int = 0
    requests: int = 0  # units to send
    units_already_done: int = 0  # answered by earlier runs with this prompt
    files_passed_over: dict[str, int] = field(default_factory=dict)
    still_growing: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    credits: float = 0.0
    price_source: str = "configured price"
    minutes_at_rate_limit: float | None = None
    balance: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def usd(self) -> float:
        return self.credits / CREDITS_PER_USD


def _units(doc: Document, cfg: JobConfig) -> list[tuple[int, int, list[tuple[int, int]], int]]:
    """(page, page_last, image sizes, pdf pages) per request unit of the document."""
    if doc.doc_type == "pdf":
        pdf = open_pdf(doc.path, cfg.pdf)
        try:
            pages = select_pages(len(pdf.pages), cfg.pdf)
        finally:
            pdf.close()
        out = []
        for chunk in chunks(pages, cfg.pdf.pages_per_request):
            n = len(chunk)
            if cfg.pdf.mode == "image":
                side = cfg.pdf.render_max_side
                out.append((chunk[0] + 1, chunk[-1] + 1, [(side * 77 // 100, side)] * n, 0))
            else:
                out.append((chunk[0] + 1, chunk[-1] + 1, [], n))
        return out
    im = open_image(doc.path, cfg.images.max_pixels)
    try:
        size = target_size(im.size, cfg.images.max_side)
        frames = frames_to_send(im, cfg.images.all_frames)
    finally:
        im.close()
    return [(i + 1, i + 1, [size], 0) for i in range(len(frames))]


def _calibrated(cfg: JobConfig, fp: str) -> tuple[float, int] | None:
    """Median credits and completion tokens per ok unit of earlier runs with this fingerprint."""
    table = store.read_columns(cfg.output.path, "pages",
                               ["fingerprint", "status", "credits", "completion_tokens",
                                "attempts"])
    if table is None:
        return None
    rows = [r for r in table.to_pylist()
            if r["fingerprint"] == fp and r["status"] == UnitStatus.OK and r["attempts"] == 1]
    if not rows:
        return None
    return (statistics.median(r["credits"] for r in rows),
            int(statistics.median(r["completion_tokens"] for r in rows)))


def make_plan(cfg: JobConfig, sources: list[Path] | None = None) -> Plan:
    opts = cfg.sources.model_copy(update={"paths": sources}) if sources else cfg.sources
    docs, stats = discover(opts)
    fp = prompt.fingerprint(cfg)
    done = store.load_done(cfg.output.path, fp, (d.sha256 for d in docs))
    b = cfg.budget
    completion = min(b.expected_completion_tokens, cfg.request.max_tokens)
    calibrated = _calibrated(cfg, fp)
    plan = Plan(documents=len(docs), files_passed_over=dict(stats.skipped),
                still_growing=[str(p) for p in stats.still_growing])
    if stats.still_growing:
        plan.warnings.append(
            f"{len(stats.still_growing)} file(s) modified in the last {opts.settle_seconds:g} s "
            f"passed over (--settle 0 includes them): "
            + ", ".join(str(p) for p in stats.still_growing[:5]))
    if calibrated:
        plan.price_source = "median of earlier runs with this prompt"
        completion = calibrated[1]
    text_chars = len(cfg.resolved.template) + 40  # rendered variables: a file name, page numbers
    for doc in docs:
        if doc.doc_type == "unknown":
            continue
        try:
            units = _units(doc, cfg)
        except (PdfError, ImageError, OSError):
            plan.documents_unreadable += 1
            continue
        for page, last, images, pdf_pages in units:
            plan.pages += last - page + 1
            if done.status(doc.sha256, fp, page, last) == UnitStatus.OK:
                plan.units_already_done += 1
                continue
            plan.requests += 1
            est = tokens.prompt_tokens(text_chars, images, pdf_pages)
            plan.prompt_tokens += est
            plan.completion_tokens += completion
            if calibrated:
                plan.credits += calibrated[0]
            else:
                plan.credits += est * b.credits_per_prompt_token + completion * (
                    b.credits_per_completion_token)
    if cfg.limits.rpm:
        plan.minutes_at_rate_limit = plan.requests / cfg.limits.rpm
    if b.max_credits is not None and plan.credits > b.max_credits:
        plan.warnings.append(f"the estimate ({plan.credits:,.0f} credits) exceeds "
                             f"budget.max_credits ({b.max_credits:,.0f}): the run will stop early")
    return plan


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """The plan as (name, value) lines for a terminal table."""
    passed = ", ".join(f"{k}: {v}" for k, v in sorted(plan.files_passed_over.items()))
    return [("files_passed_over", passed or "none"),
        ("documents", f"{plan.documents} ({plan.documents_unreadable} unreadable)"),
        ("pages", str(plan.pages)),
        ("requests to send", str(plan.requests)),
        ("units_already_done", str(plan.units_already_done)),
        ("prompt tokens (est.)", f"{plan.prompt_tokens:,}"),
        ("completion tokens (est.)", f"{plan.completion_tokens:,}"),
        ("credits (est.)", f"{plan.credits:,.0f}  ({plan.price_source})"),
        ("USD (est.)", f"{plan.usd:.4f}"),
        ("time at the rate limit", _duration(plan.minutes_at_rate_limit)),
        ("balance", "unknown" if plan.balance is None else f"{plan.balance:,.0f} credits"),
    ]


def _duration(minutes: float | None) -> str:
    if minutes is None:
        return "no limit set"
    return f"{minutes * 60:.0f} s" if minutes < 2 else f"{minutes:.1f} min"
