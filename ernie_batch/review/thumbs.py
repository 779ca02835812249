"""Thumbnails for the review: each page re-created from its source, checked, encoded small.

The prepared media is not stored, so a page is re-created the way the run made it: the
source is hashed (a different sha256 than `source_sha256`: placeholder, the page shown would
not be the page answered), then `intake.prepare.prepare_document` runs again with the config's
options and each unit's `parts_sha256` is compared with the recorded `content_sha256`
(pikepdf's page split and pdfium's renders are deterministic, as is the image preparation
for the same Pillow). What is shown is separate from what is checked: PDF pages are rendered
with pdfium at thumbnail size, images are shrunk from the prepared (upright, flattened)
image, and both are encoded under a byte budget (`encode_thumb`).

Documents are examined in pebble worker processes, like the run's preparation (killable on
`prepare.timeout_s`, `prepare.workers` of them, inline with -1).
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ernie_batch.config import ImageOptions, JobConfig, PdfOptions
from ernie_batch.errors import InputError, one_line
from ernie_batch.location import Location
from ernie_batch.vocab import PreviewCheck


@dataclass(frozen=True, slots=True)
class Want:
    """What the review needs of one page row: which page of which version of the file."""

    page: int
    page_last: int
    source_sha256: str
    content_sha256: str | None


@dataclass(frozen=True, slots=True)
class Preview:
    """A card's thumbnail (None: a placeholder) and what the check found."""

    check: PreviewCheck
    image: bytes | None = None
    mime: str = "image/jpeg"
    note: str = ""  # the reason for a placeholder, or what a mismatch means


THUMB_JPEG_QUALITY = 50  # only looked at, small: quality matters less than size


@dataclass(frozen=True, slots=True)
class ThumbOptions:
    side: int  # longest side, pixels
    max_bytes: int  # encoded size at most


def preview_document(path: str, doc_type: str, wants: list[Want], images: ImageOptions,
                     pdf: PdfOptions, thumbs: ThumbOptions,
                     storage_options: Mapping[str, str]) -> list[Preview]:
    """One preview per want, in order. Never raises: every problem is a placeholder's note.
    An object on object storage is read as it is now (a temporary copy)."""
    from ernie_batch.intake.objects import readable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries warn about every defect they repair
        try:
            with readable(Location.parse(path), None, storage_options) as local:
                return _preview(local, doc_type, wants, images, pdf, thumbs)
        except InputError as exc:  # the object is gone or cannot be read
            return [Preview(PreviewCheck.GONE, note=f"source gone: {exc}")] * len(wants)
        except Exception as exc:  # noqa: BLE001 - a placeholder, never a lost review
            note = f"no preview: {type(exc).__name__}: {one_line(exc, 200)}"
            return [Preview(PreviewCheck.UNAVAILABLE, note=note) for _ in wants]


def _preview(path: Path, doc_type: str, wants: list[Want], images: ImageOptions,
             pdf: PdfOptions, thumbs: ThumbOptions) -> list[Preview]:
    from ernie_batch.intake.content import parts_sha256
    from ernie_batch.intake.discover import sha256_file
    from ernie_batch.intake.prepare import prepare_document
    from ernie_batch.intake.units import Document, PageUnit, UnitFailure

    try:
        stat = path.stat()
        sha = sha256_file(path)
    except OSError as exc:
        gone = Preview(PreviewCheck.GONE, note=f"source gone: {exc.strerror or exc}")
        return [gone] * len(wants)
    changed = Preview(PreviewCheck.CHANGED, note="source changed since this page was answered "
                                                 "(its sha256 differs): not shown")
    if all(w.source_sha256 != sha for w in wants):
        return [changed] * len(wants)
    doc = Document(path=path, root=path.parent, sha256=sha, doc_type=doc_type,
                   size=stat.st_size, mtime=stat.st_mtime)
    units: dict[tuple[int, int], PageUnit] = {}
    failures: dict[int, str] = {}
    for item in prepare_document(doc, images, pdf):
        if isinstance(item, PageUnit):
            units[(item.page, item.page_last)] = item
        elif isinstance(item, UnitFailure):
            failures.setdefault(item.page, item.error)
    current = [w for w in wants if w.source_sha256 == sha]
    shown = _pdf_thumbs(path, pdf, current, thumbs) if doc_type == "pdf" else {}
    out = []
    for w in wants:
        if w.source_sha256 != sha:
            out.append(changed)
            continue
        unit = units.get((w.page, w.page_last))
        check, note = _check(w, None if unit is None else parts_sha256(unit.parts))
        if doc_type == "pdf":
            image = shown.get(w.page)
        elif unit is not None:
            image = _image_thumb(unit.parts[0].data, thumbs)
        else:
            image = InputError(failures.get(w.page, "the page was not re-created"))
        if isinstance(image, Exception):
            out.append(Preview(PreviewCheck.UNAVAILABLE, note=f"no preview: {image}"))
        elif image is None:
            out.append(Preview(PreviewCheck.UNAVAILABLE, note="no preview"))
        else:
            out.append(Preview(check, image[0], image[1], note))
    return out


