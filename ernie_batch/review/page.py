"""The review as HTML: one self-contained file per part, every value from a document escaped.

Nothing here reads files or Parquet: it turns cards, previews and chart SVG into text. Every
piece of data goes through `html.escape` (text and attributes alike); the filter data is
JSON in a `<script type="application/json">` block with `<`, `>` and `&` written as
`\\u003c`-style escapes, so no value can close the block. The Content-Security-Policy
(`static.CSP`) comes first in `<head>`, right after the charset.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ernie_batch.location import Location
from ernie_batch.review.charts import percentile
from ernie_batch.review.gather import Card, Selection
from ernie_batch.review.static import CSP, SCRIPT, STYLE
from ernie_batch.review.thumbs import Preview
from ernie_batch.vocab import EvidenceStatus, PreviewCheck, UnitStatus


def esc(value: object) -> str:
    """Text for HTML, inside elements and quoted attributes alike."""
    return html.escape(str(value), quote=True)


def json_island(value: Any) -> str:
    """JSON that cannot end its `<script>` block or start a comment inside it."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True, slots=True)
class Part:
    """Where one file of a (perhaps split) review stands among the others."""

    number: int  # 1-based
    names: tuple[str, ...]  # every part's file name, for the links between them


def render(sel: Selection, cards: Sequence[tuple[Card, Preview]], charts: Sequence[str],
           part: Part, title: str, subtitle: str) -> str:
    """One part of the review: the selection's totals and charts, this part's cards."""
    data = {"cards": [_card_data(i, c) for i, (c, _) in enumerate(cards)]}
    body = "\n".join(_card(i, c, p) for i, (c, p) in enumerate(cards))
    parts = _parts_nav(part)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{STYLE}</style></head>
