"""`ernie-batch plan`: what a run would send and cost, without sending anything.

Counts: each document is put to the same questions the engine asks of earlier runs
(`run.earlier.EarlierWork`: the done-index, and the inputs given up on with these preparation
settings; `document`, then `unit` per unit; the first path of content found twice is the one
sent), so a unit counts as a request exactly when the run would send it. Units
come from the files' structure (no page is split or rendered): a file that turns out to be
undecodable only when prepared counts as a request until a run has recorded it.

Price: each unit's prompt tokens estimated as the engine estimates them before sending (the
same rendered text; images at the size they would be prepared to), corrected per document
type by what earlier runs of the model were billed (`calibration`); a type with no history
keeps the estimate, with a typical answer of the schema as its completion.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

from ernie_batch.answers import prompt
from ernie_batch.api import tokens
from ernie_batch.config import CREDITS_PER_USD, JobConfig
from ernie_batch.errors import InputError
from ernie_batch.intake.discover import discover
from ernie_batch.intake.images import frames_to_send, open_image, target_size
from ernie_batch.intake.objects import readable
from ernie_batch.intake.pdf import PdfError, chunks, open_pdf, render_scale, select_pages
from ernie_batch.intake.prepare import prep_fingerprint
from ernie_batch.intake.units import Document, PageUnit
from ernie_batch.money.calibration import TypeHistory, learn
from ernie_batch.run.earlier import EarlierWork
from ernie_batch.store import UnitDecision, known_objects

TOKEN_ESTIMATE = "token estimate"


@dataclass
class TypeEstimate:
    """The requests of one document type and their price, and where the price came from."""

    requests: int = 0
    prompt_tokens: int = 0  # as estimated, before the history's correction
    credits: float = 0.0
    source: str = TOKEN_ESTIMATE  # or "history of this prompt (N units)", ...
    prompt_ratio: float | None = None  # billed / estimated prompt tokens, from the history
    completion_tokens_per_unit: float = 0.0


@dataclass
class Plan:
    documents: int = 0
    documents_unreadable: int = 0
    pages: int = 0  # pages in the units to send
    requests: int = 0  # units to send
    units_already_done: int = 0  # answered (or given up on) by earlier runs with this prompt
    units_duplicate: int = 0  # same content as another path: a duplicate row, no request
    files_passed_over: dict[str, int] = field(default_factory=dict)
    still_growing: list[str] = field(default_factory=list)
    prompt_tokens: int = 0  # as the history corrects the estimate
    completion_tokens: int = 0
    credits: float = 0.0
    price_source: str = TOKEN_ESTIMATE
    by_type: dict[str, TypeEstimate] = field(default_factory=dict)
    minutes_at_rate_limit: float | None = None
    balance: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def usd(self) -> float:
        return self.credits / CREDITS_PER_USD


@dataclass(frozen=True, slots=True)
class _Unit:
    """One request unit as the file's structure tells it, before any preparing."""

    page: int
    last: int
    images: tuple[tuple[int, int], ...]  # sizes as they would be prepared
    pdf_pages: int


def _pdf_units(path: Path, cfg: JobConfig) -> tuple[list[_Unit], int]:
    pdf = open_pdf(path, cfg.pdf)
    try:
        count = len(pdf.pages)
        out = []
        for chunk in chunks(select_pages(count, cfg.pdf), cfg.pdf.pages_per_request):
            if cfg.pdf.mode == "image":
                sizes = tuple(_rendered_size(pdf.pages[i], cfg.pdf.render_max_side) for i in chunk)
                out.append(_Unit(chunk[0] + 1, chunk[-1] + 1, sizes, 0))
            else:
                out.append(_Unit(chunk[0] + 1, chunk[-1] + 1, (), len(chunk)))
        return out, count
    finally:
        pdf.close()


def _rendered_size(page, side: int) -> tuple[int, int]:  # noqa: ANN001 - pikepdf.Page
    """The pixel size pdfium renders a page to with its longest side `side` (`render_pdf`)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in page.cropbox)
        w, h = abs(x1 - x0), abs(y1 - y0)
        scale = render_scale((w, h), side)
    except (PdfError, ValueError, TypeError, KeyError):
        return side * 77 // 100, side  # a letter page: what a page of no readable size gets
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def _image_units(path: Path, cfg: JobConfig) -> tuple[list[_Unit], int]:
    im = open_image(path, cfg.images.max_pixels)
    try:
        size = target_size(im.size, cfg.images.max_side)
        frames = frames_to_send(im, cfg.images.all_frames)
    finally:
        im.close()
    return [_Unit(i + 1, i + 1, (size,), 0) for i in range(len(frames))], len(frames)


def _units(doc: Document, cfg: JobConfig) -> tuple[list[_Unit], int]:
    """The document's request units and its page (frame) count; InputError (PdfError,
    ImageError, an object gone) or OSError when it cannot be read (the run records it, sends
    nothing). An object on object storage is read into a temporary file for the count."""
    with readable(doc.path, doc.etag, cfg.sources.storage_options) as path:
        return _pdf_units(path, cfg) if doc.doc_type == "pdf" else _image_units(path, cfg)


def _estimate(cfg: JobConfig, doc: Document, u: _Unit, page_count: int) -> int:
    """The prompt tokens the engine will estimate for this unit (`UnitSender._estimate`)."""
    body = prompt.build_body(cfg, PageUnit(doc, u.page, u.last, page_count, ()),
                             cfg.request.response_format, cfg.request.temperature)
    return tokens.prompt_tokens(tokens.text_chars(body["messages"]), list(u.images), u.pdf_pages)


def _price(plan: Plan, cfg: JobConfig, to_send: list[tuple[str, int]],
           history: dict[str, TypeHistory]) -> None:
    """Price the units to send, (doc_type, estimated prompt tokens) each: the estimate,
    corrected by its type's history when there is one."""
    b = cfg.budget
    guess = prompt.expected_completion_tokens(cfg)
    for doc_type, est in to_send:
        t = plan.by_type.get(doc_type)
        if t is None:
            t = plan.by_type[doc_type] = TypeEstimate(completion_tokens_per_unit=guess)
            if (h := history.get(doc_type)) is not None:
                t.source = f"history of {h.scope} ({h.units:,} units)"
                t.prompt_ratio, t.completion_tokens_per_unit = h.prompt_ratio, h.completion_tokens
        billed = est * (t.prompt_ratio or 1.0)
        credits = (billed * b.credits_per_prompt_token
                   + t.completion_tokens_per_unit * b.credits_per_completion_token)
        t.requests += 1
        t.prompt_tokens += est
        t.credits += credits
        plan.requests += 1
        plan.prompt_tokens += round(billed)
        plan.completion_tokens += round(t.completion_tokens_per_unit)
        plan.credits += credits


