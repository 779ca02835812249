"""How many request units a document makes, from its structure alone (nothing rendered or split).

A run that stops before it reaches some documents still says how many units it selected:
their units are counted here from the page count of a PDF (`pdf.first_page`..`last_page` in
chunks of `pages_per_request`) or the frames an image sends, the way `prepare` would cut
them. A file that cannot be read, or is no supported type, is one unit (its failure row).
Headers are read, never pixels: milliseconds a file (an object on object storage is fetched
first, at the ETag discovery saw, as `prepare` fetches it). A hostile file may still take
long, so counting runs in a daemon thread against a deadline; what it did not reach is left
out.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from ernie_batch.config import ImageOptions, PdfOptions
from ernie_batch.intake.prepare import IMAGE_TYPES
from ernie_batch.intake.units import Document

Ranges = list[tuple[int, int, int | None]]  # (page, page_last, page_count) per unit


def unit_ranges(doc: Document, images: ImageOptions, pdf: PdfOptions,
                storage_options: Mapping[str, str] | None = None) -> Ranges:
    """The units `prepare_document` would make of `doc`, by their pages; an object's read
    with `storage_options` (the sources')."""
    if doc.doc_type != "pdf" and doc.doc_type not in IMAGE_TYPES:
        return [(1, 1, None)]
    from ernie_batch.intake.objects import readable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with readable(doc.path, doc.etag, storage_options or {}) as path:
                if doc.doc_type == "pdf":
                    return _pdf_ranges(path, pdf)
                return _image_ranges(path, images)
        except Exception:  # noqa: BLE001 - unreadable: prepare makes one failure row of it
            pass
    return [(1, 1, None)]


def _pdf_ranges(path: Path, opts: PdfOptions) -> Ranges:
    from ernie_batch.intake.pdf import chunks, open_pdf, select_pages

    with open_pdf(path, opts) as src:
        count = len(src.pages)
    return [(c.start + 1, c.stop, count)
            for c in chunks(select_pages(count, opts), opts.pages_per_request)]


def _image_ranges(path: Path, opts: ImageOptions) -> Ranges:
    from ernie_batch.intake.images import frames_to_send, open_image

    with open_image(path, opts.max_pixels) as im:
        n = len(frames_to_send(im, opts.all_frames))
    return [(page, page, n) for page in range(1, n + 1)]


def count_within(docs: Iterable[Document], images: ImageOptions, pdf: PdfOptions,
                 within_s: float, storage_options: Mapping[str, str] | None = None,
                 ) -> dict[str, Ranges]:
    """`unit_ranges` of each document (by path) counted within `within_s` seconds; those not
    reached by then are absent. The thread is a daemon: a file that hangs never holds the
    process."""
    found: dict[str, Ranges] = {}
    lock = threading.Lock()
    todo = list(docs)
    if not todo:
        return found

    def work() -> None:
        for doc in todo:
            ranges = unit_ranges(doc, images, pdf, storage_options)
            with lock:
                found[str(doc.path)] = ranges

    thread = threading.Thread(target=work, name="ernie-count-units", daemon=True)
    deadline = time.monotonic() + within_s
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return dict(found)
