"""The `documents` table: every document a run touched, its page answers merged into one row.

Pages stay the unit of work; documents are derived. At the end of a run (after its pages
are in Parquet, before its manifest) each (content, fingerprint) with a page row in the run
is rebuilt from all `ok` rows of that content and fingerprint, earlier runs' included
(the newest row per unit), read with filters on the touched content hashes only. Its
credits are those of every attempt of its units, every run. Each build is a new generation:
`store.read_table(OUTPUT, "documents", current=True)` gives the newest row per key. Rows of
shard runs their coordinator rejected (`store.fencing`) count in none of this: the readers
leave them out.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.answers import answer_columns
from ernie_batch.merge import PagePart, merge
from ernie_batch.store import TableWriter, newest_per_key, read_columns, sum_exact
from ernie_batch.store.records import DocumentRow, answer_fields_of, documents_schema
from ernie_batch.vocab import FAILED, MergeRule, UnitStatus

if TYPE_CHECKING:
    from ernie_batch.config import JobConfig

Touched = set[tuple[str, str]]  # (source_sha256, fingerprint)

PAGE_COLUMNS = ["run_id", "key", "fingerprint", "source_path", "source_sha256", "doc_type",
                "page", "page_last", "page_count", "status", "answer_json", "finished_at"]


@dataclass(frozen=True)
class DocumentSpec:
    """What a build needs of the job: the merge rules, the answer columns, the page range."""

    rules: Mapping[str, MergeRule]
    answer_fields: list[pa.Field]
    first_page: int = 1
    last_page: int | None = None

    @classmethod
    def of_config(cls, cfg: JobConfig, answer_fields: list[pa.Field]) -> DocumentSpec:
        return cls(cfg.resolved.merge_rules, answer_fields, cfg.pdf.first_page,
                   cfg.pdf.last_page)

    def header(self) -> dict[str, Any]:
        """For the journal header: the run that folds a killed run's journal builds with it."""
        return {"merge": {k: str(v) for k, v in self.rules.items()},
                "first_page": self.first_page, "last_page": self.last_page}

    @classmethod
    def from_header(cls, header: Mapping[str, Any] | None, pages_schema: pa.Schema) -> DocumentSpec:
        """The spec a journal recorded; a journal from before documents: default rules."""
        fields = answer_fields_of(pages_schema)
        if header is None:
            rules = {f.name.removeprefix("answer_"): MergeRule.CONCAT
                     if pa.types.is_list(f.type) else MergeRule.FIRST for f in fields}
            return cls(rules, fields)
        rules = {k: MergeRule(v) for k, v in header["merge"].items()}
        return cls(rules, fields, header.get("first_page", 1), header.get("last_page"))


@dataclass(frozen=True, slots=True)
class Built:
    """What one build wrote."""

    documents: int = 0
    complete: int = 0


def document_key(source_sha256: str, fingerprint: str) -> str:
    return hashlib.sha256(f"{source_sha256}:{fingerprint}".encode()).hexdigest()


def build_documents(root: Path, touched: Touched, spec: DocumentSpec, *, run_id: str, date: str,
                    prefix: str = "part") -> Built:
    """Build and write (one part) a new generation of the touched documents' rows."""
    rows = document_rows(root, touched, spec, run_id, datetime.now(UTC))
    writer = TableWriter(root, "documents", documents_schema(spec.answer_fields), run_id, date,
                         prefix)
    for row in rows:
        writer.add(row.as_dict())
    writer.flush()
    return Built(len(rows), sum(r.complete for r in rows))


def document_rows(root: Path, touched: Touched, spec: DocumentSpec, run_id: str,
                  built_at: datetime) -> list[DocumentRow]:
    """The touched documents' rows, from their page rows and their units' attempts."""
    if not touched:
        return []
    shas = pa.array(sorted({sha for sha, _ in touched}), pa.string())
    fps = pa.array(sorted({fp for _, fp in touched}), pa.string())
    pages = read_columns(root, "pages", PAGE_COLUMNS, where=(
        pc.field("source_sha256").isin(shas) & pc.field("fingerprint").isin(fps)))
    if pages is None:
        return []
    by_doc: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in pages.to_pylist():
        if (row["source_sha256"], row["fingerprint"]) in touched:
            by_doc[(row["source_sha256"], row["fingerprint"])].append(row)
    money = _attempt_money(root, {r["key"] for rows in by_doc.values() for r in rows})
    out = []
    for (sha, fp), rows in sorted(by_doc.items()):
        paid = [m for k in {r["key"] for r in rows} for m in money.get(k, ())]
        credits, usd = sum_exact(c for c, _ in paid), sum_exact(u for _, u in paid)
        out.append(assemble(sha, fp, rows, spec, run_id=run_id, built_at=built_at,
                            credits=credits, usd=usd))
    return out


def _attempt_money(root: Path, keys: set[str]) -> dict[str, list[tuple[float, float]]]:
    """(credits, usd) of every attempt of these unit keys, every run, by key."""
    money: dict[str, list[tuple[float, float]]] = defaultdict(list)
    table = read_columns(root, "attempts", ["key", "credits", "usd"],
                         where=pc.field("key").isin(pa.array(sorted(keys), pa.string())))
    if table is not None:
        for key, credits, usd in zip(*(table[c].to_pylist() for c in ("key", "credits", "usd")),
                                     strict=True):
            money[key].append((credits, usd))
    return money


