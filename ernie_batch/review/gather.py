"""The review's rows: the selected pages read from Parquet as cards, with totals for the header.

Only plain values leave this module (`Card`, `Totals`): the HTML and the charts never read
Parquet themselves. Everything in a card came from a document and is untrusted: it is kept
as text here and escaped where it is written (`review.page`).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch import store
from ernie_batch.answers.merged_evidence import field_status, page_entries
from ernie_batch.location import Location, OutputRoot
from ernie_batch.store import PageRow
from ernie_batch.vocab import FAILED, EvidenceStatus, UnitStatus

_ROW_FIELDS = [f.name for f in fields(PageRow) if f.name != "answers"]
_ZERO_WHEN_NULL = ("attempts", "prompt_tokens", "completion_tokens", "credits", "usd")
PAGE_COLUMNS = [*_ROW_FIELDS, "date"]  # no answer_<field> columns: answer_json has them
RAW_LIMIT = 4000  # characters of a raw answer shown on a card (the rest is in Parquet)


@dataclass(frozen=True, slots=True)
class Card:
    """One page of the review: its `pages` row, the answer's fields, its attempts' outcomes."""

    row: PageRow  # answer columns left out: `fields` has the answer, from answer_json
    fields: tuple[tuple[str, str | None], ...]  # (name, value as text; None when empty)
    outcomes: tuple[str, ...] = ()  # each attempt's outcome, in order
    conflicts: tuple[str, ...] = ()  # fields the documents table says disagree across pages
    date: str = ""  # the run's partition date
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> entry

    def field_evidence(self, name: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
        """A top-level field's one status (None: no evidence) and its leaves' entries."""
        entries = [(p, e) for p, e in self.evidence.items()
                   if p == name or p.startswith((name + ".", name + "["))]
        return (field_status(self.evidence, name) if entries else None), entries

    @property
    def unverified(self) -> int:
        """Checked fields whose value the page's text does not back."""
        return sum(e.get("status") not in (EvidenceStatus.VERIFIED, EvidenceStatus.NOT_CHECKED)
                   for e in self.evidence.values())

    @property
    def folder(self) -> str:
        return str(Location.parse(self.row.source_path).parent)

    @property
    def empty(self) -> tuple[str, ...]:
        return tuple(name for name, value in self.fields if value is None)

    @property
    def raw_answer(self) -> str | None:
        """The model's text, for a page without a valid answer (cut at RAW_LIMIT)."""
        raw = self.row.raw_answer
        return raw[:RAW_LIMIT] if raw and self.row.answer_json is None else None

    @property
    def rank(self) -> int:
        """The odd ones first: failures, conflicts, empty fields, then ok, then not sent."""
        if self.row.status in FAILED:
            return 0
        if self.conflicts:
            return 1
        if self.empty:
            return 2
        return 3 if self.row.status == UnitStatus.OK else 4


@dataclass(slots=True)
class Totals:
    """The selection at a glance: the header's figures and the charts' data."""

    pages: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    credits: float = 0.0
    usd: float = 0.0
    credits_by: dict[str, float] = field(default_factory=dict)  # per run, or per day
    credits_by_what: str = "run"
    latencies: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Selection:
    cards: list[Card]
    totals: Totals
    fields: list[str]  # every answer field seen, schema order first
    documents_table: bool  # the documents table exists: the conflicts filter is shown


def gather(root: OutputRoot, run_ids: list[str], statuses: list[str] | None = None,
           schema_fields: list[str] | None = None, current_fingerprint: str | None = None,
           max_runs_in_chart: int = 20) -> Selection:
    """The cards of the selected runs' pages (optionally only some statuses), odd ones first.

    `schema_fields` (the config's schema properties) count as fields of pages answered
    under `current_fingerprint`, so a field the model left out shows as empty.
    """
    table = store.read_columns(root, "pages", PAGE_COLUMNS)
    if table is None or table.num_rows == 0:
        return Selection([], Totals(), [], _conflicts(root) is not None)
    table = table.filter(pc.is_in(table["run_id"], pa.array(run_ids, pa.string())))
    if statuses:
        table = table.filter(pc.is_in(table["status"], pa.array(statuses, pa.string())))
    outcomes = _outcomes(root, run_ids)
    conflicts = _conflicts(root)
    names = list(schema_fields or [])
    cards = []
    for row in table.to_pylist():
        expected = names if row.get("fingerprint") == current_fingerprint else []
        card = make_card(row, expected, outcomes.get((row["run_id"], row["key"]), ()),
                         (conflicts or {}).get((row.get("source_sha256"), row.get("fingerprint")),
                                               ()))
        cards.append(card)
        names += [n for n, _ in card.fields if n not in names]
    cards.sort(key=lambda c: (c.rank, c.row.source_path, c.row.page, c.row.run_id))
    return Selection(cards, totals(cards, max_runs_in_chart), names, conflicts is not None)


