"""What earlier runs leave a run to do with the content it found: the one place the engine asks.

Two indexes, both read for the run's content only: the done-index (`store.DoneIndex`: this
fingerprint's answers, failures and paths) and the inputs given up on (`store.given_up`:
units no earlier run could prepare with these preparation settings, under any prompt). A
document none of whose units could be prepared is not prepared again; a unit of it that
turns up in a prepared document gets no new row. Both count as `units_already_done`, and
the files are named (`unreadable`), until `--retry-failed`; `--force` reads neither.
"""

from __future__ import annotations

from collections.abc import Iterable

from ernie_batch.config import PdfOptions
from ernie_batch.intake.units import Document, UnitFailure
from ernie_batch.location import OutputRoot
from ernie_batch.store import DocumentDecision, DoneIndex, UnitDecision
from ernie_batch.store.given_up import GivenUp


class EarlierWork:
    def __init__(self, root: OutputRoot, fingerprint: str, prep_fingerprint: str, pdf: PdfOptions, *,
                 force: bool, retry_failed: bool) -> None:
        self.root, self.fp, self.pdf = root, fingerprint, pdf
        self.force, self.retry_failed = force, retry_failed
        self.done = DoneIndex(fingerprint)
        self.given_up = GivenUp(prep_fingerprint, fingerprint)
        self.unreadable: dict[str, str] = {}  # path -> the earliest run that could not read it

    def index(self, shas: Iterable[str]) -> None:
        """Read what earlier runs recorded for this content (nothing with `--force`)."""
        if self.force:
            return
        shas = sorted(set(shas))
        self.done.add_from(self.root, shas)
        if not self.retry_failed:
            self.given_up.add_from(self.root, shas)

    def document(self, doc: Document) -> DocumentDecision:
        """Prepare `doc`, unless earlier runs finished every unit of its configured range or
        could prepare none of them (with these settings, under any prompt)."""
        decision = self.done.for_document(doc.sha256, self.fp, str(doc.path), self.pdf.first_page,
                                          self.pdf.last_page, self.retry_failed)
        given = None if self.retry_failed else self.given_up.document(
            doc.sha256, doc.doc_type, self.pdf.first_page, self.pdf.last_page)
        if given is None:
            return decision
        self.unreadable.setdefault(str(doc.path), given.since)
        return DocumentDecision(prepare=False, already_done=given.units) if decision.prepare \
            else decision

    def failure_done(self, doc: Document, item: UnitFailure) -> bool:
        """True when an earlier run recorded this failure, or gave the unit up: no new row."""
        if self.done.failure_recorded(doc.sha256, self.fp, item.page, item.page_last,
                                      self.retry_failed):
            return True
        since = None if self.retry_failed else self.given_up.since(doc.sha256, item.page,
                                                                   item.page_last)
        if since is not None:
            self.unreadable.setdefault(str(doc.path), since)
        return since is not None

    def unit(self, doc: Document, page: int, last: int) -> UnitDecision:
        return self.done.for_unit(doc.sha256, self.fp, page, last, str(doc.path),
                                  self.retry_failed)

    def unit_done(self, doc: Document, page: int, last: int) -> bool:
        """Answered or given up on by an earlier run (for a unit the run did not reach)."""
        return self.unit(doc, page, last) == UnitDecision.ALREADY_DONE or (
            not self.retry_failed and self.given_up.since(doc.sha256, page, last) is not None)