def assemble(sha: str, fp: str, rows: Iterable[Mapping[str, Any]], spec: DocumentSpec, *,
             run_id: str, built_at: datetime, credits: float, usd: float) -> DocumentRow:
    """One document's row from all its page rows (any status, any run) of one fingerprint."""
    rows = list(rows)
    newest_ok: dict[tuple[int, int], Mapping[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r["finished_at"], r["run_id"])):
        if row["status"] == UnitStatus.OK and row["answer_json"] is not None:
            newest_ok[(row["page"], row["page_last"])] = row
    parts = [PagePart(page, last, json.loads(row["answer_json"]))
             for (page, last), row in newest_ok.items()]
    counts = [r["page_count"] for r in rows if r["page_count"] is not None]
    page_count = max(counts) if counts else None
    doc_type = next((r["doc_type"] for r in rows if r["doc_type"]), None)
    expected = expected_pages(doc_type, page_count, rows, spec)
    ok = {p for page, last in newest_ok for p in range(page, last + 1)} & expected
    failed = {p for r in rows if r["status"] in FAILED
              for p in range(r["page"], r["page_last"] + 1)}
    missing = expected - ok
    merged = merge(parts, spec.rules) if parts else None
    return DocumentRow(
        run_id=run_id, key=document_key(sha, fp), fingerprint=fp, source_sha256=sha,
        source_paths=sorted({r["source_path"] for r in rows}), doc_type=doc_type,
        page_count=page_count, pages_ok=len(ok), pages_failed=len(missing & failed),
        pages_missing=len(missing), complete=bool(ok) and not missing,
        answer_json=_json(merged.answer) if merged else None,
        answers=answer_columns(merged.answer if merged else None, spec.answer_fields),
        provenance_json=_json(merged.provenance if merged else {}),
        conflicts_json=_json(merged.conflicts) if merged and merged.conflicts else None,
        credits=credits, usd=usd, built_at=built_at,
    )


def expected_pages(doc_type: str | None, page_count: int | None,
                   rows: Iterable[Mapping[str, Any]], spec: DocumentSpec) -> set[int]:
    """The pages a complete document has answered: the configured range of a PDF
    (`pdf.first_page`, `pdf.last_page`), every frame sent of an image; when the page count is
    unknown (the file could not be read), the pages its rows name."""
    if page_count is None:
        return {p for r in rows for p in range(r["page"], r["page_last"] + 1)}
    if doc_type != "pdf":
        return set(range(1, page_count + 1))
    last = min(page_count, spec.last_page or page_count)
    return set(range(spec.first_page, last + 1))


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class DocumentCounts:
    """Documents rows by state: every page answered or not, and whether pages disagreed."""

    documents: int = 0
    complete: int = 0
    incomplete: int = 0
    conflicting: int = 0  # a field whose rule is `all` got different values from its pages

    @classmethod
    def of(cls, table: pa.Table) -> DocumentCounts:
        return cls.of_rows(zip(table["complete"].to_pylist(),
                               table["conflicts_json"].to_pylist(), strict=True))

    @classmethod
    def of_rows(cls, rows: Iterable[tuple[bool | None, str | None]]) -> DocumentCounts:
        """From (complete, conflicts_json) pairs."""
        rows = list(rows)
        complete = sum(bool(c) for c, _ in rows)
        conflicting = sum(x is not None for _, x in rows)
        return cls(len(rows), complete, len(rows) - complete, conflicting)


COUNT_COLUMNS = ["run_id", "key", "built_at", "source_paths", "complete", "pages_missing",
                 "conflicts_json"]


def _rows_of(root: Path, run_ids: list[str] | None) -> pa.Table | None:
    where = None if run_ids is None else pc.field("run_id").isin(pa.array(run_ids, pa.string()))
    return read_columns(root, "documents", COUNT_COLUMNS, where=where)


def documents_of_runs(root: Path, run_ids: list[str] | None) -> pa.Table | None:
    """The documents rows the runs wrote (all runs: None), the newest per key among them."""
    table = _rows_of(root, run_ids)
    return None if table is None or table.num_rows == 0 else newest_per_key(table)


def counts_by_run(root: Path, run_ids: list[str] | None) -> list[dict[str, Any]]:
    """Per run: the documents it built, complete, incomplete and conflicting (for `report`)."""
    table = _rows_of(root, run_ids)
    if table is None:
        return []
    by_run: dict[str, list[tuple[bool | None, str | None]]] = defaultdict(list)
    for run_id, complete, conflicts in zip(*(table[c].to_pylist() for c in (
            "run_id", "complete", "conflicts_json")), strict=True):
        by_run[run_id].append((complete, conflicts))  # one pass, not a filter per run
    return [{"run_id": run_id, **asdict(DocumentCounts.of_rows(rows))}
            for run_id, rows in sorted(by_run.items())]
