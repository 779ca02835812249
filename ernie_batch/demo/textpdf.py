"""PDFs with a real text layer, written with pikepdf: the demo's samples, the evidence benchmark
and the tests draw pages with it.

Text is set in Helvetica (a standard font every reader has, WinAnsi encoding, nothing
embedded). A page is either drawn as text (an export from software) or, with `scan`, as the
picture of itself plus the same text invisible on top (`Tr 3`, what OCR software adds to a
scan): the text layer then lies exactly over the glyphs one sees.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import pikepdf

LETTER = (612.0, 792.0)  # points


@dataclass(frozen=True, slots=True)
class Line:
    """A line of text: its left edge and baseline from the top of the unrotated page, in points."""

    x: float
    y: float
    text: str
    size: float = 12.0


@dataclass(frozen=True, slots=True)
class Page:
    lines: Sequence[Line]
    size: tuple[float, float] = LETTER
    rotate: int = 0  # /Rotate: how a viewer turns the page
    scan: bytes | None = field(default=None, repr=False)  # a JPEG of the page: text invisible


def _text_stream(page: Page, invisible: bool) -> bytes:
    ops: list[tuple[list, pikepdf.Operator]] = [([], pikepdf.Operator("BT"))]
    if invisible:
        ops.append(([3], pikepdf.Operator("Tr")))
    height = page.size[1]
    for line in page.lines:
        ops += [
            ([pikepdf.Name.F1, line.size], pikepdf.Operator("Tf")),
            ([1, 0, 0, 1, line.x, height - line.y], pikepdf.Operator("Tm")),
            ([pikepdf.String(line.text.encode("cp1252", "replace"))], pikepdf.Operator("Tj")),
        ]
    ops.append(([], pikepdf.Operator("ET")))
    return pikepdf.unparse_content_stream(ops)


def text_pdf(pages: Sequence[Page]) -> bytes:
    """A PDF of the pages, deterministic bytes for the same pages."""
    pdf = pikepdf.new()
    font = pdf.make_indirect(pikepdf.Dictionary(
        Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica,
        Encoding=pikepdf.Name.WinAnsiEncoding))
    for page in pages:
        w, h = page.size
        resources = pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font))
        content = b""
        if page.scan is not None:
            image = _jpeg_xobject(pdf, page.scan)
            resources.XObject = pikepdf.Dictionary(Im0=image)
            content = f"q {w:g} 0 0 {h:g} 0 0 cm /Im0 Do Q\n".encode()
        content += _text_stream(page, invisible=page.scan is not None)
        obj = pikepdf.Dictionary(Type=pikepdf.Name.Page, MediaBox=[0, 0, w, h],
                                 Resources=resources, Contents=pdf.make_stream(content))
        if page.rotate:
            obj.Rotate = page.rotate
        pdf.pages.append(pikepdf.Page(obj))
    buf = io.BytesIO()
    pdf.save(buf, deterministic_id=True)
    return buf.getvalue()


def _jpeg_xobject(pdf: pikepdf.Pdf, jpeg: bytes) -> pikepdf.Stream:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        width, height, mode = im.width, im.height, im.mode
    image = pikepdf.Stream(pdf, jpeg)
    image.Type, image.Subtype = pikepdf.Name.XObject, pikepdf.Name.Image
    image.Width, image.Height, image.BitsPerComponent = width, height, 8
    image.ColorSpace = pikepdf.Name.DeviceGray if mode == "L" else pikepdf.Name.DeviceRGB
    image.Filter = pikepdf.Name.DCTDecode
    return image


def render_page(pdf: bytes, index: int, dpi: float = 100.0):  # noqa: ANN201 - a PIL image
    """Page `index` (0-based) of `pdf` rendered with pdfium, as a viewer shows it."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(pdf)
    try:
        page = doc[index]
        try:
            return page.render(scale=dpi / 72).to_pil()
        finally:
            page.close()
    finally:
        doc.close()
