"""PDF split and render: small PDFs generated here with pikepdf, one per case."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pikepdf
import pytest
from pydantic import SecretStr

from ernie_batch.config import ImageOptions, PdfOptions
from ernie_batch.intake.pdf import PdfError, open_pdf, render_pdf, select_pages, split_pdf


def _image_xobject(pdf: pikepdf.Pdf, seed: int, size: int = 20_000) -> pikepdf.Stream:
    data = bytes((seed * 7919 + i * 31) % 251 for i in range(size))  # poorly compressible
    stream = pikepdf.Stream(pdf, data)
    stream.Type, stream.Subtype = pikepdf.Name.XObject, pikepdf.Name.Image
    stream.Width, stream.Height = 100, size // 100
    stream.ColorSpace, stream.BitsPerComponent = pikepdf.Name.DeviceGray, 8
    return stream


def make_shared_resources_pdf(path: Path, pages: int = 5) -> Path:
    """Every page points at ONE resource dictionary holding every page's image."""
    pdf = pikepdf.new()
    shared = pdf.make_indirect(
        pikepdf.Dictionary(
            XObject=pikepdf.Dictionary(
                {f"/Im{i}": pdf.make_indirect(_image_xobject(pdf, i)) for i in range(pages)}
            )
        )
    )
    for i in range(pages):
        content = pikepdf.Stream(pdf, f"q 100 0 0 200 50 50 cm /Im{i} Do Q".encode())
        page = pikepdf.Dictionary(
            Type=pikepdf.Name.Page, MediaBox=[0, 0, 300, 400], Contents=content, Resources=shared
        )
        pdf.pages.append(pikepdf.Page(page))
    pdf.save(path)
    return path


def make_text_pdf(path: Path, pages: int = 3, **save_kwargs) -> Path:
    pdf = pikepdf.new()
    font = pdf.make_indirect(
        pikepdf.Dictionary(
            Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont="/Helvetica"
        )
    )
    for i in range(pages):
        content = pikepdf.Stream(pdf, f"BT /F1 24 Tf 72 700 Td (Page {i + 1}) Tj ET".encode())
        page = pikepdf.Dictionary(
            Type=pikepdf.Name.Page,
            MediaBox=[0, 0, 612, 792],
            Contents=content,
            Resources=pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font)),
        )
        pdf.pages.append(pikepdf.Page(page))
    pdf.save(path, **save_kwargs)
    return path


def total(pieces) -> int:
    return sum(len(p.data) for p in pieces)


def test_split_keeps_only_used_resources(tmp_path: Path) -> None:
    src = make_shared_resources_pdf(tmp_path / "shared.pdf")
    pieces, count = split_pdf(src, PdfOptions())
    assert count == 5 and [p.first for p in pieces] == [1, 2, 3, 4, 5]
    assert total(pieces) <= 1.5 * src.stat().st_size  # a naive split gives ~5x here
    with pikepdf.open(io.BytesIO(pieces[2].data)) as one:
        assert len(one.pages) == 1
        assert list(one.pages[0].Resources.XObject.keys()) == ["/Im2"]


def test_split_is_deterministic(tmp_path: Path) -> None:
    src = make_text_pdf(tmp_path / "t.pdf")
    a, _ = split_pdf(src, PdfOptions())
    b, _ = split_pdf(src, PdfOptions())
    assert [p.data for p in a] == [p.data for p in b]


def test_pages_per_request_and_range(tmp_path: Path) -> None:
    src = make_text_pdf(tmp_path / "t.pdf", pages=7)
    pieces, count = split_pdf(src, PdfOptions(pages_per_request=3, first_page=2, last_page=6))
    assert count == 7
    assert [(p.first, p.last) for p in pieces] == [(2, 4), (5, 6)]
    with pikepdf.open(io.BytesIO(pieces[0].data)) as chunk:
        assert len(chunk.pages) == 3


def test_select_pages_rules() -> None:
    assert select_pages(10, PdfOptions(last_page=3)) == range(0, 3)
    with pytest.raises(PdfError, match="no pages"):
        select_pages(0, PdfOptions())
    with pytest.raises(PdfError, match="over the cap of 5") as exc:
        select_pages(6, PdfOptions(max_pages=5))
    assert exc.value.status == "skipped"
    with pytest.raises(PdfError, match="range 4-end is empty"):
        select_pages(3, PdfOptions(first_page=4))


def test_zero_pages(tmp_path: Path) -> None:
    path = tmp_path / "empty.pdf"
    pikepdf.new().save(path)
    with pytest.raises(PdfError, match="PDF has no pages"):
        split_pdf(path, PdfOptions())


