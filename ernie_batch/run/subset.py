"""Which documents, and which of their pages, a run is limited to (eval's labelled units).

A run given a subset sends only the units that hold a selected page; every other document
and unit is outside the run, as a file outside its sources would be: no row, no request,
no count (not `units_skipped`, which counts units not sent by rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ernie_batch.intake.units import Document
from ernie_batch.location import Location


class Subset:
    """Resolved path -> the selected pages (None: every page, the whole document)."""

    def __init__(self, pages: Mapping[str | Path, set[int] | None]) -> None:
        self._pages = {str(Path(p).resolve()): (None if v is None else set(v))
                       for p, v in pages.items()}
        self._resolved: dict[Location, str] = {}

    def __contains__(self, doc: Document) -> bool:
        return self._key(doc) in self._pages

    def whole(self, doc: Document) -> bool:
        """True when every page of `doc` is selected."""
        return self._pages.get(self._key(doc), set()) is None

    def wants(self, doc: Document, page: int, page_last: int, page_count: int | None) -> bool:
        """Whether the unit page..page_last of `doc` holds a selected page. A failure of the
        whole document (no page count known) is wanted whenever the document is."""
        key = self._key(doc)
        if key not in self._pages:
            return False
        pages = self._pages[key]
        if pages is None or page_count is None:
            return True
        return any(page <= p <= page_last for p in pages)

    def _key(self, doc: Document) -> str:
        if doc.path not in self._resolved:  # an object's URL is its own resolved form
            self._resolved[doc.path] = (str(doc.path) if doc.path.is_remote
                                        else str(Path(doc.path).resolve()))
        return self._resolved[doc.path]