def _check(want: Want, digest: str | None) -> tuple[PreviewCheck, str]:
    if want.content_sha256 is None:
        return PreviewCheck.UNCHECKED, "never sent: nothing to compare with"
    if digest == want.content_sha256:
        return PreviewCheck.MATCH, "the page re-created from its source is what was sent"
    return PreviewCheck.DIFFERS, ("re-created from the same source, the media differs from what "
                                  "was sent (preparation options or libraries changed)")


def _pdf_thumbs(path: Path, pdf: PdfOptions, wants: list[Want],
                thumbs: ThumbOptions) -> dict[int, tuple[bytes, str] | Exception]:
    from ernie_batch.intake.pdf import open_for_rendering, render_page

    try:
        doc = open_for_rendering(path, pdf)
    except Exception as exc:  # noqa: BLE001 - the document cannot be opened: every page says so
        return {w.page: InputError(one_line(exc, 200)) for w in wants}
    out: dict[int, tuple[bytes, str] | Exception] = {}
    side = thumbs.side
    try:
        for number in sorted({w.page for w in wants}):
            try:
                # pages of a document are alike: start a little above what the last one needed
                data, mime, side = encode_thumb(lambda s, n=number: render_page(doc, n, s),
                                                thumbs, start=int(side * 1.1))
                out[number] = (data, mime)
            except Exception as exc:  # noqa: BLE001 - one page must not lose the rest
                out[number] = InputError(f"cannot render page {number}: {one_line(exc, 200)}")
    finally:
        doc.close()
    return out


def _image_thumb(data: bytes, thumbs: ThumbOptions) -> tuple[bytes, str]:
    from PIL import Image

    from ernie_batch.intake.images import normalise

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        data, mime, _ = encode_thumb(lambda side: normalise(im, 1, side), thumbs)
        return data, mime


def encode_thumb(draw: Callable[[int], Any], thumbs: ThumbOptions,
                 start: int | None = None) -> tuple[bytes, str, int]:
    """(data, mime, side): a page drawn (`draw(side)` -> a PIL image) at the largest size whose
    encoding fits `thumbs.max_bytes`, trying `start` first when given (the size the
    document's previous page needed).

    Text pages are what the budget hurts: a dense page fits 15 KB as a JPEG only at ~300
    pixels, as a 4-grey PNG at ~700 and stays legible. So black-and-white pages (grey, nearly
    all paper and ink) get the smaller of the two; photos, grey ones too, stay JPEG (four
    greys would posterize them). Each try draws the page anew at the smaller size (a PNG of
    a resized render is larger: resampling adds greys).
    """
    side = min(thumbs.side, start or thumbs.side)
    while True:
        im = draw(side)
        grey = im.mode == "L" or _is_grey(im)
        if grey:
            im = im.convert("L")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        line_art = grey and _paper_and_ink(im)
        data, mime = min(_candidates(im, line_art), key=lambda c: len(c[0]))
        if len(data) <= thumbs.max_bytes or side <= 64:
            return data, mime, side
        # bytes grow with the side to the power ~1.6 for text pages (2 for photos): aim a
        # little under, so one more try usually fits
        shrink = 0.97 * (thumbs.max_bytes / len(data)) ** (1 / 1.6)
        side = max(64, int(max(im.size) * min(0.9, max(0.4, shrink))))