def make_plan(cfg: JobConfig, sources: list[str] | list[Path] | None = None, *,
              force: bool = False, retry_failed: bool = False) -> Plan:
    """What `run` (or `backfill`) with this config, sources and flags would send, and its cost."""
    opts = cfg.sources.model_copy(update={"paths": sources}) if sources else cfg.sources
    root = cfg.output.root()
    # objects on object storage whose (URL, ETag) the output knows are not read to be hashed
    docs, stats = discover(opts, known=functools.partial(known_objects, root))
    fp = prompt.fingerprint(cfg)
    earlier = EarlierWork(root, fp, prep_fingerprint(cfg.images, cfg.pdf, cfg.prepare), cfg.pdf,
                          force=force, retry_failed=retry_failed)
    earlier.index(d.sha256 for d in docs)
    plan = Plan(documents=len(docs), files_passed_over=dict(stats.skipped),
                still_growing=[str(p) for p in stats.still_growing])
    if stats.still_growing:
        plan.warnings.append(
            f"{len(stats.still_growing)} file(s) modified in the last {opts.settle_seconds:g} s "
            f"passed over (--settle 0 includes them): "
            + ", ".join(str(p) for p in stats.still_growing[:5]))
    leaders: dict[str, str] = {}  # content -> the path the run sends it for (path order)
    to_send: list[tuple[str, int]] = []  # (doc_type, estimated prompt tokens) per request
    for doc in docs:
        path = str(doc.path)
        decision = earlier.document(doc)
        plan.units_already_done += decision.already_done
        plan.units_duplicate += len(decision.duplicates)
        if not decision.prepare or doc.doc_type == "unknown":  # unknown: a skipped row
            continue
        try:
            units, page_count = _units(doc, cfg)
        except (InputError, OSError):
            plan.documents_unreadable += 1
            continue
        follower = leaders.setdefault(doc.sha256, path) != path
        for u in units:
            if follower:  # answered once, for the first path: duplicate rows
                plan.units_duplicate += 1
                continue
            unit = earlier.unit(doc, u.page, u.last)
            if unit == UnitDecision.SEND and earlier.unit_done(doc, u.page, u.last):
                plan.units_already_done += 1  # given up on by an earlier run
            elif unit == UnitDecision.SEND:
                plan.pages += u.last - u.page + 1
                to_send.append((doc.doc_type, _estimate(cfg, doc, u, page_count)))
            elif unit == UnitDecision.DUPLICATE:
                plan.units_duplicate += 1
            else:
                plan.units_already_done += 1
    history = learn(root, cfg.api.model, fp, {t for t, _ in to_send}) if to_send else {}
    _price(plan, cfg, to_send, history)
    plan.price_source = _sources(plan)
    b = cfg.budget
    if cfg.limits.rpm:
        plan.minutes_at_rate_limit = plan.requests / cfg.limits.rpm
    if b.max_credits is not None and plan.credits > b.max_credits:
        plan.warnings.append(f"the estimate ({plan.credits:,.0f} credits) exceeds "
                             f"budget.max_credits ({b.max_credits:,.0f}): the run will stop early")
    return plan


def _sources(plan: Plan) -> str:
    """Where the price came from, in one line: one source, or each type's."""
    found = {t.source for t in plan.by_type.values()}
    if len(found) <= 1:
        return found.pop() if found else TOKEN_ESTIMATE
    return "; ".join(f"{name}: {t.source}" for name, t in sorted(plan.by_type.items()))


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """The plan as (name, value) lines for a terminal table."""
    passed = ", ".join(f"{k}: {v}" for k, v in sorted(plan.files_passed_over.items()))
    return [("files_passed_over", passed or "none"),
        ("documents", f"{plan.documents} ({plan.documents_unreadable} unreadable)"),
        ("requests to send", f"{plan.requests} ({plan.pages} pages)"),
        ("units_already_done", str(plan.units_already_done)),
        ("units_duplicate", str(plan.units_duplicate)),
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
