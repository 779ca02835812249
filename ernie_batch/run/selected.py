"""Every unit a run selected, so that its six counts add up to `units_selected` whatever stopped it.

A unit is counted once, when the run learns it: a document decided without preparing (its
units answered or given up on earlier, or duplicates), a document prepared (its units as
prepared), a path whose content another path of the run carries (its leader's units). A run
that stops (Ctrl-C, SIGTERM, the budget, a 401) before it reaches some documents counts
theirs at the end: those earlier runs finished are `units_already_done`, the rest were not
sent; a document to prepare is counted from its structure (`intake.count`), never prepared.
`units_not_sent` is what no other count holds: selected less ok, failed, skipped, duplicate
and already done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ernie_batch.config import JobConfig
from ernie_batch.intake.count import Ranges, count_within
from ernie_batch.intake.units import Document, Prepared
from ernie_batch.run.earlier import EarlierWork
from ernie_batch.run.subset import Subset
from ernie_batch.run.summary import Progress

log = logging.getLogger(__name__)

# counting the pages of the documents a stopped run did not reach takes milliseconds a file;
# a file that takes longer than this (with the others) is counted as one unit
COUNT_WITHIN_S = 10.0


class SelectedUnits:
    """The units of the documents handed to one run, counted once each (`units`)."""

    def __init__(self, cfg: JobConfig, earlier: EarlierWork, subset: Subset | None) -> None:
        self.cfg, self.earlier, self.subset = cfg, earlier, subset
        self.units = 0
        self._docs: dict[str, Document] = {}  # every document handed to the run, by path
        self._counted: set[str] = set()
        self._ranges: dict[str, Ranges] = {}  # content -> its units as prepared in this run

    def handed(self, docs: Iterable[Document]) -> None:
        for doc in docs:
            self._docs.setdefault(str(doc.path), doc)

    def add(self, doc: Document, units: int) -> None:
        """`doc`'s units are known: `units` of them are the run's."""
        if str(doc.path) not in self._counted:
            self._counted.add(str(doc.path))
            self.units += units

    def prepared(self, doc: Document, units: list[Prepared], kept: int) -> None:
        """`doc` was prepared into `units`, `kept` of which are the run's (a subset's)."""
        self._ranges.setdefault(doc.sha256, [(u.page, u.page_last, u.page_count) for u in units])
        self.add(doc, kept)

    def followers(self, docs: list[Document]) -> int:
        """Count the paths whose content another path of the run carries (their leader's
        units, counted from the file when the leader was never prepared); how many units."""
        counted = count_within([d for d in docs if d.sha256 not in self._ranges],
                               self.cfg.images, self.cfg.pdf, COUNT_WITHIN_S,
                               self.cfg.sources.storage_options)
        total = 0
        for doc in docs:
            ranges = self._ranges.get(doc.sha256) or counted.get(str(doc.path), [(1, 1, None)])
            units = len(self._wanted(doc, ranges))
            self.add(doc, units)
            total += units
        return total

    def unreached(self, progress: Progress, followers: Iterable[Document]) -> None:
        """Count the documents the run never reached (it stopped first): earlier runs' work
        as already done, the rest stays not sent."""
        skip = self._counted | {str(d.path) for d in followers}
        rest = [d for path, d in self._docs.items() if path not in skip]
        to_count: list[Document] = []
        for doc in rest:
            if self.subset is not None and doc not in self.subset:
                self.add(doc, 0)
            elif self.subset is not None and not self.subset.whole(doc):
                to_count.append(doc)
            else:
                decision = self.earlier.document(doc)
                if decision.prepare:
                    to_count.append(doc)
                    continue
                progress.already_done += decision.already_done
                self.add(doc, decision.already_done + len(decision.duplicates))
        known = {str(d.path): self._ranges[d.sha256] for d in to_count if d.sha256 in self._ranges}
        known |= count_within([d for d in to_count if str(d.path) not in known],
                              self.cfg.images, self.cfg.pdf, COUNT_WITHIN_S,
                              self.cfg.sources.storage_options)
        late = 0
        for doc in to_count:
            ranges = known.get(str(doc.path))
            late += ranges is None
            units = self._wanted(doc, ranges or [(1, 1, None)])
            for page, last, _ in units:
                progress.already_done += self.earlier.unit_done(doc, page, last)
            self.add(doc, len(units))
        if late:
            log.warning("%d file(s) the run did not reach counted as one unit each: counting "
                        "their pages took longer than %g s", late, COUNT_WITHIN_S)

    def _wanted(self, doc: Document, ranges: Ranges) -> Ranges:
        if self.subset is None:
            return ranges
        return [r for r in ranges if self.subset.wants(doc, *r)]
