"""The `documents` table: every document a run touched, its page answers merged into one row.

Pages stay the unit of work; documents are derived. At the end of a run (after its pages
are committed, before its manifest) each (content, fingerprint) with a page row in the run
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
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.answers.judge import answer_columns
from ernie_batch.answers.merge import PagePart, merge
from ernie_batch.answers.merged_evidence import merged_evidence, page_entries
from ernie_batch.intake.units import DOC_TYPES
from ernie_batch.location import OutputRoot
from ernie_batch.store import TableWriter, app_id, newest_per_key, read_columns, sum_exact
from ernie_batch.store.records import DocumentRow, answer_fields_of, documents_schema
from ernie_batch.vocab import FAILED, MergeRule, RunOutcome, UnitStatus

if TYPE_CHECKING:
    from ernie_batch.config import JobConfig

Touched = set[tuple[str, str]]  # (source_sha256, fingerprint)

PAGE_COLUMNS = ["run_id", "key", "fingerprint", "source_path", "source_sha256", "doc_type",
                "page", "page_last", "page_count", "status", "answer_json", "finished_at",
                "evidence_json"]


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


def build_documents(root: OutputRoot, touched: Touched, spec: DocumentSpec, *, run_id: str, date: str,
                    version: int = 1, fresh: Collection[str] = ()) -> Built:
    """Build and commit (once: as `version` of the run's documents transaction) a new
    generation of the touched documents' rows. `fresh`: content whose page rows are all
    the run's own (see `document_rows`)."""
    rows = document_rows(root, touched, spec, run_id, datetime.now(UTC), fresh)
    writer = TableWriter(root, "documents", documents_schema(spec.answer_fields), date,
                         app=app_id(run_id, "documents"))
    for row in rows:
        writer.add(row.as_dict())
    writer.flush(version)
    return Built(len(rows), sum(r.complete for r in rows))


def document_rows(root: OutputRoot, touched: Touched, spec: DocumentSpec, run_id: str,
                  built_at: datetime, fresh: Collection[str] = ()) -> list[DocumentRow]:
    """The touched documents' rows, from their page rows and their units' attempts.

    Content in `fresh` (the run's done-index read no earlier row of it) has page rows of
    this run only: they are read with the run's id, which the tables' statistics answer
    with the run's own files; other content's rows are looked up in every file. So are
    its units' attempts, but for those of runs that ended `interrupted`: only such a run
    (killed, or stopped with a unit between two attempts) leaves an attempt without its
    unit's page row.
    """
    if not touched:
        return []
    new = {sha for sha, _ in touched} & set(fresh)
    fps = pc.field("fingerprint").isin(pa.array(sorted({fp for _, fp in touched}), pa.string()))
    parts = [read_columns(root, "pages", PAGE_COLUMNS, where=fps & pc.field("source_sha256").isin(
        pa.array(sorted(shas), pa.string())) & mine)
        for shas, mine in (({sha for sha, _ in touched} - new, pc.scalar(True)),
                           (new, pc.field("run_id") == run_id)) if shas]
    found = [p for p in parts if p is not None]
    if not found:
        return []
    by_doc: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in pa.concat_tables(found).to_pylist():
        # a file of no supported type is no document: its skipped row says so in `pages`
        if (row["source_sha256"], row["fingerprint"]) in touched and row["doc_type"] in DOC_TYPES:
            by_doc[(row["source_sha256"], row["fingerprint"])].append(row)
    money = _attempt_money(root, {r["key"] for (sha, _), rows in by_doc.items() for r in rows
                                  if sha not in new},
                           {r["key"] for (sha, _), rows in by_doc.items() for r in rows
                            if sha in new}, run_id)
    out = []
    for (sha, fp), rows in sorted(by_doc.items()):
        paid = [m for k in {r["key"] for r in rows} for m in money.get(k, ())]
        credits, usd = sum_exact(c for c, _ in paid), sum_exact(u for _, u in paid)
        out.append(assemble(sha, fp, rows, spec, run_id=run_id, built_at=built_at,
                            credits=credits, usd=usd))
    return out


def _attempt_money(root: OutputRoot, keys: set[str], fresh: set[str],
                   run_id: str) -> dict[str, list[tuple[float, float]]]:
    """(credits, usd) of every attempt of these unit keys, every run, by key; of the `fresh`
    keys' attempts only the run's own and interrupted runs' can exist (`document_rows`)."""
    def of(wanted: set[str]) -> pc.Expression:
        return pc.field("key").isin(pa.array(sorted(wanted), pa.string()))

    wheres = [of(keys)] if keys else []
    if fresh:
        runs = [run_id, *interrupted_runs(root)]
        wheres.append(of(fresh) & pc.field("run_id").isin(pa.array(runs, pa.string())))
    money: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for where in wheres:
        table = read_columns(root, "attempts", ["key", "credits", "usd"], where=where)
        if table is not None:
            for key, credits, usd in zip(*(table[c].to_pylist()
                                           for c in ("key", "credits", "usd")), strict=True):
                money[key].append((credits, usd))
    return money


def interrupted_runs(root: OutputRoot) -> list[str]:
    """The runs whose `runs` row says `interrupted` (rejected ones too)."""
    table = read_columns(root, "runs", ["run_id"], pc.field("outcome") == RunOutcome.INTERRUPTED,
                         include_rejected=True)
    return [] if table is None else table["run_id"].to_pylist()


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
    evidence = {part.ref: entries for part, row in zip(parts, newest_ok.values(), strict=True)
                if (entries := page_entries(row.get("evidence_json"))) is not None}
    doc_evidence = merged_evidence(merged, spec.rules, evidence) if merged else None
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
        evidence_json=_json(doc_evidence) if doc_evidence is not None else None,
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


def _rows_of(root: OutputRoot, run_ids: list[str] | None) -> pa.Table | None:
    """The selected runs' rows, less those older runs built of files of no supported type."""
    where = pc.field("doc_type").is_null() | (pc.field("doc_type") != "unknown")
    if run_ids is not None:
        where &= pc.field("run_id").isin(pa.array(run_ids, pa.string()))
    return read_columns(root, "documents", COUNT_COLUMNS, where=where)


def documents_of_runs(root: OutputRoot, run_ids: list[str] | None) -> pa.Table | None:
    """The documents rows the runs wrote (all runs: None), the newest per key among them."""
    table = _rows_of(root, run_ids)
    return None if table is None or table.num_rows == 0 else newest_per_key(table)


def counts_by_run(root: OutputRoot, run_ids: list[str] | None) -> list[dict[str, Any]]:
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