def test_encrypted_needs_password(tmp_path: Path) -> None:
    enc = pikepdf.Encryption(user="s3cret", owner="owner-pw", R=6)
    src = make_text_pdf(tmp_path / "locked.pdf", pages=2, encryption=enc)
    with pytest.raises(PdfError, match="encrypted PDF needs a password"):
        split_pdf(src, PdfOptions())
    with pytest.raises(PdfError, match="password is wrong"):
        split_pdf(src, PdfOptions(password=SecretStr("nope")))
    pieces, count = split_pdf(src, PdfOptions(password=SecretStr("s3cret")))
    assert count == 2
    with pikepdf.open(io.BytesIO(pieces[0].data)) as out:  # sent decrypted
        assert not out.is_encrypted


def test_encrypted_with_empty_password_opens(tmp_path: Path) -> None:
    enc = pikepdf.Encryption(user="", owner="owner-pw", R=4)
    src = make_text_pdf(tmp_path / "perm.pdf", pages=2, encryption=enc)
    pieces, count = split_pdf(src, PdfOptions())
    assert count == 2 and len(pieces) == 2


def test_broken_xref_is_recovered(tmp_path: Path) -> None:
    good = make_text_pdf(tmp_path / "good.pdf", pages=2).read_bytes()
    at = good.rindex(b"startxref")
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(good[:at] + b"startxref\n999999\n%%EOF\n")
    pieces, count = split_pdf(bad, PdfOptions())
    assert count == 2 and all(not isinstance(p, PdfError) for p in pieces)


def test_lost_page_tree_is_rebuilt(tmp_path: Path) -> None:
    src = make_text_pdf(
        tmp_path / "t.pdf", pages=3, object_stream_mode=pikepdf.ObjectStreamMode.disable
    )
    data = src.read_bytes().replace(b"/Type /Pages", b"/Type /Broken")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(data.replace(b"/Kids", b"/Kidz"))
    pdf = open_pdf(broken, PdfOptions())
    assert len(pdf.pages) == 3


def test_garbage_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pdf"
    path.write_bytes(b"%PDF-1.7\n" + os.urandom(2000))
    with pytest.raises(PdfError, match=r"^unreadable PDF \(pikepdf: .*; pypdf: .*; pdfium: .*\)$"):
        split_pdf(path, PdfOptions())


def test_a_fuzzed_pdfs_error_row_is_not_named_by_a_buffer(tmp_path: Path) -> None:
    # the kind of pdf.js's poppler-742-0-fuzzed.pdf: a damaged page object, no catalog. The
    # page scan finds it and hands qpdf a repaired copy in memory, which qpdf rejects naming
    # its "stream <_io.BytesIO object at 0x...>"
    from ernie_batch.intake.prepare import prepare_document
    from ernie_batch.intake.units import Document

    path = tmp_path / "fuzzed.pdf"
    path.write_bytes(b"%PDF-1.4\n4 0 obj\n<< /Type /Page /Contents R 0 R\nstartxref\n418\n%%EOF")
    doc = Document(path, tmp_path, "0" * 64, "pdf", path.stat().st_size, 0.0)
    (row,) = prepare_document(doc, ImageOptions(), PdfOptions())
    assert "page scan: unable to find any pages" in row.error, row.error
    rows = prepare_document(doc, ImageOptions(), PdfOptions(mode="image"))
    for text in [row.error] + [r.error for r in rows if hasattr(r, "error")]:
        assert "object at 0x" not in text and "BytesIO" not in text, text


def test_render_sizes_by_longest_side(tmp_path: Path) -> None:
    src = make_text_pdf(tmp_path / "t.pdf", pages=2)
    pages, count = render_pdf(src, PdfOptions(mode="image", render_max_side=400), ImageOptions())
    assert count == 2
    assert [(p.page, max(p.width, p.height)) for p in pages] == [(1, 400), (2, 400)]
    assert pages[0].width < pages[0].height  # portrait stays portrait


def test_render_gigantic_page(tmp_path: Path) -> None:
    pdf = pikepdf.new()
    pdf.add_blank_page(page_size=(14400, 14400))  # 200 x 200 inches, the PDF maximum
    path = tmp_path / "huge.pdf"
    pdf.save(path)
    pages, _ = render_pdf(path, PdfOptions(mode="image", render_max_side=500), ImageOptions())
    assert (pages[0].width, pages[0].height) == (500, 500)


def test_render_needs_password(tmp_path: Path) -> None:
    enc = pikepdf.Encryption(user="s3cret", owner="o", R=6)
    src = make_text_pdf(tmp_path / "locked.pdf", pages=1, encryption=enc)
    with pytest.raises(PdfError, match="needs a password"):
        render_pdf(src, PdfOptions(mode="image"), ImageOptions())
    pages, _ = render_pdf(
        src, PdfOptions(mode="image", password=SecretStr("s3cret")), ImageOptions()
    )
    assert len(pages) == 1
