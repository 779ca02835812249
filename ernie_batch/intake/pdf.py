"""Split PDFs into small page PDFs, or render pages to images.

Why pikepdf for the split and not pypdf: a page copied with pypdf's PdfWriter carries every
resource its (often shared, often inherited) resource dictionary names, so pages of a
pdfLaTeX thesis sum to 6.5x the source and pages sharing one dictionary to 40x. qpdf's
`remove_unreferenced_resources()` keeps only what the page's content streams use, is faster
(~800 pages/s against ~500), and qpdf repairs broken xref tables on open. pypdf and pdfium
are the fallbacks for files qpdf cannot open (each of the three fails on different real
files); whatever opens the file, the split itself is done by qpdf on a repaired copy.

Why pypdfium2 for images: it is the renderer endpoints without PDF input need (olmOCR sizes
pages by their longest side in pixels, 1288 px).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pikepdf

from ernie_batch.config import ImageOptions, PdfOptions
from ernie_batch.errors import PdfError, one_line
from ernie_batch.intake.text import PageText
from ernie_batch.vocab import UnitStatus


@dataclass(frozen=True, slots=True)
class PagePdf:
    data: bytes
    first: int  # 1-based
    last: int


@dataclass(frozen=True, slots=True)
class PageImage:
    data: bytes
    mime: str
    width: int
    height: int
    page: int  # 1-based
    text: PageText | None = None  # its text layer, when asked for (evidence)


def _password(opts: PdfOptions) -> str:
    return opts.password.get_secret_value() if opts.password is not None else ""


def _password_error(opts: PdfOptions) -> PdfError:
    if opts.password is None:
        return PdfError("encrypted PDF needs a password")
    return PdfError("encrypted PDF: the configured password is wrong")


@contextmanager
def _quiet() -> Iterator[None]:
    """pypdf logs a warning per repaired defect (57 on one real file): keep them out of the run."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- opening, with fallbacks ---------------------------------------------------------------


def _open_pikepdf(path: Path, opts: PdfOptions) -> pikepdf.Pdf:
    pdf = pikepdf.open(path, password=_password(opts))
    len(pdf.pages)  # walks the page tree: fail here, not halfway through the split
    return pdf


def _via_pypdf(path: Path, opts: PdfOptions) -> pikepdf.Pdf:
    """pypdf reads some files qpdf rejects; re-serialise them and let qpdf do the rest."""
    import pypdf
    from pypdf.errors import FileNotDecryptedError

    with _quiet():
        reader = pypdf.PdfReader(path, strict=False)
        if reader.is_encrypted and not reader.decrypt(_password(opts)):
            raise _password_error(opts)
        try:
            writer = pypdf.PdfWriter(clone_from=reader)
        except FileNotDecryptedError:
            raise _password_error(opts) from None
        buf = io.BytesIO()
        writer.write(buf)
    return pikepdf.open(io.BytesIO(buf.getvalue()))


def _via_pdfium(path: Path, opts: PdfOptions) -> pikepdf.Pdf:
    """pdfium rebuilds page trees that both qpdf and pypdf give up on."""
    import pypdfium2 as pdfium

    src = pdfium.PdfDocument(path, password=_password(opts) or None)
    try:
        out = pdfium.PdfDocument.new()
        out.import_pages(src)
        buf = io.BytesIO()
        out.save(buf)
        out.close()
    finally:
        src.close()
    return pikepdf.open(io.BytesIO(buf.getvalue()))


def _via_page_scan(path: Path, opts: PdfOptions) -> pikepdf.Pdf:
    """Last resort for a lost page tree: find the page objects and give them a new tree.

    Seen on a real file whose /Pages object is missing while every page is intact: the
    pages are listed in file order in an incremental update appended to a copy in memory.
    """
    import pypdf

    data = path.read_bytes()
    with _quiet():
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise PdfError("encrypted PDF with a damaged page tree")
        pages = _page_objects(reader)
    if not pages:
        raise PdfError("no page objects found")
    return pikepdf.open(io.BytesIO(_with_page_tree(data, pages, _object_count(reader))))


def _page_objects(reader) -> list[tuple[int, int]]:  # noqa: ANN001 - pypdf.PdfReader
    """(number, generation) of every /Type /Page dictionary, in the order they appear."""
    from pypdf.generic import DictionaryObject, IndirectObject

    where: dict[tuple[int, int], tuple[int, int]] = {}
    for gen, table in reader.xref.items():
        for num, offset in table.items():
            where[(num, gen)] = (offset, 0)
    for num, (stream, index) in reader.xref_objStm.items():
        where[(num, 0)] = (where.get((stream, 0), (0, 0))[0], index + 1)
    found = []
    for (num, gen), pos in where.items():
        try:
            obj = reader.get_object(IndirectObject(num, gen, reader))
        except Exception:  # noqa: BLE001 - damaged objects are exactly what we skip
            continue
        if isinstance(obj, DictionaryObject) and obj.get("/Type") == "/Page":
            found.append((pos, num, gen))
    return [(num, gen) for _, num, gen in sorted(found)]