def _paper_and_ink(im: Any) -> bool:
    """A grey image that is nearly all light paper and dark ink (text, line art), not a photo."""
    hist = im.histogram()
    # text pages measure 0.87-1.0 here at any thumbnail size, grey photos 0.4-0.55
    return sum(hist[:64]) + sum(hist[192:]) >= 0.8 * (im.width * im.height)


def _is_grey(im: Any) -> bool:
    """Channels within a few levels of each other everywhere (a black-and-white page)."""
    from PIL import ImageChops

    if im.mode != "RGB":
        return False
    r, g, b = im.split()
    return all(ImageChops.difference(x, y).getextrema()[1] <= 8 for x, y in ((r, g), (g, b)))


_FOUR_GREYS = [min(3, (v + 42) // 85) for v in range(256)]  # nearest of 0, 85, 170, 255


def _candidates(im: Any, line_art: bool) -> list[tuple[bytes, str]]:
    from PIL import Image

    out = [(_save(im, "JPEG", quality=THUMB_JPEG_QUALITY), "image/jpeg")]
    if line_art:
        levels = Image.frombytes("P", im.size, im.point(_FOUR_GREYS).tobytes())
        levels.putpalette([0, 0, 0, 85, 85, 85, 170, 170, 170, 255, 255, 255])
        out.append((_save(levels, "PNG", bits=2, compress_level=6), "image/png"))
    return out


def _save(im: Any, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


# --- many documents ----------------------------------------------------------------------


def previews(wants: list[tuple[str, str, Want]], cfg: JobConfig) -> list[Preview]:
    """One preview per (source_path, doc_type, want), in order; documents in worker processes."""
    thumbs = ThumbOptions(cfg.review.thumb_side, cfg.review.thumb_bytes)
    by_doc: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (path, doc_type, _) in enumerate(wants):
        by_doc[(path, doc_type)].append(i)
    out: list[Preview | None] = [None] * len(wants)
    jobs = [(path, doc_type, [wants[i][2] for i in idx]) for (path, doc_type), idx
            in by_doc.items()]
    for (path, doc_type), result in zip(by_doc, _run(jobs, cfg, thumbs), strict=True):
        for i, preview in zip(by_doc[(path, doc_type)], result, strict=True):
            out[i] = preview
    return [p for p in out if p is not None]


def _run(jobs: list[tuple[str, str, list[Want]]], cfg: JobConfig,
         thumbs: ThumbOptions) -> Iterable[list[Preview]]:
    """The previews of each job, in job order: inline, or in a pebble pool."""
    from ernie_batch.intake.prepare import INLINE, mp_context, worker_count

    if cfg.prepare.workers == INLINE or len(jobs) <= 1:
        return [preview_document(p, t, w, cfg.images, cfg.pdf, thumbs,
                                 cfg.sources.storage_options) for p, t, w in jobs]
    from pebble import ProcessPool

    workers = min(worker_count(cfg.prepare.workers), len(jobs))
    with ProcessPool(max_workers=workers, max_tasks=cfg.prepare.max_tasks_per_worker,
                     context=mp_context()) as pool:
        futures = [pool.schedule(preview_document,
                                 args=(p, t, w, cfg.images, cfg.pdf, thumbs,
                                       cfg.sources.storage_options),
                                 timeout=cfg.prepare.timeout_s) for p, t, w in jobs]
        results = []
        for future, (_, _, w) in zip(futures, jobs, strict=True):
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - timed out or the worker died
                note = f"no preview: {type(exc).__name__}: {one_line(exc, 200)}"
                results.append([Preview(PreviewCheck.UNAVAILABLE, note=note) for _ in w])
    return results
