"""The values that flow between stages: documents found, media prepared, units to send.

Plain frozen dataclasses: they cross process boundaries (the prepare pool) by pickle,
so they hold bytes and paths, never open files or clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie_batch.intake.text import PageText
from ernie_batch.location import Location
from ernie_batch.vocab import UnitStatus

DOC_TYPES = ("pdf", "jpeg", "png", "webp", "gif", "tiff", "bmp", "avif", "heif")


@dataclass(frozen=True, slots=True)
class Document:
    """A file found in a source folder (or an object under a prefix), identified by the sha256
    of its bytes. A path or string given for `path` or `root` is taken as a `Location`."""

    path: Location  # absolute, or an object's URL
    root: Location  # the source it was found under (for relative paths in prompts)
    sha256: str
    doc_type: str  # one of DOC_TYPES, or "unknown"
    size: int
    mtime: float  # seconds since the epoch (an object's Last-Modified)
    etag: str | None = None  # an object's ETag as listed (change detection, never identity)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Location.parse(self.path))
        object.__setattr__(self, "root", Location.parse(self.root))

    @property
    def relative_path(self) -> str:
        """`path` under `root` (by name, as `Path.relative_to`), else the file name."""
        root = str(self.root).rstrip("/") + "/"
        path = str(self.path)
        return path[len(root):] if path.startswith(root) else self.path.name


@dataclass(frozen=True, slots=True)
class MediaPart:
    """One media item sent in a request: a PDF (pages) or an encoded image."""

    data: bytes
    mime: str  # "application/pdf", "image/jpeg", "image/png", ...
    filename: str
    width: int | None = None  # pixels, for images (token estimates)
    height: int | None = None
    pages: int = 1  # pages inside a PDF part

    @property
    def is_pdf(self) -> bool:
        return self.mime == "application/pdf"


@dataclass(frozen=True, slots=True)
class PageUnit:
    """What one request carries: pages page..page_last of a document, ready to send."""

    doc: Document
    page: int  # 1-based
    page_last: int
    page_count: int | None
    parts: tuple[MediaPart, ...]
    # the pages' text layers (PDF pages, when evidence is asked for); None: no text layer
    text: tuple[PageText, ...] | None = None


@dataclass(frozen=True, slots=True)
class UnitFailure:
    """A unit (or a whole document, page=1) that could not be prepared or is not sent on purpose."""

    doc: Document
    status: UnitStatus  # INPUT_ERROR or SKIPPED
    error: str  # one line: what and why
    page: int = 1
    page_last: int = 1
    page_count: int | None = None


Prepared = PageUnit | UnitFailure


@dataclass(slots=True)
class DiscoveryStats:
    """What discovery passed over, by reason (shown in the run summary)."""

    found: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # files passed over, by reason
    still_growing: list[Location] = field(default_factory=list)  # named in plan and run summaries

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
