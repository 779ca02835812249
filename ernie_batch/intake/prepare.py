"""Turn documents into request units, in killable worker processes, overlapping the API calls.

`prepare_document` is the pure, picklable unit of work: it never raises, every problem is a
`UnitFailure` row. `PreparePool.stream` runs it in pebble worker processes (killable on a
per-document timeout, replaced when they crash, started with forkserver/spawn because forking
from inside Prefect's threads can deadlock) and hands results to the asyncio engine as they
finish, with at most `queue_size` documents prepared or in preparation at any time so memory
does not grow with the corpus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from ernie_batch.buckets import ObjectAccess, resolve_access
from ernie_batch.config import ImageOptions, PdfOptions, PrepareOptions
from ernie_batch.errors import InputError, one_line
from ernie_batch.intake.discover import describe_unknown, read_head
from ernie_batch.intake.units import Document, MediaPart, PageUnit, Prepared, UnitFailure
from ernie_batch.vocab import UnitStatus

IMAGE_TYPES = {"jpeg", "png", "webp", "gif", "tiff", "bmp", "avif", "heif"}
INLINE = -1  # PrepareOptions.workers: prepare in the calling process (tests, tiny jobs)


def prep_fingerprint(images: ImageOptions, pdf: PdfOptions, prepare: PrepareOptions) -> str:
    """sha256 of the settings a unit is prepared with, and nothing of the prompt: render mode,
    image and PDF limits, the per-document timeout, whether a PDF password is set (never the
    password). An input that cannot be prepared stays so under every prompt with these."""
    settings = {"images": images.model_dump(mode="json"),
                "pdf": pdf.model_dump(mode="json", exclude={"password"}),
                "pdf_password": pdf.password is not None, "timeout_s": prepare.timeout_s}
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --- one document -------------------------------------------------------------------------------


def prepare_document(doc: Document, images: ImageOptions, pdf: PdfOptions,
                     text: bool = False, access: ObjectAccess | None = None) -> list[Prepared]:
    """The units of one document, or failure rows. Never raises (a worker must not die of it).

    `text`: PDF units carry their pages' text layers (`[prompt] evidence` verifies against them).
    A document on object storage is read with `access` (handed to each task: a worker has
    no other way to reach the store) into a temporary file for the time it is prepared.
    """
    with warnings.catch_warnings():
        # libraries warn about every defect they repair (bad EXIF, orphan form widgets, ...);
        # the row says what matters, the rest would flood the run's log
        warnings.simplefilter("ignore")
        return _prepare(doc, images, pdf, text, access)


def _prepare(doc: Document, images: ImageOptions, pdf: PdfOptions, text: bool,
             access: ObjectAccess | None) -> list[Prepared]:
    try:
        if doc.path.is_remote:
            if doc.size == 0:
                return [_fail(doc, "empty object (0 bytes)")]
            from ernie_batch.intake.objects import local_copy

            with local_copy(doc.path, doc.etag, access) as path:
                return _prepare_file(doc, path, images, pdf, text)
        path = Path(doc.path)
        if doc.size == 0 or not path.exists():
            return [_fail(doc, _missing_or_empty(path))]
        return _prepare_file(doc, path, images, pdf, text)
    except InputError as exc:  # the object is gone or was replaced
        return [_fail(doc, str(exc))]
    except MemoryError:
        return [_fail(doc, "out of memory while preparing")]
    except Exception as exc:  # noqa: BLE001 - the contract: a row, never an exception
        return [_fail(doc, f"cannot prepare {doc.doc_type}: {type(exc).__name__}: {one_line(str(exc))}")]


def _prepare_file(doc: Document, path: Path, images: ImageOptions, pdf: PdfOptions,
                  text: bool) -> list[Prepared]:
    """The units of a document whose bytes are in the local file `path`."""
    if doc.doc_type == "pdf":
        return _prepare_pdf(doc, path, images, pdf, text)
    if doc.doc_type in IMAGE_TYPES:
        return _prepare_image(doc, path, images)
    return [_fail(doc, f"unsupported format: {_sniff_name(path)}", UnitStatus.SKIPPED)]


def _fail(
    doc: Document,
    error: str,
    status: UnitStatus = UnitStatus.INPUT_ERROR,
    page: int = 1,
    page_last: int | None = None,
    page_count: int | None = None,
) -> UnitFailure:
    return UnitFailure(doc, status, error, page, page_last or page, page_count)


def _missing_or_empty(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"file no longer readable: {exc.strerror or exc}"
    return "empty file (0 bytes)" if size == 0 else "file changed since discovery"


def _sniff_name(path: Path) -> str:
    try:
        return describe_unknown(read_head(path, 64))
    except OSError:
        return "unreadable"


def part_filename(doc: Document, first: int, last: int, ext: str) -> str:
    pages = f"p{first:04d}" if first == last else f"p{first:04d}-p{last:04d}"
    return f"{doc.path.stem}-{pages}.{ext}"


def _prepare_pdf(doc: Document, path: Path, images: ImageOptions, opts: PdfOptions,
                 text: bool) -> list[Prepared]:
    from ernie_batch.intake.pdf import PdfError, render_pdf, split_pdf
    from ernie_batch.intake.text import pdf_texts

    try:
        if opts.mode == "image":
            rendered, count = render_pdf(path, opts, images, text)
            return _image_units(doc, rendered, count, opts.pages_per_request)
        pieces, count = split_pdf(path, opts)
    except PdfError as exc:
        return [_fail(doc, str(exc), exc.status)]
    out: list[Prepared] = []
    for piece in pieces:
        if isinstance(piece, PdfError):
            out.append(_fail(doc, str(piece), piece.status, piece.page, piece.page_last, count))
            continue
        name = part_filename(doc, piece.first, piece.last, "pdf")
        part = MediaPart(
            piece.data, "application/pdf", name, pages=piece.last - piece.first + 1
        )
        layers = pdf_texts(piece.data, piece.first) if text else None  # the pages as sent
        out.append(PageUnit(doc, piece.first, piece.last, count, (part,), layers))
    return out


def _image_units(doc: Document, rendered: list, count: int, per_request: int) -> list[Prepared]:
    """Rendered pages grouped into units of `per_request` image parts (a failed page alone)."""
    from ernie_batch.intake.pdf import PageImage

    out: list[Prepared] = []
    group: list[PageImage] = []

    def flush() -> None:
        if group:
            parts = tuple(
                _image_part(doc, g.page, g.data, g.mime, g.width, g.height) for g in group
            )
            layers = tuple(g.text for g in group if g.text is not None)
            out.append(PageUnit(doc, group[0].page, group[-1].page, count, parts,
                                layers if len(layers) == len(group) else None))
            group.clear()

    for item in rendered:
        if isinstance(item, PageImage):
            group.append(item)
            if len(group) >= per_request:
                flush()
        else:
            flush()
            out.append(_fail(doc, str(item), item.status, item.page, item.page_last, count))
    flush()
    return out


def _image_part(doc: Document, page: int, data: bytes, mime: str, w: int, h: int) -> MediaPart:
    ext = "png" if mime == "image/png" else "jpg"
    return MediaPart(data, mime, part_filename(doc, page, page, ext), width=w, height=h)


def _prepare_image(doc: Document, path: Path, opts: ImageOptions) -> list[Prepared]:
    from ernie_batch.intake.images import ImageError, prepare_frames

    try:
        frames, count = prepare_frames(path, opts)
    except ImageError as exc:
        return [_fail(doc, str(exc))]
    out: list[Prepared] = []
    for page, frame in enumerate(frames, start=1):  # pages of what is sent, not frame numbers
        if isinstance(frame, ImageError):
            out.append(_fail(doc, str(frame), page=page, page_count=count))
            continue
        part = _image_part(doc, page, frame.data, frame.mime, frame.width, frame.height)
        out.append(PageUnit(doc, page, page, count, (part,)))
    return out


# --- the pool ------------------------------------------------------------------------------------


def worker_count(workers: int) -> int:
    """0 means one per core this process may use (cgroup/affinity aware where possible)."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def mp_context() -> multiprocessing.context.BaseContext:
    """forkserver on Linux (fast, and never forks the threaded parent), spawn elsewhere."""
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ernie_batch.intake.prepare", "ernie_batch.intake.pdf",
                                    "ernie_batch.intake.images"])
        return ctx
    return multiprocessing.get_context("spawn")


