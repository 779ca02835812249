"""Every file of the shared real-world corpus through intake: no crash, no hang, clear rows.

The corpus lives outside the project (../shared/corpus, present in CI) and is never copied in.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ernie_batch.config import ImageOptions, PdfOptions, PrepareOptions, SourceOptions
from ernie_batch.intake.discover import discover
from ernie_batch.intake.prepare import PreparePool
from ernie_batch.intake.units import Document, PageUnit, UnitFailure

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"

pytestmark = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"real-world corpus not found at {CORPUS} (present in CI)"
)


def run_intake(pdf: PdfOptions) -> dict[str, tuple[Document, list]]:
    docs, _ = discover(SourceOptions(paths=[CORPUS], include=["pdf/**", "img/**", "bad/**"]))
    opts = PrepareOptions(workers=2, timeout_s=60, queue_size=8)

    async def run() -> dict[str, tuple[Document, list]]:
        async with PreparePool(ImageOptions(), pdf, opts) as pool:
            return {d.relative_path: (d, rows) async for d, rows in pool.stream(docs)}

    out = asyncio.run(asyncio.wait_for(run(), 600))
    assert len(out) == len(docs) > 40
    return out


@pytest.fixture(scope="module")
def pdf_mode() -> dict[str, tuple[Document, list]]:
    return run_intake(PdfOptions())


def check_rows(name: str, rows: list) -> None:
    assert rows, f"{name}: no rows"
    failures = [r for r in rows if isinstance(r, UnitFailure)]
    assert all(isinstance(r, PageUnit | UnitFailure) for r in rows)
    for f in failures:
        assert f.status in ("input_error", "skipped"), (name, f)
        assert f.error and "\n" not in f.error and len(f.error) < 600, (name, f.error)
    if failures and len(rows) == 1:
        return  # one clear error row for the whole document
    for unit in rows:
        if isinstance(unit, PageUnit):
            assert unit.parts and all(p.data for p in unit.parts), name


def test_every_file_gives_pages_or_a_clear_row(pdf_mode) -> None:
    for name, (_, rows) in pdf_mode.items():
        check_rows(name, rows)


def test_known_cases(pdf_mode) -> None:
    def error(name: str) -> str:
        (row,) = pdf_mode[name][1]
        assert isinstance(row, UnitFailure), (name, row)
        return row.error

    assert error("bad/pypdf_r4-aes-user-password.pdf") == "encrypted PDF needs a password"
    assert error("bad/pike_graph-encrypted.pdf") == "encrypted PDF needs a password"
    assert error("bad/pil_truncated_image.png").startswith("truncated PNG")
    assert error("bad/pil_png_decompression_dos.png").startswith("unreadable image: Decompressed")
    opened = (
        "bad/pypdf_r2-empty-password.pdf",
        "pdf/sf_unreadablemetadata.pdf",
        "img/pil_multipage.tiff",
        "img/pil_avif_exif.avif",
        "img/pil_hopper.heif",
    )
    for name in opened:
        assert all(isinstance(r, PageUnit) for r in pdf_mode[name][1]), name
    assert len(pdf_mode["img/pil_multipage.tiff"][1]) == 3


def test_page_pdfs_carry_only_what_they_use(pdf_mode) -> None:
    source = pages = 0
    for name, (doc, rows) in pdf_mode.items():
        if not name.startswith("pdf/"):
            continue
        size = sum(len(p.data) for u in rows if isinstance(u, PageUnit) for p in u.parts)
        source, pages = source + doc.size, pages + size
        if len(rows) > 1:
            assert size <= 3 * doc.size, f"{name}: pages sum to {size / doc.size:.2f}x the source"
    assert pages <= 1.5 * source, f"pages sum to {pages / source:.2f}x the sources"


def test_render_mode_on_every_pdf() -> None:
    out = run_intake(PdfOptions(mode="image", render_max_side=640))
    for name, (doc, rows) in out.items():
        check_rows(name, rows)
        if doc.doc_type == "pdf":
            for unit in rows:
                if isinstance(unit, PageUnit):
                    assert max(unit.parts[0].width, unit.parts[0].height) <= 640
