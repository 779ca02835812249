"""Inputs earlier runs could not prepare with the same preparation settings: given up on.

An unreadable file does not become readable under a new prompt. A unit whose content failed
as `input_error` in an earlier run with the same `prep_fingerprint` (render mode, image and
PDF limits: whatever the prompt), or with the same fingerprint (rows written before
`prep_fingerprint` existed), is neither prepared nor recorded again: the run counts it as
`units_already_done` and names the file, until `--retry-failed`. Read like the done-index:
the key columns of the `input_error` rows of the content the run discovered, no more.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.store.tables import StrPath, read_columns
from ernie_batch.vocab import UnitStatus

COLUMNS = ["source_sha256", "page", "page_last", "page_count", "run_id"]


@dataclass(frozen=True, slots=True)
class GivenUpDocument:
    """A document every unit of which failed to prepare: since which run, in how many units."""

    since: str
    units: int


@dataclass
class GivenUp:
    """The `input_error` units of earlier runs with these preparation settings, by content."""

    prep_fingerprint: str
    fingerprint: str
    # sha256 -> (page, page_last) -> the earliest run that failed to prepare it
    _units: dict[str, dict[tuple[int, int], str]] = field(default_factory=dict)
    _counts: dict[str, int | None] = field(default_factory=dict)  # sha256 -> page count
    _unknown: set[str] = field(default_factory=set)  # content no page count was ever found for

    def add_from(self, root: StrPath, shas: Iterable[str]) -> None:
        wanted = sorted(set(shas))
        if not wanted:
            return
        where = ((pc.field("status") == UnitStatus.INPUT_ERROR.value)
                 & pc.field("source_sha256").isin(pa.array(wanted, pa.string())))
        rows = read_columns(root, "pages", [*COLUMNS, "prep_fingerprint", "fingerprint"], where)
        if rows is None:
            return
        # the settings compared after the read: parts written before the column lack it
        same = pc.or_kleene(pc.equal(rows["prep_fingerprint"], self.prep_fingerprint),
                            pc.equal(rows["fingerprint"], self.fingerprint))
        rows = rows.filter(pc.fill_null(same, False))
        for sha, page, last, count, run in zip(*(rows[c].to_pylist() for c in COLUMNS),
                                               strict=True):
            units = self._units.setdefault(sha, {})
            units[(page, last)] = min(run, units.get((page, last), run))
            if count is None:
                self._unknown.add(sha)
            else:
                self._counts[sha] = max(count, self._counts.get(sha) or 0)

    def since(self, sha: str, page: int, last: int) -> str | None:
        """The earliest run that could not prepare this unit, None when none failed it."""
        return self._units.get(sha, {}).get((page, last))

    def document(self, sha: str, doc_type: str, first_page: int,
                 last_page: int | None) -> GivenUpDocument | None:
        """The document when none of its units could be prepared (the file as a whole, or
        every page of the configured range), else None."""
        units = self._units.get(sha)
        if not units:
            return None
        since = min(units.values())
        if sha in self._unknown:  # the file itself could not be read
            return GivenUpDocument(since, len(units))
        count = self._counts[sha]
        first, last = (first_page, min(count, last_page or count)) if doc_type == "pdf" else (
            1, count)
        covered = {p for page, page_last in units for p in range(page, page_last + 1)}
        if all(p in covered for p in range(first, last + 1)):
            return GivenUpDocument(since, len(units))
        return None