# pools started ahead of their run (`start_workers_early`), by max tasks a worker
_EARLY: dict[int, Any] = {}


def start_workers_early(opts: PrepareOptions, documents: int) -> None:
    """Start the preparation workers for `documents` documents now, beside whatever the
    caller does next (the CLI: importing Prefect, starting a flow run): each imports the
    preparation modules (~0.5 s), so the run's first document is prepared at once, and no
    more start than there are documents (they would only take CPU from the start). The
    run's `PreparePool` takes this pool instead of starting its own. A no-op inline."""
    if opts.workers == INLINE or opts.max_tasks_per_worker in _EARLY or documents < 1:
        return
    workers = min(worker_count(opts.workers), documents)
    pool = _EARLY[opts.max_tasks_per_worker] = _new_pool(workers, opts.max_tasks_per_worker)
    # scheduling starts the processes in the calling thread (forkserver round trips): not ours
    threading.Thread(target=pool.schedule, args=(_started,), daemon=True,
                     name="ernie-batch-prepare-start").start()


def _started() -> None:
    """A worker's first task: nothing (being up is the point)."""


def _new_pool(workers: int, max_tasks: int) -> Any:
    from pebble import ProcessPool

    return ProcessPool(max_workers=workers, max_tasks=max_tasks, context=mp_context(),
                       initializer=_ignore_sigint)


