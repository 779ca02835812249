"""A PDF page's text layer as pdfium reads it: the text, each character's box, where the page
is displayed. Extracted in the prepare stage (the worker that already holds the page), carried
with the unit, so verifying an answer never reopens a file.

Why pdfium's text page: it is the same library that renders the pages we send as images, it
orders characters as they are displayed (its own line breaks, hyphens it recognised at line
ends marked apart), and it says which characters it could not map to Unicode (a font without
a ToUnicode map): those become U+FFFD here, so they never match a quote.

Boxes stay in page space (float32, 16 bytes a character; one without a box takes its
neighbour's) with the one affine map from page space to the page as displayed (0-1, origin
top left, `/Rotate` and the crop box applied, taken from pdfium's own `FPDF_PageToDevice`):
only the corners of a matched span's box are ever mapped.
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass

REPLACEMENT = "\ufffd"
_DEVICE = 1_000_000  # FPDF_PageToDevice answers in whole device pixels: a fine grid


@dataclass(frozen=True, slots=True)
class PageText:
    """One page's text layer: one character of `text` per pdfium character index."""

    page: int  # 1-based, in the document
    text: str
    boxes: bytes  # float32 (left, bottom, right, top) per character, in page space
    # page space -> displayed page in 0-1: u = a*x + c*y + e, v = b*x + d*y + f
    matrix: tuple[float, float, float, float, float, float]
    unmapped: int = 0  # characters without a Unicode mapping (replaced by U+FFFD)

    def box(self, start: int, end: int) -> tuple[float, float, float, float] | None:
        """The displayed box `[x0, y0, x1, y1]` (0-1, origin top left) around characters
        `start` to `end` (exclusive); None for an empty range."""
        return union_box(self.coords(), self.matrix, start, end)

    def coords(self) -> list[float]:
        """The character boxes as one flat list of floats (a caller boxing many spans of the
        page converts them once: slicing a list is twice as fast as a float32 memoryview)."""
        return memoryview(self.boxes).cast("f").tolist()


def union_box(coords: list[float], matrix: tuple[float, float, float, float, float, float],
              start: int, end: int) -> tuple[float, float, float, float] | None:
    """The displayed box around characters `start` to `end` of a page whose flat character
    boxes are `coords` (see `PageText`); None for an empty range or one without boxes."""
    if end <= start:
        return None
    seg = coords[4 * start: 4 * end]
    left, bottom, right, top = min(seg[0::4]), min(seg[1::4]), max(seg[2::4]), max(seg[3::4])
    if right <= left and top <= bottom:
        return None  # no character of the page has a box
    a, b, c, d, e, f = matrix  # affine: the corners of the page-space box suffice
    xs = (a * left + c * bottom + e, a * left + c * top + e,
          a * right + c * bottom + e, a * right + c * top + e)
    ys = (b * left + d * bottom + f, b * left + d * top + f,
          b * right + d * bottom + f, b * right + d * top + f)
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return (round(x0 if 0.0 < x0 < 1.0 else float(x0 >= 1.0), 4),
            round(y0 if 0.0 < y0 < 1.0 else float(y0 >= 1.0), 4),
            round(x1 if 0.0 < x1 < 1.0 else float(x1 >= 1.0), 4),
            round(y1 if 0.0 < y1 < 1.0 else float(y1 >= 1.0), 4))  # clamped to 0-1


def page_text(page, number: int) -> PageText:  # noqa: ANN001 - a pypdfium2 PdfPage
    """The text layer of an open pdfium page (page `number`, 1-based)."""
    import pypdfium2.raw as raw

    textpage = page.get_textpage()
    try:
        handle = textpage.raw
        count = raw.FPDFText_CountChars(handle)
        text = textpage.get_text_range() if count > 0 else ""
        if len(text) != count:  # characters beyond the BMP: one index each, read one by one
            text = "".join(_char(raw.FPDFText_GetUnicode(handle, i)) for i in range(count))
        unmapped = [i for i in range(count) if raw.FPDFText_HasUnicodeMapError(handle, i)]
        if unmapped:
            chars = list(text)
            for i in unmapped:
                chars[i] = REPLACEMENT
            text = "".join(chars)
        boxes = _boxes(raw, handle, text)
    finally:
        textpage.close()
    return PageText(number, text, boxes, _display_matrix(raw, page), len(unmapped))


def _char(code: int) -> str:
    try:
        return chr(code) if code else REPLACEMENT
    except (ValueError, OverflowError):
        return REPLACEMENT


def _boxes(raw, handle, text: str) -> bytes:  # noqa: ANN001 - pypdfium2 raw module, handle
    """Every character's box; one without a box of its own (a space or line break pdfium
    generated, an empty glyph) takes its neighbour's, so a span's box is the min and max of
    its characters' boxes with no test per character."""
    values: list[float] = []
    left, right, bottom, top = (ctypes.c_double() for _ in range(4))
    refs = tuple(ctypes.byref(v) for v in (left, right, bottom, top))
    get = raw.FPDFText_GetCharBox
    last: tuple[float, ...] | None = None
    missing = 0  # characters before the first box
    for i, ch in enumerate(text):
        if get(handle, i, *refs) and right.value > left.value and top.value > bottom.value \
                and not ch.isspace():
            last = (left.value, bottom.value, right.value, top.value)
            if missing:
                values += last * missing
                missing = 0
        if last is None:
            missing += 1
        else:
            values += last
    return array("f", values + [0.0] * (4 * missing)).tobytes()


def _display_matrix(raw, page) -> tuple[float, float, float, float, float, float]:  # noqa: ANN001
    """The affine map from page space to the displayed page (0-1), from three points."""

    def device(x: float, y: float) -> tuple[float, float]:
        dx, dy = ctypes.c_int(), ctypes.c_int()
        raw.FPDF_PageToDevice(page.raw, 0, 0, _DEVICE, _DEVICE, 0, ctypes.c_double(x),
                              ctypes.c_double(y), ctypes.byref(dx), ctypes.byref(dy))
        return dx.value / _DEVICE, dy.value / _DEVICE

    (e, f), (x1, y1), (x2, y2) = device(0, 0), device(1000, 0), device(0, 1000)
    return (x1 - e) / 1000, (y1 - f) / 1000, (x2 - e) / 1000, (y2 - f) / 1000, e, f


def pdf_texts(data: bytes, first: int) -> tuple[PageText, ...] | None:
    """The text layers of every page of a (page) PDF, numbered from `first`; None when pdfium
    cannot read it (the unit then has no text layer: nothing to verify against)."""
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError:
        return None
    try:
        out = []
        for i in range(len(doc)):
            page = doc[i]
            try:
                out.append(page_text(page, first + i))
            finally:
                page.close()
        return tuple(out)
    except Exception:  # noqa: BLE001 - a text layer pdfium chokes on is no text layer
        return None
    finally:
        doc.close()
