"""Same content at several paths: sent once, the other paths get `duplicate` rows.

Within one run the first path of a content (in the order documents are handed in) is its
leader and is sent; the other paths follow it and, at the end of the run, get a duplicate
row for each unit answered: by the leader in this run, or by an earlier run (ok units only:
a unit that failed is tried again, for every path, by the next run). Content an earlier run
answered under another path gets its duplicate rows at once. Each row says where the
answer it shares was recorded (`duplicate_of_path`, `duplicate_of_run`).
"""

from __future__ import annotations

from typing import Any

from ernie_batch.intake.units import Document
from ernie_batch.run.recorder import RunRecorder
from ernie_batch.run.rows import RowMaker
from ernie_batch.run.subset import Subset
from ernie_batch.store import DoneIndex
from ernie_batch.vocab import UnitStatus


class SameContent:
    """The leaders and followers of one run, and the duplicate rows they make."""

    def __init__(self, rows: RowMaker, recorder: RunRecorder, done: DoneIndex,
                 subset: Subset | None) -> None:
        self.rows, self.recorder, self.done, self.subset = rows, recorder, done, subset
        self.leaders: dict[str, str] = {}  # sha256 -> the path sent
        self.followers: list[Document] = []
        self._answered: dict[str, list[tuple[int, int, int | None]]] = {}  # ok units, this run

    def follows(self, doc: Document) -> bool:
        """True when another path of the run carries `doc`'s content (it waits for the end)."""
        if self.leaders.setdefault(doc.sha256, str(doc.path)) == str(doc.path):
            return False
        self.followers.append(doc)
        return True

    def note_answer(self, row: dict[str, Any]) -> None:
        """Sees every page row the run records: the leaders' ok units."""
        if row["status"] == UnitStatus.OK and row["source_sha256"] in self.leaders:
            self._answered.setdefault(row["source_sha256"], []).append(
                (row["page"], row["page_last"], row["page_count"]))

    def record(self, doc: Document, page: int, last: int, count: int | None, of_path: str,
               of_run: str) -> None:
        row = self.rows.unit_row(doc, page, last, count, UnitStatus.DUPLICATE,
                                 "same content already answered under another path")
        row.duplicate_of_path, row.duplicate_of_run = of_path, of_run
        self.recorder.page(row)

    def record_followers(self) -> int:
        """The followers' duplicate rows; how many."""
        recorded = 0
        for doc in self.followers:
            leader = self.leaders[doc.sha256]
            earlier = self.done.answered_units(doc.sha256, self.rows.fingerprint)
            mine = [(page, last, count, leader, self.rows.run_id)
                    for page, last, count in self._answered.get(doc.sha256, [])]
            for page, last, count, of_path, of_run in [*earlier, *mine]:
                if self.subset is None or self.subset.wants(doc, page, last, count):
                    self.recorder.progress.units_known += 1
                    self.record(doc, page, last, count, of_path, of_run)
                    recorded += 1
        return recorded
