"""A document's evidence (`documents.evidence_json`): each merged field's evidence taken from the
page its value came from, by the merge's provenance.

Rules that pick one page's value (`first`, `last`, `min`, `max`, `all`) take that page's
entries for the field; `concat` and `unique` renumber each item's entries (`line_items[0]` of
page 2 may become `line_items[3]` of the document); a `sum` stands on no page: `not_checked`.
Each entry keeps its `page`, so its box is read on the right page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ernie_batch.answers.merge import MergedAnswer, PageRef
from ernie_batch.vocab import EvidenceStatus, MergeRule

Entries = dict[str, dict[str, Any]]  # field path -> {"quote", "span", "status", "box", "page"}
# a field's leaves that are not all verified: the first of these statuses they show names it
_WORST_FIRST = (EvidenceStatus.VALUE_NOT_IN_QUOTE, EvidenceStatus.QUOTE_NOT_ON_PAGE,
                EvidenceStatus.NO_QUOTE, EvidenceStatus.NO_TEXT_LAYER)


def _under(entries: Entries, prefix: str) -> Entries:
    """The entries of a field (`total`, `total.x`, `total[2]`), by path."""
    return {p: e for p, e in entries.items()
            if p == prefix or p.startswith(prefix + ".") or p.startswith(prefix + "[")}


def _renumbered(entries: Entries, name: str, old: int, new: int) -> Entries:
    head = re.compile(rf"^{re.escape(name)}\[{old}\]")
    return {head.sub(f"{name}[{new}]", p): e for p, e in _under(entries, f"{name}[{old}]").items()}


def merged_evidence(merged: MergedAnswer, rules: Mapping[str, MergeRule],
                    pages: Mapping[PageRef, Entries]) -> Entries | None:
    """The document's entries from its pages' (page ref -> entries); None when no page has any."""
    if not pages:
        return None
    out: Entries = {}
    for name, rule in rules.items():
        refs = merged.provenance.get(name) or []
        if rule in (MergeRule.CONCAT, MergeRule.UNIQUE):
            for i, (ref, j) in enumerate(zip(refs, merged.items.get(name, []), strict=False)):
                out |= _renumbered(pages.get(ref, {}), name, j, i)
        elif rule == MergeRule.SUM:
            if merged.answer.get(name) is not None:
                out[name] = {"quote": None, "span": None, "box": None, "page": None,
                             "status": str(EvidenceStatus.NOT_CHECKED)}
        elif refs:
            out |= _under(pages.get(refs[0], {}), name)
    return out


def page_entries(evidence_json: str | None) -> Entries | None:
    """A page row's `evidence_json`, None when it has none (or it cannot be read)."""
    if not evidence_json:
        return None
    try:
        value = json.loads(evidence_json)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def field_status(evidence: Mapping[str, Mapping[str, Any]], name: str) -> str:
    """One status for a top-level field from its leaves' entries: `verified` when every
    checked leaf is, `not_checked` when none is checked, else the worst status among them."""
    statuses = {str(e.get("status")) for e in _under(dict(evidence), name).values()}
    statuses.discard(EvidenceStatus.NOT_CHECKED)
    if not statuses:
        return EvidenceStatus.NOT_CHECKED
    if statuses == {EvidenceStatus.VERIFIED}:
        return EvidenceStatus.VERIFIED
    return next((s for s in _WORST_FIRST if s in statuses), sorted(statuses)[0])