def _ignore_sigint() -> None:
    """In each worker: a terminal's Ctrl-C reaches the whole process group; the run decides
    when its workers stop, not the keyboard (no KeyboardInterrupt tracebacks from workers)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def failure_from_exception(doc: Document, exc: BaseException, timeout_s: float) -> UnitFailure:
    """The row for a task that did not return: timed out, worker died, or could not be sent."""
    from pebble import ProcessExpired

    if isinstance(exc, TimeoutError):
        return _fail(doc, f"preparation timed out after {timeout_s:g}s")
    if isinstance(exc, ProcessExpired):
        return _fail(doc, f"preparation crashed the worker process (exit code {exc.exitcode})")
    return _fail(doc, f"preparation failed: {type(exc).__name__}: {one_line(str(exc))}")


class PreparePool:
    """Prepare documents in killable worker processes and stream the results to asyncio.

    `opts.workers`: 0 = one per core, N = N processes, -1 = inline: one document at a time in a
    thread of the calling process (no pool, no per-document timeout; for tests and tiny jobs).
    Results come out in completion order, not input order.
    """

    def __init__(self, images: ImageOptions, pdf: PdfOptions, opts: PrepareOptions,
                 text: bool = False, storage_options: Mapping[str, str] | None = None) -> None:
        self.images = images
        self.pdf = pdf
        self.opts = opts
        self.text = text  # PDF units carry their text layers
        self.storage_options = dict(storage_options or {})  # "env:" references, no secret
        self._access: ObjectAccess | None = None  # resolved on the first object to read
        self.inline = opts.workers == INLINE
        self.workers = 0 if self.inline else worker_count(opts.workers)
        self._pool = None  # pebble.ProcessPool, created on first use

    async def __aenter__(self) -> PreparePool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def stream(
        self, docs: Iterable[Document]
    ) -> AsyncIterator[tuple[Document, list[Prepared]]]:
        """(document, its units) as each document is done; never blocks the event loop."""
        if self.inline:
            for doc in docs:
                yield doc, await asyncio.to_thread(prepare_document, *self._args(doc))
            return
        pool = await self._ensure_pool()
        todo = iter(docs)
        pending: dict[asyncio.Future[list[Prepared]], Document] = {}
        try:
            while True:
                self._fill(pool, todo, pending)
                if not pending:
                    return
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    doc = pending.pop(fut)
                    yield doc, self._outcome(doc, fut)
        finally:
            for fut in pending:
                fut.cancel()  # cancels the pebble task too; a running one is killed

    def _fill(self, pool, todo, pending) -> None:  # noqa: ANN001 - internal
        """Schedule documents until queue_size are in flight or waiting to be consumed."""
        while len(pending) < self.opts.queue_size:
            doc = next(todo, None)
            if doc is None:
                return
            task: Future = pool.schedule(
                prepare_document, args=self._args(doc), timeout=self.opts.timeout_s
            )
            pending[asyncio.wrap_future(task)] = doc

    def _args(self, doc: Document) -> tuple[Document, ImageOptions, PdfOptions, bool,
                                            ObjectAccess | None]:
        """A task's arguments: the store's access only with a document on object storage."""
        if not doc.path.is_remote:
            return doc, self.images, self.pdf, self.text, None
        if self._access is None:
            self._access = resolve_access(self.storage_options)
        return doc, self.images, self.pdf, self.text, self._access

    def _outcome(self, doc: Document, fut: asyncio.Future[list[Prepared]]) -> list[Prepared]:
        if fut.cancelled():
            return [_fail(doc, "preparation cancelled")]
        exc = fut.exception()
        if exc is not None:
            return [failure_from_exception(doc, exc, self.opts.timeout_s)]
        return fut.result()

    async def _ensure_pool(self):  # noqa: ANN202 - pebble.ProcessPool
        if self._pool is None:
            tasks = self.opts.max_tasks_per_worker
            self._pool = (_EARLY.pop(tasks, None)
                          or await asyncio.to_thread(_new_pool, self.workers, tasks))
        return self._pool

    async def aclose(self) -> None:
        """Stop the workers: idle ones exit cleanly, anything still running is killed."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        try:
            await asyncio.to_thread(pool.join, 10)
        except TimeoutError:
            pool.stop()
            await asyncio.to_thread(pool.join, 10)