def _object_count(reader) -> int:  # noqa: ANN001 - pypdf.PdfReader
    numbers = [num for table in reader.xref.values() for num in table]
    numbers += list(reader.xref_objStm)
    return max([int(reader.trailer.get("/Size", 0)), *(n + 1 for n in numbers)])


def _with_page_tree(data: bytes, pages: list[tuple[int, int]], size: int) -> bytes:
    """The file plus an incremental update holding a new catalog and page tree."""
    prev = re.findall(rb"startxref\s+(\d+)", data[-4096:])
    buf = io.BytesIO()
    buf.write(data)
    buf.write(b"\n")
    kids = " ".join(f"{num} {gen} R" for num, gen in pages)
    tree_at = buf.tell()
    tree = f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>"
    buf.write(f"{size} 0 obj\n{tree}\nendobj\n".encode())
    root_at = buf.tell()
    buf.write(f"{size + 1} 0 obj\n<< /Type /Catalog /Pages {size} 0 R >>\nendobj\n".encode())
    xref_at = buf.tell()
    trailer = f"<< /Size {size + 2} /Root {size + 1} 0 R"
    trailer += f" /Prev {int(prev[-1])} >>" if prev else " >>"
    buf.write(
        f"xref\n0 1\n0000000000 65535 f \n{size} 2\n{tree_at:010d} 00000 n \n"
        f"{root_at:010d} 00000 n \ntrailer\n{trailer}\nstartxref\n{xref_at}\n%%EOF\n".encode()
    )
    return buf.getvalue()


_OPENERS: tuple[tuple[str, Callable[[Path, PdfOptions], pikepdf.Pdf]], ...] = (
    ("pikepdf", _open_pikepdf),
    ("pypdf", _via_pypdf),
    ("page scan", _via_page_scan),  # before pdfium, which "recovers" a lost tree as 1 page
    ("pdfium", _via_pdfium),
)


def _is_password_problem(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, pikepdf.PasswordError) or "password" in text or "decrypt" in text