def make_card(row: dict[str, Any], expected: list[str], outcomes: tuple[str, ...],
              conflicts: tuple[str, ...]) -> Card:
    """A card from one `pages` row (a dict); columns missing from old parts read as None."""
    answer = _answer(row.get("answer_json"))
    started = row.get("started_at")
    values = {name: row.get(name) for name in _ROW_FIELDS}
    values.update({name: values[name] or 0 for name in _ZERO_WHEN_NULL})
    values["page"] = values["page"] or 1
    values["page_last"] = values["page_last"] or values["page"]
    return Card(
        row=PageRow(**values),
        fields=_fields(answer, expected) if answer is not None else (),
        outcomes=outcomes, conflicts=conflicts,
        date=str(row.get("date") or (f"{started:%Y-%m-%d}" if isinstance(started, datetime)
                                     else "")),
        evidence=page_entries(row.get("evidence_json")) or {},
    )


def _answer(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else {"value": value}


def _fields(answer: dict[str, Any], expected: list[str]) -> tuple[tuple[str, str | None], ...]:
    names = [*expected, *(k for k in answer if k not in expected)]
    return tuple((name, display(answer.get(name))) for name in names)


def display(value: Any) -> str | None:
    """A field's value as text; None when it is empty (null, "", [] or {})."""
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def totals(cards: list[Card], max_runs_in_chart: int = 20) -> Totals:
    """Counts, exact money sums (`math.fsum`) and the charts' series of a set of cards."""
    rows = [c.row for c in cards]
    t = Totals(pages=len(rows), statuses=Counter(r.status for r in rows),
               requests=sum(r.attempts for r in rows),
               credits=math.fsum(r.credits for r in rows), usd=math.fsum(r.usd for r in rows),
               latencies=[r.latency_s for r in rows if r.latency_s is not None],
               runs=sorted({r.run_id for r in rows}))
    by_run = len(t.runs) <= max_runs_in_chart
    t.credits_by_what = "run" if by_run else "day"
    groups: dict[str, list[float]] = defaultdict(list)
    for c in cards:
        groups[c.row.run_id if by_run else c.date].append(c.row.credits)
    t.credits_by = {k: math.fsum(v) for k, v in sorted(groups.items())}
    return t


def _outcomes(root: OutputRoot, run_ids: list[str]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(run_id, key) -> the outcomes of its attempts, in order."""
    table = store.read_columns(root, "attempts", ["run_id", "key", "attempt", "outcome"])
    if table is None or table.num_rows == 0:
        return {}
    table = table.filter(pc.is_in(table["run_id"], pa.array(run_ids, pa.string())))
    found: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for row in table.to_pylist():
        found[(row["run_id"], row["key"])].append((row["attempt"] or 0, row["outcome"] or ""))
    return {k: tuple(o for _, o in sorted(v)) for k, v in found.items()}


def _conflicts(root: OutputRoot) -> dict[tuple[str, str], tuple[str, ...]] | None:
    """(source_sha256, fingerprint) -> conflicting field names, from the newest `documents`
    row of each key; None when there is no documents table (the filter is then hidden).

    Read defensively: the table is another command's, and any row it cannot make sense of
    counts as no conflict.
    """
    try:
        table = store.read_table(root, "documents")
    except (OSError, pa.ArrowException):
        return None
    if table is None:
        return None
    wanted = {"key", "source_sha256", "fingerprint", "conflicts_json"}
    if not wanted <= set(table.column_names):
        return {}
    cols = [c for c in (*wanted, "built_at") if c in table.column_names]
    newest: dict[str, dict[str, Any]] = {}
    for row in table.select(cols).to_pylist():
        old = newest.get(row["key"])
        if old is None or _later(row.get("built_at"), old.get("built_at")):
            newest[row["key"]] = row
    return {(r["source_sha256"], r["fingerprint"]): conflict_fields(r["conflicts_json"])
            for r in newest.values()}


def _later(a: Any, b: Any) -> bool:
    try:
        return a is not None and (b is None or a >= b)
    except TypeError:
        return True


def conflict_fields(text: str | None) -> tuple[str, ...]:
    """Field names of a `conflicts_json`: an object keyed by field, or a list of names or of
    objects with a "field"; anything else is no conflict."""
    try:
        value = json.loads(text) if text else None
    except (TypeError, ValueError):
        return ()
    if isinstance(value, dict):
        return tuple(str(k) for k in value)
    if isinstance(value, list):
        names = [v if isinstance(v, str) else v.get("field") if isinstance(v, dict) else None
                 for v in value]
        return tuple(dict.fromkeys(str(n) for n in names if n))
    return ()
