"""The done-index as it was before issue 17 (a Python object per `pages` row): the reference
the Arrow-backed `ernie_batch.store.done` must decide exactly like (test_done_index.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from ernie_batch.store import DocumentDecision, UnitDecision, read_columns
from ernie_batch.vocab import FINAL_FAILURES, UnitStatus


@dataclass
class DocRecord:
    """What earlier runs recorded for one (file content, fingerprint)."""

    page_count: int | None = None
    units: dict[tuple[int, int], str] = field(default_factory=dict)  # (page, last) -> best status
    paths: set[str] = field(default_factory=set)
    # (page, last) -> (source_path, run_id) of an ok row: where a duplicate's answer is
    answered: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)


_RANK = {s: i for i, s in enumerate((UnitStatus.SKIPPED, UnitStatus.INPUT_ERROR,
                                      UnitStatus.API_ERROR, UnitStatus.INVALID_ANSWER,
                                      UnitStatus.OK))}


@dataclass
class DoneIndex:
    docs: dict[tuple[str, str], DocRecord] = field(default_factory=dict)

    def add(self, sha: str, fp: str, page: int, last: int, status: str, path: str,
            page_count: int | None, run_id: str | None = None) -> None:
        rec = self.docs.setdefault((sha, fp), DocRecord())
        if page_count is not None:
            rec.page_count = page_count
        rec.paths.add(path)
        if status == UnitStatus.DUPLICATE:
            return
        old = rec.units.get((page, last))
        if old is None or _RANK.get(status, -1) > _RANK.get(old, -1):
            rec.units[(page, last)] = status
        if status == UnitStatus.OK:
            rec.answered.setdefault((page, last), (path, run_id or ""))

    def get(self, sha: str, fp: str) -> DocRecord | None:
        return self.docs.get((sha, fp))

    def status(self, sha: str, fp: str, page: int, last: int) -> str | None:
        """The best status earlier runs recorded for this unit, None when it has no row."""
        rec = self.docs.get((sha, fp))
        return rec.units.get((page, last)) if rec else None

    def answered_by(self, sha: str, fp: str, page: int, last: int) -> tuple[str, str] | None:
        """(source_path, run_id) of an ok row of this unit, None when none is ok."""
        rec = self.docs.get((sha, fp))
        return rec.answered.get((page, last)) if rec else None

    def answered_units(self, sha: str, fp: str) -> list[tuple[int, int, int | None, str, str]]:
        """(page, page_last, page_count, source_path, run_id) of every unit with an ok row."""
        rec = self.docs.get((sha, fp))
        if rec is None:
            return []
        return [(page, last, rec.page_count, path, run)
                for (page, last), (path, run) in sorted(rec.answered.items())]

    def for_document(self, sha: str, fp: str, path: str, first_page: int,
                     last_page: int | None, retry_failed: bool) -> DocumentDecision:
        """Prepare it, unless earlier runs finished every unit of the configured page range."""
        rec = self.docs.get((sha, fp))
        if rec is None or not _complete(rec, first_page, last_page, retry_failed):
            return DocumentDecision(prepare=True)
        if path in rec.paths:
            return DocumentDecision(prepare=False, already_done=len(rec.units))
        rec.paths.add(path)  # its duplicate rows are recorded now: the path counts as seen
        ok = tuple((page, last, *rec.answered[(page, last)])
                   for (page, last), status in sorted(rec.units.items()) if status == UnitStatus.OK)
        return DocumentDecision(prepare=False, duplicates=ok, page_count=rec.page_count)

    def for_unit(self, sha: str, fp: str, page: int, last: int, path: str,
                 retry_failed: bool) -> UnitDecision:
        status = self.status(sha, fp, page, last)
        if status == UnitStatus.OK:
            rec = self.docs[(sha, fp)]
            return UnitDecision.ALREADY_DONE if path in rec.paths else UnitDecision.DUPLICATE
        if status in FINAL_FAILURES and not retry_failed:
            return UnitDecision.ALREADY_DONE
        return UnitDecision.SEND

    def failure_recorded(self, sha: str, fp: str, page: int, last: int, retry_failed: bool) -> bool:
        """True when an earlier run already recorded this unit as a final failure (no new row)."""
        return not retry_failed and self.status(sha, fp, page, last) in FINAL_FAILURES


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


DONE_COLUMNS = ["source_sha256", "fingerprint", "page", "page_last", "status", "source_path",
                "page_count", "run_id"]


def load_done(root: Path, fingerprint: str | None = None) -> DoneIndex:
    """Read key columns only; optionally only rows of one fingerprint."""
    index = DoneIndex()
    table = read_columns(root, "pages", DONE_COLUMNS)
    if table is None or table.num_rows == 0:
        return index
    if fingerprint is not None:
        table = table.filter(pc.equal(table["fingerprint"], fingerprint))
    # in run order, as the earlier layout's parts were read (named by run id); a Delta table
    # lists its files in no such order
    table = table.take(pc.sort_indices(table, sort_keys=[("run_id", "ascending")]))
    cols = {name: table[name].to_pylist() for name in DONE_COLUMNS}
    for i in range(table.num_rows):
        index.add(cols["source_sha256"][i], cols["fingerprint"][i], cols["page"][i],
                  cols["page_last"][i], cols["status"][i], cols["source_path"][i],
                  cols["page_count"][i], cols["run_id"][i])
    return index
