"""Regenerate the demo's sample documents: `python -m ernie_batch.demo.make_samples`.

Scanned-looking pages drawn with Pillow: two multi-page PDFs (image PDFs, like a scanner
makes), a receipt as PNG and a letter photographed sideways as JPEG with an EXIF rotation.
Deterministic, so the files in git only change when this script does.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SAMPLES = Path(__file__).resolve().parent / "samples"
W, H = 850, 1100


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


def invoice_pages() -> list[Image.Image]:
    items = [("Paper, A4, 5 reams", 24.50), ("Toner cartridge", 89.00), ("Stapler", 12.25)]
    p1 = ["INVOICE 2026-0117", "Northwind Office Supply", "Date: 2026-11-02",
          "Bill to: Contoso Archives, 12 Harbour Road", "", "Item                      Amount"]
    p1 += [f"{name:<26}{amount:>8.2f} EUR" for name, amount in items]
    p2 = ["INVOICE 2026-0117 (page 2)", "Payment terms: 30 days net",
          f"Subtotal: {sum(a for _, a in items):.2f} EUR", "VAT 20%: 25.15 EUR",
          "Total due: 150.90 EUR", "IBAN: DE00 1234 5678 9000 0000 00"]
    p3 = ["Terms and conditions", "1. Goods remain our property until paid in full.",
          "2. Claims within 14 days of delivery.", "3. Jurisdiction: Hamburg."]
    return [page(p, i) for i, p in enumerate((p1, p2, p3))]


def report_pages() -> list[Image.Image]:
    pages = []
    for i in range(4):
        lines = [f"Field survey report, section {i + 1}", "Date: 2026-10-1" + str(i),
                 "Site: north meadow, plots 1-12"]
        lines += [f"Plot {j}: {random.Random(i * 10 + j).randint(3, 40)} specimens recorded"
                  for j in range(1, 9)]
        pages.append(page(lines, 100 + i))
    return pages


def main() -> None:
    inv = invoice_pages()
    inv[0].save(SAMPLES / "invoice-2026-0117.pdf", save_all=True, append_images=inv[1:],
                resolution=100, quality=60)
    rep = report_pages()
    rep[0].save(SAMPLES / "survey-report.pdf", save_all=True, append_images=rep[1:],
                resolution=100, quality=60)
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