<body>
<header><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>
{_totals(sel)}
<div class="charts">{"".join(f"<figure>{svg}</figure>" for svg in charts)}</div>
</header>
{_filters(sel, [c for c, _ in cards])}
{parts}
<main id="cards">
{body}
</main>
{parts}
<div id="lightbox" hidden><img id="lightbox-img" alt=""><p id="lightbox-caption"></p></div>
<script type="application/json" id="review-data">{json_island(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def _card_data(i: int, c: Card) -> dict[str, Any]:
    return {"i": i, "status": c.row.status, "folder": c.folder, "empty": list(c.empty),
            "conflicts": list(c.conflicts), "credits": c.row.credits, "latency": c.row.latency_s,
            "unverified": c.unverified}


def _totals(sel: Selection) -> str:
    t = sel.totals
    failed = sum(n for s, n in t.statuses.items() if s not in (UnitStatus.OK, UnitStatus.SKIPPED,
                                                               UnitStatus.DUPLICATE))
    lat = sorted(t.latencies)
    items = [("pages", f"{t.pages:,}"), ("ok", f"{t.statuses.get(UnitStatus.OK, 0):,}"),
             ("failed", f"{failed:,}"), ("requests", f"{t.requests:,}"),
             ("credits", f"{t.credits:,.2f}"), ("USD", f"{t.usd:.6f}"),
             ("runs", f"{len(t.runs):,}")]
    if lat:
        items.append(("latency p50 / p95", f"{percentile(lat, 50):.2f} / {percentile(lat, 95):.2f} s"))
    lis = "".join(f"<li><b>{esc(v)}</b>{esc(k)}</li>" for k, v in items)
    return f'<ul class="totals">{lis}</ul>'


def _options(values: list[tuple[str, str]], first: tuple[str, str]) -> str:
    opts = [first, *values]
    return "".join(f'<option value="{esc(v)}">{esc(label)}</option>' for v, label in opts)


def _filters(sel: Selection, cards: list[Card]) -> str:
    statuses: dict[str, int] = {}
    folders: dict[str, int] = {}
    empties: dict[str, int] = {}
    for c in cards:
        statuses[c.row.status] = statuses.get(c.row.status, 0) + 1
        folders[c.folder] = folders.get(c.folder, 0) + 1
        for name in c.empty:
            empties[name] = empties.get(name, 0) + 1
    any_empty = sum(1 for c in cards if c.empty)
    status = _options([(s, f"{s} ({n})") for s, n in sorted(statuses.items())], ("", "all"))
    empty = _options([("*", f"any ({any_empty})"),
                      *((f, f"{f} ({empties[f]})") for f in sel.fields if f in empties)],
                     ("", "any or none"))
    folder = _options([(f, f"{f} ({n})") for f, n in sorted(folders.items())], ("", "all"))
    sort = _options([("credits-desc", "cost, highest first"), ("credits-asc", "cost, lowest first"),
                     ("latency-desc", "latency, slowest first"),
                     ("latency-asc", "latency, fastest first")], ("odd", "odd ones first"))
    unverified = ""
    if any(c.evidence for c in cards):
        n = sum(1 for c in cards if c.unverified)
        unverified = (f'<label><input type="checkbox" id="f-unverified"> unverified fields only '
                      f"({n})</label>")
    conflicts = ""
    if sel.documents_table:
        n = sum(1 for c in cards if c.conflicts)
        conflicts = (f'<label><input type="checkbox" id="f-conflicts"> conflicting fields only '
                     f"({n})</label>")
    return (f'<nav class="filters" aria-label="filters">'
            f'<label>Status <select id="f-status">{status}</select></label>'
            f'<label>Empty field <select id="f-empty">{empty}</select></label>'
            f'<label>Folder <select id="f-folder">{folder}</select></label>{conflicts}'
            f"{unverified}"
            f'<label>Sort <select id="f-sort">{sort}</select></label>'
            f'<span id="shown" role="status">{len(cards)} of {len(cards)} pages shown</span></nav>')


def _parts_nav(part: Part) -> str:
    if len(part.names) < 2:
        return ""
    links = [f"<strong>part {n}</strong>" if n == part.number else
             f'<a href="{esc(name)}">part {n}</a>' for n, name in enumerate(part.names, 1)]
    return f'<nav class="parts" aria-label="parts">{"".join(links)}</nav>'


def _pages(c: Card) -> str:
    r = c.row
    pages = f"page {r.page}" if r.page == r.page_last else f"pages {r.page}–{r.page_last}"
    return pages + (f" of {r.page_count}" if r.page_count else "")


def _media(c: Card, p: Preview) -> str:
    name = Location.parse(c.row.source_path).name
    if p.image is None:
        return f'<div class="ph">{esc(p.note)}</div>'
    b64 = base64.b64encode(p.image).decode("ascii")
    alt = f"{name}, {_pages(c)}"
    check = ""
    if p.check is PreviewCheck.DIFFERS:
        check = f'<p class="check differs">{esc(p.note)}</p>'
    elif p.check is PreviewCheck.MATCH:
        check = '<p class="check match">✓ the media sent, re-created from its source</p>'
    return (f'<button type="button" class="zoom" aria-label="larger: {esc(alt)}">'
            f'<img class="thumb" src="data:{esc(p.mime)};base64,{b64}" alt="{esc(alt)}" '
            f'loading="lazy" decoding="async">{_boxes(c)}</button>{check}')


def _boxes(c: Card) -> str:
    """The verified fields' boxes over the thumbnail (the unit's first page), as an SVG drawn
    in the page's 0-1 coordinates: no image is re-encoded."""
    rects = []
    for path, e in c.evidence.items():
        box = e.get("box")
        if (e.get("status") != EvidenceStatus.VERIFIED or e.get("page") != c.row.page
                or not isinstance(box, list) or len(box) != 4):
            continue
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            continue
        rects.append(f'<rect x="{x0:.4f}" y="{y0:.4f}" width="{max(x1 - x0, 0.002):.4f}" '
                     f'height="{max(y1 - y0, 0.002):.4f}" data-field="{esc(path)}">'
                     f"<title>{esc(path)}</title></rect>")
    if not rects:
        return ""
    return ('<svg class="boxes" viewBox="0 0 1 1" preserveAspectRatio="none" aria-hidden="true">'
            + "".join(rects) + "</svg>")


def _fields(c: Card) -> str:
    if not c.fields:
        return ""
    rows = []
    for name, value in c.fields:
        status, entries = c.field_evidence(name)
        ok = status in (EvidenceStatus.VERIFIED, EvidenceStatus.NOT_CHECKED)
        cls = " ".join(x for x in ("empty" if value is None else "",
                                    "conflict" if name in c.conflicts else "",
                                    "" if status is None else "ev-ok" if ok else "ev-no") if x)
        text = "(empty)" if value is None else value
        rows.append(f'<tr class="{cls}"><th>{esc(name)}</th><td>{esc(text)}'
                    f"{_evidence(status, entries)}</td></tr>")
    return f'<table class="fields">{"".join(rows)}</table>'


def _badge(status: str) -> str:
    return f'<span class="ev-badge ev-{esc(status)}">{esc(status.replace("_", " "))}</span>'


def _evidence(status: str | None, entries: list[tuple[str, dict[str, Any]]]) -> str:
    """A field's badge and quote; a field of several leaves lists each of them."""
    if status is None:
        return ""
    if len(entries) == 1:
        quote = entries[0][1].get("quote")
        shown = f' <q class="quote">{esc(quote)}</q>' if quote else ""
        return f'<div class="ev">{_badge(status)}{shown}</div>'
    items = "".join(
        f'<li>{_badge(str(e.get("status")))} <code>{esc(p)}</code>'
        + (f' <q class="quote">{esc(e["quote"])}</q>' if e.get("quote") else "") + "</li>"
        for p, e in entries)
    checked = [e for _, e in entries if e.get("status") != EvidenceStatus.NOT_CHECKED]
    verified = sum(e.get("status") == EvidenceStatus.VERIFIED for e in checked)
    return (f'<details class="ev"><summary>{_badge(status)} {verified} of {len(checked)} '
            f"verified</summary><ul>{items}</ul></details>")


def _card(i: int, c: Card, p: Preview) -> str:
    r = c.row
    status = esc(r.status)
    parts = [f'<h2><span class="path">{esc(r.source_path)}</span> · {esc(_pages(c))} '
             f'<span class="badge st-{status}">{status}</span></h2>']
    if r.error:
        parts.append(f'<p class="error">{esc(r.error)}</p>')
    if r.duplicate_of_path:
        parts.append(f'<p class="meta">same content as {esc(r.duplicate_of_path)}</p>')
    if c.conflicts:
        parts.append(f'<p class="error">conflicting across the document: '
                     f'{esc(", ".join(c.conflicts))}</p>')
    parts.append(_fields(c))
    if c.raw_answer:
        parts.append(f"<details><summary>raw answer</summary><pre>{esc(c.raw_answer)}</pre>"
                     "</details>")
    outcomes = f" ({', '.join(c.outcomes)})" if c.outcomes else ""
    latency = f"{r.latency_s:.2f} s" if r.latency_s is not None else "–"
    parts.append(f'<p class="meta">attempts {r.attempts}{esc(outcomes)} · '
                 f"{r.credits:,.2f} credits · {r.usd:.6f} USD · latency {latency} · "
                 f"run {esc(r.run_id)} · prompt {esc((r.fingerprint or '')[:12])}</p>")
    return (f'<article class="card st-{status}" data-i="{i}" id="card-{i}">'
            f'<div class="media">{_media(c, p)}</div><div class="body">{"".join(parts)}</div>'
            "</article>")
