"""AVIF and HEIF/HEIC: typed by their ftyp brands, decoded, normalised and sent like any image."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from ernie_batch.config import ImageOptions, PdfOptions, SourceOptions, load_config
from ernie_batch.intake.discover import discover, sniff_type
from ernie_batch.intake.prepare import prepare_document
from ernie_batch.intake.units import PageUnit
from ernie_batch.money.plan import make_plan
from tests.conftest import CORPUS, PROJECT

needs_corpus = pytest.mark.skipif(not (CORPUS / "img").is_dir(),
                                  reason=f"real-world corpus not found at {CORPUS} (present in CI)")


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x08meta"


@pytest.mark.parametrize(("head", "kind"), [
    (ftyp(b"avif", b"avif", b"mif1", b"miaf"), "avif"),
    (ftyp(b"avis", b"avif", b"msf1"), "avif"),
    (ftyp(b"mif1", b"mif1", b"miaf", b"avif"), "avif"),  # generic HEIF brand, AV1 inside
    (ftyp(b"msf1", b"avis"), "avif"),
    (ftyp(b"heic", b"mif1", b"heic"), "heif"),  # what an iPhone writes
    (ftyp(b"mif1", b"mif1", b"heic"), "heif"),
    (ftyp(b"mif1", b"mif1"), "heif"),  # codec unnamed: libheif decides
    (ftyp(b"hevc", b"msf1"), "heif"),
    (ftyp(b"heix"), "heif"),
    (ftyp(b"isom", b"avif"), "unknown"),  # MP4 whose brands merely mention AVIF
    (ftyp(b"mp42", b"isom"), "unknown"),
])
def test_iso_media_typed_by_its_ftyp_brands(head: bytes, kind: str) -> None:
    assert sniff_type(head) == kind


def units(path: Path, **image_opts) -> list:
    (doc,), _ = discover(SourceOptions(paths=[path]))
    return prepare_document(doc, ImageOptions(**image_opts), PdfOptions())


def sent_image(unit: PageUnit) -> Image.Image:
    assert isinstance(unit, PageUnit), unit
    (part,) = unit.parts
    assert part.mime in ("image/jpeg", "image/png")  # what the API accepts
    im = Image.open(io.BytesIO(part.data))
    im.load()
    return im


def test_avif_is_oriented_flattened_and_encoded_as_jpeg_or_png(tmp_path: Path) -> None:
    im = Image.new("RGB", (60, 30), "blue")
    im.paste((255, 0, 0), (0, 0, 30, 30))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise
    im.save(tmp_path / "rotated.avif", exif=exif)
    (unit,) = units(tmp_path / "rotated.avif")
    assert unit.doc.doc_type == "avif"
    out = sent_image(unit).convert("RGB")
    assert out.size == (30, 60)
    r, _, b = out.getpixel((15, 5))  # the red half is on top now
    assert r > 180 and b < 90

    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.avif")
    (unit,) = units(tmp_path / "clear.avif")
    assert min(sent_image(unit).convert("RGB").getpixel((20, 20))) > 230  # white, not black


def test_a_generic_heif_brand_with_av1_inside_decodes_as_avif(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), "green").save(buf, "AVIF")
    data = buf.getvalue()
    assert data[8:12] == b"avif"
    (tmp_path / "generic.heif").write_bytes(data[:8] + b"mif1" + data[12:])
    (unit,) = units(tmp_path / "generic.heif")
    assert unit.doc.doc_type == "avif" and sent_image(unit).size == (24, 16)


def test_an_avif_sequence_sends_its_first_frame_unless_all_frames(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "seq.avif", save_all=True, append_images=frames[1:], duration=100)
    (first,) = units(tmp_path / "seq.avif")
    assert first.doc.doc_type == "avif" and (first.page, first.page_count) == (1, 1)
    every = units(tmp_path / "seq.avif", all_frames=True)
    assert [u.page for u in every] == [1, 2, 3] and {u.page_count for u in every} == {3}
    colours = [sent_image(u).convert("RGB").getpixel((16, 16)) for u in every]
    assert [max(range(3), key=c.__getitem__) for c in colours] == [0, 1, 2]  # red, green, blue


@needs_corpus
def test_the_corpus_avif_and_heif_become_pages(tmp_path: Path) -> None:
    avif, heif = CORPUS / "img" / "pil_avif_exif.avif", CORPUS / "img" / "pil_hopper.heif"
    (unit,) = units(avif)
    assert unit.doc.doc_type == "avif" and sent_image(unit).size == (512, 512)
    (unit,) = units(heif)
    assert unit.doc.doc_type == "heif"
    im = sent_image(unit)
    assert im.size == (128, 128) and im.mode in ("RGB", "L")


def test_plan_counts_avif_pages(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.new("RGB", (40, 30), "red").save(inbox / "a.avif")
    sources = [inbox, CORPUS / "img" / "pil_hopper.heif"] if (CORPUS / "img").is_dir() else [inbox]
    cfg = load_config(PROJECT / "configs" / "demo.toml", {"output.path": str(tmp_path / "out")})
    plan = make_plan(cfg, sources)
    assert plan.documents == len(sources) and plan.documents_unreadable == 0
    assert plan.pages == plan.requests == len(sources)
