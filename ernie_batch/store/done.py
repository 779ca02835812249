"""What earlier runs did, and what that means for this run: prepare, send, or skip (and why).

Read from the key columns of `pages` only, only for the fingerprint in play and the content
the run discovered, and kept in Arrow form: a run's start does not grow with the rows of
history it does not touch. The decisions live here, beside the index they read, so the
engine asks one question per document and one per unit. `known_objects` answers discovery's
one question about objects on object storage: which (URL, ETag) pairs were read before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.store.tables import StrPath, read_columns
from ernie_batch.vocab import FINAL_FAILURES, UnitStatus


@dataclass
class DocRecord:
    """What earlier runs recorded for one (file content, fingerprint)."""

    page_count: int | None = None
    units: dict[tuple[int, int], str] = field(default_factory=dict)  # (page, last) -> best status
    paths: set[str] = field(default_factory=set)
    # (page, last) -> (source_path, run_id) of an ok row: where a duplicate's answer is
    answered: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)


class UnitDecision(StrEnum):
    SEND = "send"
    ALREADY_DONE = "already_done"  # answered (or given up on) under this path by an earlier run
    DUPLICATE = "duplicate"  # answered under another path: a duplicate row, no request


@dataclass(frozen=True, slots=True)
class DocumentDecision:
    """Whether a document needs preparing; if not, what its units count as."""

    prepare: bool
    already_done: int = 0
    # (page, page_last, source_path, run_id) of units answered under another path
    duplicates: tuple[tuple[int, int, str, str], ...] = ()
    page_count: int | None = None


DONE_COLUMNS = ["source_sha256", "page", "page_last", "status", "source_path", "page_count",
                "run_id"]


class DoneIndex:
    """What earlier runs recorded for one fingerprint, kept as Arrow tables, not row objects.

    Per unit (content, page, page_last): its best status and the earliest run's ok row; per
    content: its page count and every path it was recorded under. A document's record is
    built only when the engine asks about it. `DoneIndex()` is the empty index (`--force`).
    """

    def __init__(self, fingerprint: str | None = None) -> None:
        self.fingerprint = fingerprint
        # runs whose rows never count as done: a replaced shard run still alive (fenced)
        self.ignored_runs: set[str] = set()
        # sha256 -> (its part, its row in the part's docs, its units' rows [start, stop))
        self._where: dict[str, tuple[_Part, int, int, int]] = {}
        self._seen: dict[str, set[str]] = {}  # paths this run recorded duplicate rows for
        # the record asked for last: the engine asks about a document, then each of its units
        self._last: tuple[str, DocRecord] | None = None

    def add_from(self, root: StrPath, shas: Iterable[str] | None = None) -> None:
        """Index the `pages` rows of the fingerprint and the content `shas` (None: all), content
        not indexed yet. Reads the key columns of those rows, no more: parts whose statistics
        rule out the fingerprint or every sha256 (sorted compacted files) are skipped unread."""
        assert self.fingerprint is not None, "the empty index (--force) reads nothing"
        where = pc.field("fingerprint") == self.fingerprint
        if shas is not None:
            wanted = sorted(set(shas))
            if not wanted:
                return
            where &= pc.field("source_sha256").isin(pa.array(wanted, pa.string()))
        if self.ignored_runs:
            where &= ~pc.field("run_id").isin(pa.array(sorted(self.ignored_runs), pa.string()))
        rows = read_columns(root, "pages", DONE_COLUMNS, where)
        self._last = None
        if rows is not None and rows.num_rows:
            part = _Part.build(rows)
            for sha, (doc, start, stop) in part.rows_by_sha().items():
                self._where[sha] = (part, doc, start, stop)

    def unrecorded(self, shas: Iterable[str]) -> set[str]:
        """Of content this index read rows for (`add_from`), that with no row of its
        fingerprint: every row of it since is the reading run's own."""
        return {sha for sha in shas if sha not in self._where}

    def _record(self, sha: str, fp: str) -> DocRecord | None:
        found = self._where.get(sha) if fp == self.fingerprint else None
        if found is None:
            return None
        if self._last is not None and self._last[0] == sha:
            return self._last[1]
        part, doc, start, stop = found
        rec = DocRecord(page_count=part.docs["page_count"][doc].as_py(),
                        paths=set(part.docs["paths"][doc].as_py()) | self._seen.get(sha, set()))
        units = part.units.slice(start, stop - start).to_pydict()
        for page, last, status, path, run in zip(
                units["page"], units["page_last"], units["status"], units["answer_path"],
                units["answer_run"], strict=True):
            rec.units[(page, last)] = status
            if path is not None:
                rec.answered[(page, last)] = (path, run)
        self._last = (sha, rec)
        return rec

    def status(self, sha: str, fp: str, page: int, last: int) -> str | None:
        """The best status earlier runs recorded for this unit, None when it has no row."""
        rec = self._record(sha, fp)
        return rec.units.get((page, last)) if rec else None

    def answered_by(self, sha: str, fp: str, page: int, last: int) -> tuple[str, str] | None:
        """(source_path, run_id) of the earliest run's ok row of this unit, None when none is ok."""
        rec = self._record(sha, fp)
        return rec.answered.get((page, last)) if rec else None

    def answered_units(self, sha: str, fp: str) -> list[tuple[int, int, int | None, str, str]]:
        """(page, page_last, page_count, source_path, run_id) of every unit with an ok row."""
        rec = self._record(sha, fp)
        if rec is None:
            return []
        return [(page, last, rec.page_count, path, run)
                for (page, last), (path, run) in sorted(rec.answered.items())]

    def for_document(self, sha: str, fp: str, path: str, first_page: int,
                     last_page: int | None, retry_failed: bool) -> DocumentDecision:
        """Prepare it, unless earlier runs finished every unit of the configured page range."""
        rec = self._record(sha, fp)
        if rec is None or not _complete(rec, first_page, last_page, retry_failed):
            return DocumentDecision(prepare=True)
        if path in rec.paths:
            return DocumentDecision(prepare=False, already_done=len(rec.units))
        self._seen.setdefault(sha, set()).add(path)  # its duplicate rows are recorded now
        rec.paths.add(path)
        ok = tuple((page, last, *rec.answered[(page, last)])
                   for (page, last), status in sorted(rec.units.items()) if status == UnitStatus.OK)
        return DocumentDecision(prepare=False, duplicates=ok, page_count=rec.page_count)

    def for_unit(self, sha: str, fp: str, page: int, last: int, path: str,
                 retry_failed: bool) -> UnitDecision:
        rec = self._record(sha, fp)
        status = rec.units.get((page, last)) if rec else None
        if rec is not None and status == UnitStatus.OK:
            return UnitDecision.ALREADY_DONE if path in rec.paths else UnitDecision.DUPLICATE
        if status in FINAL_FAILURES and not retry_failed:
            return UnitDecision.ALREADY_DONE
        return UnitDecision.SEND

    def failure_recorded(self, sha: str, fp: str, page: int, last: int, retry_failed: bool) -> bool:
        """True when an earlier run already recorded this unit as a final failure (no new row)."""
        return not retry_failed and self.status(sha, fp, page, last) in FINAL_FAILURES


