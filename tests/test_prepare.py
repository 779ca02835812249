"""prepare_document (rows, never exceptions) and PreparePool (processes, timeouts, backpressure)."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import pikepdf
import pytest
from PIL import Image
from pydantic import SecretStr

from ernie_batch.config import ImageOptions, PdfOptions, PrepareOptions, SourceOptions
from ernie_batch.intake.discover import discover
from ernie_batch.intake.prepare import PreparePool, failure_from_exception, prepare_document
from ernie_batch.intake.units import Document, PageUnit, UnitFailure

from .test_pdf import make_text_pdf


def doc_for(path: Path, doc_type: str | None = None) -> Document:
    docs, _ = discover(SourceOptions(paths=[path]))
    doc = docs[0]
    if doc_type is not None:
        doc = Document(doc.path, doc.root, doc.sha256, doc_type, max(doc.size, 1), doc.mtime)
    return doc


def prep(doc: Document, **pdf) -> list:
    return prepare_document(doc, ImageOptions(), PdfOptions(**pdf))


def failure(rows: list) -> UnitFailure:
    assert len(rows) == 1 and isinstance(rows[0], UnitFailure), rows
    return rows[0]


def test_pdf_pages_become_units(tmp_path: Path) -> None:
    rows = prep(doc_for(make_text_pdf(tmp_path / "report.pdf", pages=3)))
    assert [(u.page, u.page_last, u.page_count) for u in rows] == [(1, 1, 3), (2, 2, 3), (3, 3, 3)]
    part = rows[1].parts[0]
    assert part.mime == "application/pdf" and part.pages == 1
    assert part.filename == "report-p0002.pdf" and part.data.startswith(b"%PDF-")


def test_pdf_chunks_and_image_mode(tmp_path: Path) -> None:
    doc = doc_for(make_text_pdf(tmp_path / "r.pdf", pages=3))
    chunked = prep(doc, pages_per_request=2)
    assert [(u.page, u.page_last, u.parts[0].pages) for u in chunked] == [(1, 2, 2), (3, 3, 1)]
    assert chunked[0].parts[0].filename == "r-p0001-p0002.pdf"
    images = prep(doc, mode="image", render_max_side=300, pages_per_request=2)
    assert [len(u.parts) for u in images] == [2, 1]
    part = images[0].parts[0]
    assert part.mime in ("image/jpeg", "image/png") and max(part.width, part.height) == 300


def test_image_units(tmp_path: Path) -> None:
    path = tmp_path / "photo.pdf"  # wrong extension: content decides
    Image.new("RGB", (64, 48), "teal").save(path, "JPEG")
    (unit,) = prep(doc_for(path))
    assert isinstance(unit, PageUnit) and unit.doc.doc_type == "jpeg"
    part = unit.parts[0]
    assert (part.mime, part.width, part.height, part.filename) == (
        "image/jpeg",
        64,
        48,
        "photo-p0001.jpg",
    )
    assert Image.open(io.BytesIO(part.data)).size == (64, 48)


def test_failure_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert failure(prep(doc_for(tmp_path / "empty.jpg"))).error == "empty file (0 bytes)"

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom")
    row = failure(prep(doc_for(video)))
    assert (row.status, row.error) == ("skipped", "unsupported format: ISO media (mp42)")

    heif = tmp_path / "phone.heic"  # the brands of a photo, nothing behind them
    heif.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    row = failure(prep(doc_for(heif)))
    assert row.status == "input_error" and row.error.startswith("unreadable image")

    enc = pikepdf.Encryption(user="pw", owner="owner", R=6)
    locked = doc_for(make_text_pdf(tmp_path / "locked.pdf", encryption=enc))
    row = failure(prep(locked))
    assert (row.status, row.error) == ("input_error", "encrypted PDF needs a password")
    assert len(prep(locked, password=SecretStr("pw"))) == 3

    capped = failure(prep(doc_for(make_text_pdf(tmp_path / "long.pdf", pages=4)), max_pages=3))
    assert (capped.status, capped.error) == ("skipped", "4 pages, over the cap of 3")

    buf = io.BytesIO()
    Image.frombytes("RGB", (200, 200), os.urandom(120_000)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:5000])
    row = failure(prep(doc_for(tmp_path / "cut.jpg")))
    assert row.error.startswith("truncated JPEG: image file is truncated")


def test_vanished_file_is_a_row_not_an_exception(tmp_path: Path) -> None:
    path = make_text_pdf(tmp_path / "gone.pdf")
    doc = doc_for(path)
    path.unlink()
    row = failure(prep(doc))
    assert row.status == "input_error" and row.error.startswith("file no longer readable")


def test_failure_from_exception() -> None:
    from pebble import ProcessExpired

    doc = Document(Path("/x.pdf"), Path("/"), "0" * 64, "pdf", 1, 0.0)
    assert (
        failure_from_exception(doc, TimeoutError(), 2.5).error == "preparation timed out after 2.5s"
    )
    crashed = failure_from_exception(doc, ProcessExpired("Abnormal termination", -11, 1), 1)
    assert crashed.error == "preparation crashed the worker process (exit code -11)"


async def _collect(pool: PreparePool, docs) -> dict[str, list]:
    return {doc.path.name: rows async for doc, rows in pool.stream(docs)}


def test_inline_stream(tmp_path: Path) -> None:
    docs = [doc_for(make_text_pdf(tmp_path / f"{i}.pdf", pages=2)) for i in range(3)]
    pool = PreparePool(ImageOptions(), PdfOptions(), PrepareOptions(workers=-1))
    out = asyncio.run(_collect(pool, docs))
    assert sorted(out) == ["0.pdf", "1.pdf", "2.pdf"] and all(len(r) == 2 for r in out.values())


def test_process_pool_timeout_backpressure_and_a_free_loop(tmp_path: Path) -> None:
    """One pool for the expensive checks: a hung document is killed, the others go on."""
    docs = [doc_for(make_text_pdf(tmp_path / f"{i}.pdf", pages=2)) for i in range(4)]
    fifo = tmp_path / "hangs.jpg"
    os.mkfifo(fifo)  # opening it for reading blocks forever: a stand-in for a pathological file
    hung = Document(fifo, tmp_path, "0" * 64, "jpeg", 1, 0.0)
    pulled: list[str] = []

    def lazily():
        for doc in [hung, *docs]:
            pulled.append(doc.path.name)
            yield doc

    async def run() -> tuple[dict[str, list], int, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        opts = PrepareOptions(workers=2, timeout_s=1.5, queue_size=2)
        tick = asyncio.create_task(ticker())
        out: dict[str, list] = {}
        max_pulled_ahead = 0
        async with PreparePool(ImageOptions(), PdfOptions(), opts) as pool:
            async for doc, rows in pool.stream(lazily()):
                out[doc.path.name] = rows
                max_pulled_ahead = max(max_pulled_ahead, len(pulled) - len(out))
        tick.cancel()
        return out, ticks, max_pulled_ahead

    started = time.monotonic()
    out, ticks, ahead = asyncio.run(run())
    assert time.monotonic() - started < 30
    assert failure(out["hangs.jpg"]).error == "preparation timed out after 1.5s"
    assert all(len(out[f"{i}.pdf"]) == 2 for i in range(4))
    assert ahead <= 2  # never more than queue_size documents taken but not yet consumed
    assert ticks >= 20  # the event loop kept running while the worker hung


def test_pool_closes_when_the_consumer_stops_early(tmp_path: Path) -> None:
    docs = [doc_for(make_text_pdf(tmp_path / f"{i}.pdf")) for i in range(6)]

    async def run() -> int:
        seen = 0
        async with PreparePool(ImageOptions(), PdfOptions(), PrepareOptions(workers=1)) as pool:
            stream = pool.stream(docs)
            async for _ in stream:
                seen += 1
                break
            await stream.aclose()
        return seen

    assert asyncio.run(asyncio.wait_for(run(), 30)) == 1


@pytest.mark.parametrize("workers", [0, 3])
def test_worker_count(workers: int) -> None:
    pool = PreparePool(ImageOptions(), PdfOptions(), PrepareOptions(workers=workers))
    assert pool.workers == (workers or len(os.sched_getaffinity(0)))
