"""Image normalisation: each odd case generated here as a small file."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageStat, PngImagePlugin

from ernie_batch.config import ImageOptions
from ernie_batch.intake.images import EncodedImage, ImageError, prepare_frames


def decode(item: EncodedImage) -> Image.Image:
    assert isinstance(item, EncodedImage), item
    im = Image.open(io.BytesIO(item.data))
    im.load()
    assert im.size == (item.width, item.height)
    return im


def one(path: Path, **opts) -> Image.Image:
    frames, count = prepare_frames(path, ImageOptions(**opts))
    assert count == 1
    return decode(frames[0])


def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * len(mode)))


def test_large_jpeg_is_capped_on_the_longest_side(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 2000), "navy").save(path)
    frames, _ = prepare_frames(path, ImageOptions(max_side=500))
    assert (frames[0].width, frames[0].height) == (500, 333)
    assert frames[0].mime == "image/jpeg"


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (200, 100), "blue")
    im.paste((255, 0, 0), (0, 0, 100, 100))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif)
    out = one(path).convert("RGB")
    assert out.size == (100, 200)
    r, g, b = out.getpixel((50, 20))  # the red half is now on top
    assert r > 200 and b < 60


def test_truncated_jpeg_is_an_error_not_a_partial_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    noise((300, 300)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    frames, _ = prepare_frames(path, ImageOptions())
    assert isinstance(frames[0], ImageError)
    assert str(frames[0]).startswith("truncated JPEG: image file is truncated")


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (64, 64), (0, 0, 0, 0)).save(path)
    out = one(path)
    assert out.mode == "RGB"
    assert min(out.getpixel((10, 10))) > 240  # no ink = white


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    im = Image.new("I;16", (256, 16))
    im.putdata([x * 256 for _ in range(16) for x in range(256)])
    path = tmp_path / "deep.png"
    im.save(path)
    out = one(path)
    assert out.mode == "L"
    lo, hi = out.getextrema()
    assert lo <= 2 and hi >= 250
    assert 100 < ImageStat.Stat(out).mean[0] < 155  # a clip would make it ~255


def test_one_bit(tmp_path: Path) -> None:
    im = Image.new("1", (64, 64), 0)
    im.paste(1, (0, 0, 32, 64))
    path = tmp_path / "bw.png"
    im.save(path)
    out = one(path)
    assert out.mode == "L" and out.getextrema() == (0, 255)


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA"])
def test_transparency_flattened_on_white(tmp_path: Path, mode: str) -> None:
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 32, 64))
    if mode == "P":
        im = rgba.convert("P")  # the transparent black becomes a tRNS palette entry
        im.info["transparency"] = im.getpixel((60, 60))
        path = tmp_path / "pal.png"
        im.save(path, transparency=im.info["transparency"])
    else:
        path = tmp_path / f"{mode}.png"
        rgba.convert(mode).save(path)
    out = one(path).convert("RGB")
    assert min(out.getpixel((60, 30))) > 240  # transparent area: white, not black


def test_multi_frame_tiff_is_one_page_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "pages.tiff"
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out, count = prepare_frames(path, ImageOptions())
    assert count == 3 and [f.frame for f in out] == [0, 1, 2]


def test_animated_gif_first_frame_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert prepare_frames(path, ImageOptions())[1] == 1
    out, count = prepare_frames(path, ImageOptions(all_frames=True))
    assert count == 3 and len(out) == 3


def test_gif_bomb_is_a_clear_error(tmp_path: Path) -> None:
    lzw = bytes([2, 2, 0x4C, 0x01, 0])  # a valid-looking (tiny) image data block
    desc = b"\x2c" + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00"
    path = tmp_path / "bomb.gif"
    path.write_bytes(
        b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + desc + lzw + b";"
    )
    with pytest.raises(
        ImageError, match=r"^decompression bomb: 4\.3 billion pixels over the 179 million limit$"
    ):
        prepare_frames(path, ImageOptions())


def test_pixel_cap_from_options(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("L", (400, 300)).save(path)
    with pytest.raises(
        ImageError, match="decompression bomb: 120,000 pixels over the 100,000 limit"
    ):
        prepare_frames(path, ImageOptions(max_pixels=100_000))


def test_png_text_chunk_bomb(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("bomb", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)
    path = tmp_path / "text-bomb.png"
    Image.new("L", (8, 8)).save(path, pnginfo=info)
    with pytest.raises(ImageError, match="^unreadable image: Decompressed"):
        prepare_frames(path, ImageOptions())


def test_byte_cap_steps_quality_then_size(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    noise((600, 600)).save(path)
    frames, _ = prepare_frames(path, ImageOptions(max_bytes=10_000))
    assert len(frames[0].data) <= 10_000 and frames[0].mime == "image/jpeg"


def test_png_kept_when_smaller(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    im = Image.new("RGB", (400, 400), "white")
    im.paste((0, 0, 0), (100, 100, 300, 120))
    im.save(path)
    frames, _ = prepare_frames(path, ImageOptions())
    assert frames[0].mime == "image/png"


def test_unidentified_content(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + zlib.compress(b"junk"))
    with pytest.raises(ImageError, match="unreadable image"):
        prepare_frames(path, ImageOptions())