@dataclass(frozen=True)
class _Part:
    """The index of one read: `units` grouped by content, then pages; `docs` one row per content.

    Built with one sort of the rows' integer codes (numpy), not a Python object per row.
    """

    units: pa.Table  # page, page_last, status, answer_path, answer_run
    docs: pa.Table  # source_sha256, page_count, paths
    spans: np.ndarray  # docs row i's units are units[spans[i]:spans[i + 1]]

    @classmethod
    def build(cls, rows: pa.Table) -> _Part:
        rows = pa.table({name: rows[name].combine_chunks() for name in DONE_COLUMNS})
        sha, shas = _codes(rows["source_sha256"])
        run, runs = _codes(rows["run_id"])
        run = np.asarray(pc.rank(runs, "ascending"))[run] if len(runs) else run  # runs in time order
        page = _ints(rows["page"])
        last = _ints(rows["page_last"])
        rank = _ints(pc.fill_null(pc.index_in(rows["status"], value_set=_BY_RANK), -1))
        order = np.lexsort((run, last, page, sha))  # content, unit, earliest run first
        s_sha, s_page, s_last, s_rank = sha[order], page[order], last[order], rank[order]
        new_unit = np.ones(len(order), bool)
        new_unit[1:] = ((s_sha[1:] != s_sha[:-1]) | (s_page[1:] != s_page[:-1])
                        | (s_last[1:] != s_last[:-1]))
        starts = np.flatnonzero(new_unit)
        best = np.maximum.reduceat(s_rank, starts) if len(starts) else s_rank
        ok_at = np.where(s_rank == len(_BY_RANK) - 1, np.arange(len(order)), len(order))
        first_ok = np.minimum.reduceat(ok_at, starts) if len(starts) else ok_at
        keep = best >= 0  # a unit with duplicate rows only is no unit
        starts, best, first_ok = starts[keep], best[keep], first_ok[keep]
        answered = first_ok < len(order)
        answer_row = pa.array(order[np.where(answered, first_ok, 0)], mask=~answered)
        units = pa.table({
            "page": pa.array(s_page[starts], pa.int32()),
            "page_last": pa.array(s_last[starts], pa.int32()),
            "status": _BY_RANK.take(pa.array(best)),
            "answer_path": rows["source_path"].take(answer_row),
            "answer_run": rows["run_id"].take(answer_row),
        })
        spans = np.searchsorted(s_sha[starts], np.arange(len(shas) + 1))
        return cls(units, pa.table({"source_sha256": shas, **_per_content(rows, sha, len(shas))}),
                   spans)

    def rows_by_sha(self) -> dict[str, tuple[int, int, int]]:
        """sha256 -> (docs row, units [start, stop)): one entry per content, none per row."""
        return {sha: (i, int(self.spans[i]), int(self.spans[i + 1]))
                for i, sha in enumerate(self.docs["source_sha256"].to_pylist())}


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes of a one-chunk string column and the distinct values they index."""
    encoded = pc.dictionary_encode(column).chunk(0)
    return np.asarray(encoded.indices.fill_null(-1), np.int64), encoded.dictionary


def _ints(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.fill_null(-1), np.int64)


def _per_content(rows: pa.Table, sha: np.ndarray, n: int) -> dict[str, pa.Array]:
    """Per content code 0..n-1: the largest page count recorded, every distinct path."""
    counts = np.full(n, -1, np.int64)
    np.maximum.at(counts, sha, _ints(rows["page_count"]))
    path, paths = _codes(rows["source_path"])
    pairs = np.unique(sha * max(len(paths), 1) + path)
    pair_sha, pair_path = np.divmod(pairs, max(len(paths), 1))
    offsets = np.searchsorted(pair_sha, np.arange(n + 1)).astype(np.int32)
    return {"page_count": pa.array(counts, pa.int32(), mask=counts < 0),
            "paths": pa.ListArray.from_arrays(pa.array(offsets), paths.take(pa.array(pair_path)))}


_BY_RANK = pa.array([UnitStatus.SKIPPED, UnitStatus.INPUT_ERROR, UnitStatus.API_ERROR,
                     UnitStatus.INVALID_ANSWER, UnitStatus.OK], pa.string())  # worst to best


def _complete(rec: DocRecord, first_page: int, last_page: int | None, retry_failed: bool) -> bool:
    final_ok = {UnitStatus.OK} if retry_failed else {UnitStatus.OK, *FINAL_FAILURES}
    if not rec.units or any(s not in final_ok for s in rec.units.values()):
        return False
    if rec.page_count is None:  # a document-level failure row
        return True
    last = min(rec.page_count, last_page or rec.page_count)
    covered: set[int] = set()
    for page, page_last in rec.units:
        covered.update(range(page, page_last + 1))
    return all(p in covered for p in range(first_page, last + 1))


def load_done(root: StrPath, fingerprint: str, shas: Iterable[str] | None = None) -> DoneIndex:
    """What earlier runs did with `fingerprint`, for the content `shas` only (None: all)."""
    index = DoneIndex(fingerprint)
    index.add_from(root, shas)
    return index


KNOWN_COLUMNS = ["source_path", "source_etag", "source_sha256", "doc_type"]


def known_objects(root: StrPath, objects: Iterable[tuple[str, str]]
                  ) -> dict[tuple[str, str], tuple[str, str]]:
    """(source_path, source_etag) -> (source_sha256, doc_type) for the objects among `objects`
    that `pages` rows recorded under that ETag (any prompt, any run): what their bytes were,
    known without reading them again. Reads four columns of the rows of those paths only."""
    wanted = {(path, etag) for path, etag in objects if etag}  # a local file has no ETag
    if not wanted:
        return {}
    paths = pa.array(sorted({path for path, _ in wanted}), pa.string())
    rows = read_columns(root, "pages", KNOWN_COLUMNS, pc.field("source_path").isin(paths),
                        include_rejected=True)  # a fenced run read the same bytes
    if rows is None:
        return {}
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for path, etag, sha, doc_type in zip(*(rows[c].to_pylist() for c in KNOWN_COLUMNS),
                                         strict=True):
        if (path, etag) in wanted:
            found[(path, etag)] = (sha, doc_type)
    return found

