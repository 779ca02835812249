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
import multiprocessing
import os
import sys
import warnings
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType

from ernie_batch.config import ImageOptions, PdfOptions, PrepareOptions
from ernie_batch.discover import describe_unknown, read_head
from ernie_batch.errors import one_line
from ernie_batch.units import Document, MediaPart, PageUnit, Prepared, UnitFailure
from ernie_batch.vocab import UnitStatus

IMAGE_TYPES = {"jpeg", "png", "webp", "gif", "tiff", "bmp", "avif", "heif"}
INLINE = -1  # PrepareOptions.workers: prepare in the calling process (tests, tiny jobs)


# --- one document -------------------------------------------------------------------------------


def prepare_document(doc: Document, images: ImageOptions, pdf: PdfOptions) -> list[Prepared]:
    """The units of one document, or failure rows. Never raises (a worker must not die of it)."""
    with warnings.catch_warnings():
        # libraries warn about every defect they repair (bad EXIF, orphan form widgets, ...);
        # the row says what matters, the rest would flood the run's log
        warnings.simplefilter("ignore")
        return _prepare(doc, images, pdf)


def _prepare(doc: Document, images: ImageOptions, pdf: PdfOptions) -> list[Prepared]:
    try:
        if doc.size == 0 or not doc.path.exists():
            return [_fail(doc, _missing_or_empty(doc.path))]
        if doc.doc_type == "pdf":
            return _prepare_pdf(doc, images, pdf)
        if doc.doc_type in IMAGE_TYPES:
            return _prepare_image(doc, images)
        return [_fail(doc, f"unsupported format: {_sniff_name(doc.path)}", UnitStatus.SKIPPED)]
    except MemoryError:
        return [_fail(doc, "out of memory while preparing")]
    except Exception as exc:  # noqa: BLE001 - the contract: a row, never an exception
        return [_fail(doc, f"cannot prepare {doc.doc_type}: {type(exc).__name__}: {one_line(str(exc))}")]


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


def _prepare_pdf(doc: Document, images: ImageOptions, opts: PdfOptions) -> list[Prepared]:
    from ernie_batch.pdf import PdfError, render_pdf, split_pdf

    try:
        if opts.mode == "image":
            rendered, count = render_pdf(doc.path, opts, images)
            return _image_units(doc, rendered, count, opts.pages_per_request)
        pieces, count = split_pdf(doc.path, opts)
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
        out.append(PageUnit(doc, piece.first, piece.last, count, (part,)))
    return out


def _image_units(doc: Document, rendered: list, count: int, per_request: int) -> list[Prepared]:
    """Rendered pages grouped into units of `per_request` image parts (a failed page alone)."""
    from ernie_batch.pdf import PageImage

    out: list[Prepared] = []
    group: list[PageImage] = []

    def flush() -> None:
        if group:
            parts = tuple(
                _image_part(doc, g.page, g.data, g.mime, g.width, g.height) for g in group
            )
            out.append(PageUnit(doc, group[0].page, group[-1].page, count, parts))
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


def _prepare_image(doc: Document, opts: ImageOptions) -> list[Prepared]:
    from ernie_batch.images import ImageError, prepare_frames

    try:
        frames, count = prepare_frames(doc.path, opts)
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


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver on Linux (fast, and never forks the threaded parent), spawn elsewhere."""
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ernie_batch.prepare", "ernie_batch.pdf", "ernie_batch.images"])
        return ctx
    return multiprocessing.get_context("spawn")


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

    def __init__(self, images: ImageOptions, pdf: PdfOptions, opts: PrepareOptions) -> None:
        self.images = images
        self.pdf = pdf
        self.opts = opts
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
                yield doc, await asyncio.to_thread(prepare_document, doc, self.images, self.pdf)
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
                prepare_document, args=(doc, self.images, self.pdf), timeout=self.opts.timeout_s
            )
            pending[asyncio.wrap_future(task)] = doc

    def _outcome(self, doc: Document, fut: asyncio.Future[list[Prepared]]) -> list[Prepared]:
        if fut.cancelled():
            return [_fail(doc, "preparation cancelled")]
        exc = fut.exception()
        if exc is not None:
            return [failure_from_exception(doc, exc, self.opts.timeout_s)]
        return fut.result()

    async def _ensure_pool(self):  # noqa: ANN202 - pebble.ProcessPool
        if self._pool is None:
            from pebble import ProcessPool

            self._pool = await asyncio.to_thread(
                ProcessPool,
                max_workers=self.workers,
                max_tasks=self.opts.max_tasks_per_worker,
                context=_mp_context(),
                initializer=_ignore_sigint,
            )
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