def open_pdf(path: Path, opts: PdfOptions) -> pikepdf.Pdf:
    """The document as a pikepdf.Pdf, from the first library that can read it.

    Raises PdfError: "encrypted PDF needs a password", or "unreadable PDF: ..." with each
    library's reason when none of them can read it.
    """
    reasons: list[str] = []
    empty: pikepdf.Pdf | None = None  # zero pages may mean a lost page tree: try the others
    for name, opener in _OPENERS:
        try:
            pdf = opener(path, opts)
            if len(pdf.pages):
                if empty is not None:
                    empty.close()
                return pdf
            empty = empty or pdf
            reasons.append(f"{name}: no pages")
        except PdfError as exc:
            if exc.status != UnitStatus.INPUT_ERROR or "password" in str(exc):
                raise
            reasons.append(f"{name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - each library raises its own zoo
            if _is_password_problem(exc):
                raise _password_error(opts) from None
            reasons.append(f"{name}: {one_line(exc, 200).replace(f'{path}: ', '')}")
    if empty is not None:
        return empty
    raise PdfError("unreadable PDF (" + "; ".join(reasons) + ")")


# --- page selection ------------------------------------------------------------------------


def select_pages(count: int, opts: PdfOptions) -> range:
    """0-based indices of the pages to send; PdfError(skipped) over the page cap."""
    if count == 0:
        raise PdfError("PDF has no pages")
    if opts.max_pages is not None and count > opts.max_pages:
        raise PdfError(f"{count} pages, over the cap of {opts.max_pages}", status=UnitStatus.SKIPPED)
    first = opts.first_page - 1
    last = count if opts.last_page is None else min(opts.last_page, count)
    if first >= last:
        raise PdfError(
            f"page range {opts.first_page}-{opts.last_page or 'end'} is empty "
            f"(the PDF has {count} pages)",
            status=UnitStatus.SKIPPED,
        )
    return range(first, last)


def chunks(pages: range, size: int) -> Iterator[range]:
    for start in range(pages.start, pages.stop, size):
        yield range(start, min(start + size, pages.stop))


# --- split -----------------------------------------------------------------------------------


def page_pdf(src: pikepdf.Pdf, indices: range) -> bytes:
    """A standalone PDF of the given pages carrying only the resources they use."""
    out = pikepdf.new()
    # add_pages_from, not pages.append: it keeps form fields working and hidden layers hidden
    out.add_pages_from(src, indices, outlines="ignore")
    out.remove_unreferenced_resources()
    buf = io.BytesIO()
    out.save(
        buf,
        deterministic_id=True,  # same input, same bytes: stable content digests
        object_stream_mode=pikepdf.ObjectStreamMode.generate,
    )
    out.close()
    return buf.getvalue()


def split_pdf(path: Path, opts: PdfOptions) -> tuple[list[PagePdf | PdfError], int]:
    """Page PDFs (or per-chunk errors) for the selected pages, and the page count.

    Raises PdfError when the document as a whole cannot be used.
    """
    with open_pdf(path, opts) as src:
        count = len(src.pages)
        out: list[PagePdf | PdfError] = []
        for chunk in chunks(select_pages(count, opts), opts.pages_per_request):
            first, last = chunk.start + 1, chunk.stop
            try:
                out.append(PagePdf(page_pdf(src, chunk), first, last))
            except Exception as exc:  # noqa: BLE001 - one damaged page must not lose the rest
                out.append(
                    PdfError(f"cannot extract page {first}: {one_line(exc, 200)}", page=first, page_last=last)
                )
    return out, count


# --- render ------------------------------------------------------------------------------------


def _open_pdfium(path: Path, opts: PdfOptions):  # noqa: ANN202 - pypdfium2 type, lazy import
    """pdfium for rendering; files it cannot read go through the repairing openers first."""
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(path, password=_password(opts) or None)
    except pdfium.PdfiumError:
        pass  # damaged, or encrypted in a way qpdf opens (owner password empty): repair first
    with open_pdf(path, opts) as repaired:
        buf = io.BytesIO()
        repaired.save(buf)
    return pdfium.PdfDocument(buf.getvalue())


def render_scale(size_pt: tuple[float, float], max_side: int) -> float:
    """pdfium scale (1.0 = 72 dpi) that makes the longest side max_side pixels."""
    longest = max(size_pt)
    if longest <= 0:
        raise PdfError(f"page has no size ({size_pt[0]:g}x{size_pt[1]:g} pt)")
    return max_side / longest


def render_pdf(
    path: Path, opts: PdfOptions, images: ImageOptions, text: bool = False
) -> tuple[list[PageImage | PdfError], int]:
    """Each selected page rendered to an image (longest side opts.render_max_side), with its
    text layer from the same open page when `text`."""
    from ernie_batch.intake.images import ImageError, encode
    from ernie_batch.intake.text import page_text

    doc = _open_pdfium(path, opts)
    try:
        count = len(doc)
        out: list[PageImage | PdfError] = []
        for i in select_pages(count, opts):
            try:
                page = doc[i]
                try:
                    scale = render_scale(page.get_size(), opts.render_max_side)
                    pil = page.render(scale=scale).to_pil()
                    layer = _text_or_none(page_text, page, i + 1) if text else None
                finally:
                    page.close()
                data, mime, final = encode(pil, images, try_png=True)
                out.append(PageImage(data, mime, final.width, final.height, i + 1, layer))
            except (PdfError, ImageError) as exc:
                out.append(PdfError(f"page {i + 1}: {exc}", page=i + 1))
            except Exception as exc:  # noqa: BLE001 - one page must not lose the rest
                out.append(PdfError(f"cannot render page {i + 1}: {one_line(exc, 200)}", page=i + 1))
    finally:
        doc.close()
    return out, count


def _text_or_none(extract, page, number: int) -> PageText | None:  # noqa: ANN001 - pdfium
    """A text layer pdfium chokes on is no text layer: the page is still sent."""
    try:
        return extract(page, number)
    except Exception:  # noqa: BLE001 - verification then says no_text_layer
        return None


def open_for_rendering(path: Path, opts: PdfOptions):  # noqa: ANN201 - pypdfium2 document
    """The document as pdfium opens it for `render_pdf` (repaired first when it must be);
    the caller closes it. The review renders its thumbnails from it (`render_page`)."""
    return _open_pdfium(path, opts)


def render_page(doc, number: int, max_side: int):  # noqa: ANN001, ANN201 - pypdfium2, PIL
    """Page `number` (1-based) of an open pdfium document, longest side `max_side` pixels."""
    page = doc[number - 1]
    try:
        return page.render(scale=render_scale(page.get_size(), max_side)).to_pil()
    finally:
        page.close()
