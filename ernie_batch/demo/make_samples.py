"""Regenerate the demo's sample documents: `python -m ernie_batch.demo.make_samples`.

Two multi-page PDFs with a text layer (evidence is verified against it): the invoice as
software exports one (text drawn in the PDF), the survey report as a scanner with OCR makes
one (a speckled picture of each page, the same text invisible on top); a receipt as PNG and
a letter photographed sideways as JPEG with an EXIF rotation (images: no text layer).
Deterministic, so the files in git only change when this script does.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ernie_batch.demo.textpdf import Line, Page, render_page, text_pdf

SAMPLES = Path(__file__).resolve().parent / "samples"
W, H = 850, 1100
PT = 0.72  # points per pixel at the samples' 100 dpi


def page(lines: list[str], seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("L", (W, H), 246)
    draw = ImageDraw.Draw(img)
    title = ImageFont.load_default(size=34)
    body = ImageFont.load_default(size=20)
    draw.text((70, 70), lines[0], fill=20, font=title)
    y = 150
    for line in lines[1:]:
        draw.text((70, y), line, fill=35, font=body)
        y += 34
    for _ in range(400):  # scanner speckle
        x, yy = rng.randrange(W), rng.randrange(H)
        draw.point((x, yy), fill=rng.randrange(150, 230))
    return img


def invoice_texts() -> list[list[str]]:
    items = [("Paper, A4, 5 reams", 24.50), ("Toner cartridge", 89.00), ("Stapler", 12.25)]
    p1 = ["INVOICE 2026-0117", "Northwind Office Supply", "Date: 2026-11-02",
          "Bill to: Contoso Archives, 12 Harbour Road", "", "Item                      Amount"]
    p1 += [f"{name:<26}{amount:>8.2f} EUR" for name, amount in items]
    p2 = ["INVOICE 2026-0117 (page 2)", "Payment terms: 30 days net",
          f"Subtotal: {sum(a for _, a in items):.2f} EUR", "VAT 20%: 25.15 EUR",
          "Total due: 150.90 EUR", "IBAN: DE00 1234 5678 9000 0000 00"]
    p3 = ["Terms and conditions", "1. Goods remain our property until paid in full.",
          "2. Claims within 14 days of delivery.", "3. Jurisdiction: Hamburg."]
    return [p1, p2, p3]


def report_texts() -> list[list[str]]:
    pages = []
    for i in range(4):
        lines = [f"Field survey report, section {i + 1}", "Date: 2026-10-1" + str(i),
                 "Site: north meadow, plots 1-12"]
        lines += [f"Plot {j}: {random.Random(i * 10 + j).randint(3, 40)} specimens recorded"
                  for j in range(1, 9)]
        pages.append(lines)
    return pages


def text_page(lines: list[str]) -> Page:
    """The layout of `page` (title, then lines 34 px apart), as PDF text in points."""
    out = [Line(70 * PT, (70 + 27) * PT, lines[0], 34 * PT)]
    out += [Line(70 * PT, (150 + 16 + 34 * i) * PT, line, 20 * PT)
            for i, line in enumerate(lines[1:]) if line]
    return Page(out)


def scanned(lines: list[str], seed: int) -> Page:
    """The page as a scanner with OCR makes it: its picture, speckled, under invisible text."""
    text = text_page(lines)
    img = render_page(text_pdf([text]), 0, dpi=100).convert("L")
    rng = random.Random(seed)
    draw = ImageDraw.Draw(img)
    for _ in range(400):  # scanner speckle
        draw.point((rng.randrange(img.width), rng.randrange(img.height)),
                   fill=rng.randrange(150, 230))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    return Page(text.lines, scan=buf.getvalue())


def main() -> None:
    (SAMPLES / "invoice-2026-0117.pdf").write_bytes(
        text_pdf([text_page(p) for p in invoice_texts()]))
    (SAMPLES / "survey-report.pdf").write_bytes(
        text_pdf([scanned(p, 100 + i) for i, p in enumerate(report_texts())]))
    receipt = page(["RECEIPT", "Cafe Aurora, 3 Mill Lane", "2026-11-20 08:42",
                    "Cappuccino        3.40", "Croissant         2.10", "TOTAL             5.50",
                    "Paid by card"], 7).crop((0, 0, W, 520)).convert("RGB")
    receipt.save(SAMPLES / "receipt-cafe-aurora.png", optimize=True)
    letter = page(["Dear Ms. Lindqvist,", "Thank you for your letter of 2026-11-14.",
                   "We confirm the archive boxes arrive on Monday.", "Kind regards,",
                   "J. Okafor"], 9).convert("RGB").rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: viewers turn it 90° clockwise (the scan lies on its side)
    letter.save(SAMPLES / "letter-photo.jpg", quality=70, exif=exif)


if __name__ == "__main__":
    main()
