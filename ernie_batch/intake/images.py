"""Normalise images for a vision model: decode cheaply, flatten, resize, orient, encode small.

Order matters for speed: JPEGs are decoded at reduced size with `draft()` (the DCT scales by
1/2, 1/4, 1/8 for free), the resize happens before the colour conversion and the EXIF rotation
whenever the mode allows, so those run on the small image. Every failure is returned as a
one-line reason (`ImageError`), never a partially decoded image.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageCms, ImageFile

from ernie_batch.config import ImageOptions
from ernie_batch.errors import ImageError, one_line

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half an image

# Formats that hold pages (every frame is a page) versus animations (first frame unless asked)
_PAGED_FORMATS = {"TIFF", "MPO"}
_LOSSLESS_SOURCES = {"PNG", "GIF", "BMP", "TIFF", "WEBP"}
_RESIZE_FIRST_MODES = {"RGB", "L", "RGBA", "LA", "CMYK"}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SRGB = None  # created lazily, once per process


@dataclass(frozen=True, slots=True)
class EncodedImage:
    data: bytes
    mime: str
    width: int
    height: int
    frame: int  # 0-based


# --- opening ---------------------------------------------------------------------------------


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb check with our limit (it raises past 2x the limit, warns past 1x)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _human(n: float) -> str:
    for unit, size in (("billion", 1e9), ("million", 1e6)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n:,.0f}"


def bomb_message(pixels: float, limit: int) -> str:
    return f"decompression bomb: {_human(pixels)} pixels over the {_human(limit)} limit"


@functools.cache
def register_decoders() -> None:
    """HEIF/HEIC through pi-heif (decode only), registered after Pillow's own plugins.

    Once per process, on first use (prepare workers are processes of their own). Order
    matters: Pillow's AVIF plugin also claims the generic `mif1` brand and passes what is not
    AV1 on to the next plugin, while the libheif inside pi-heif decodes HEVC, not AV1.
    """
    Image.init()
    try:
        import pi_heif
    except ImportError:  # HEIF files then fail to open, each with a row saying so
        return
    pi_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count; ImageError with the reason otherwise."""
    register_decoders()
    try:
        with _pixel_limit(max_pixels):
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        m = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageError(bomb_message(int(m.group(1)) if m else float("nan"), max_pixels)) from None
    except Image.UnidentifiedImageError:
        raise ImageError("unreadable image: no decoder recognises the content") from None
    except ValueError as exc:  # e.g. a PNG text chunk that decompresses past the limit
        raise ImageError(f"unreadable image: {one_line(exc)}") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ImageError(f"unreadable image: {one_line(exc)}") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(bomb_message(w * h, max_pixels))
    if w < 1 or h < 1:
        im.close()
        raise ImageError(f"image has no pixels ({w}x{h})")
    return im


def frames_to_send(im: Image.Image, all_frames: bool) -> list[int]:
    """Pages of a TIFF/MPO are all sent; animations and multi-image HEIF/AVIF send one frame
    unless asked: the one the file opens at (the first; HEIF's primary image)."""
    fmt = (im.format or "").upper()
    if fmt in _PAGED_FORMATS or (all_frames and getattr(im, "is_animated", False)):
        return list(range(getattr(im, "n_frames", 1)))
    return [im.tell()]


# --- per frame -------------------------------------------------------------------------------


def target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size with the longest side capped at max_side, aspect kept (never upscaled)."""
    w, h = size
    longest = max(w, h)
    if longest <= max_side:
        return w, h
    scale = max_side / longest
    return max(1, round(w * scale)), max(1, round(h * scale))


def orientation(im: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8; 1 when absent or unreadable (bad EXIF is common)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF must not lose the image
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def load_frame(im: Image.Image, index: int, max_side: int) -> tuple[Image.Image, int]:
    """Seek, decode (JPEG at reduced size via draft) and return (frame, orientation)."""
    fmt = (im.format or "").upper()
    try:
        if index != im.tell():
            im.seek(index)
        orient = orientation(im) if index == 0 else 1
        if fmt == "JPEG":
            im.draft(im.mode, target_size(im.size, max_side))
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = one_line(exc)
        if "truncated" in text.lower():
            raise ImageError(f"truncated {fmt or 'image'}: {text}") from None
        raise ImageError(f"undecodable {fmt or 'image'}: {text}") from None
    return im, orient


def _has_alpha(im: Image.Image) -> bool:
    if im.mode.startswith("I") or im.mode == "F":
        return False  # a tRNS grey on 16-bit data: converting to RGBA would clip; ignore it
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float greys to L without clipping (scaled, not truncated)."""
    if im.mode != "F":
        im = im.convert("I")
    lo, hi = im.getextrema()
    if im.mode == "I" and lo >= 0 and hi <= 255:
        return im.convert("L")
    if im.mode == "I" and lo >= 0 and hi <= 65535:
        return im.point(lambda v: v * (255 / 65535)).convert("L")
    span = (hi - lo) or 1
    return im.point(lambda v: (v - lo) * (255 / span)).convert("L")


def _srgb() -> ImageCms.ImageCmsProfile:
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Through the embedded ICC profile when there is one (the naive formula shifts colours)."""
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, _srgb(), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion
    return im.convert("RGB")


def to_display_mode(im: Image.Image, icc: bytes | None) -> Image.Image:
    """RGB or L: transparency flattened on white, CMYK via ICC, high bit depths scaled."""
    if _has_alpha(im):
        grey = im.mode in ("LA", "La") or (im.mode == "L" and "transparency" in im.info)
        rgba = im.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        return flat.convert("L") if grey else flat
    if im.mode in ("RGB", "L"):
        return im
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im, icc)
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I") or im.mode == "F":
        return _to_8bit(im)
    return im.convert("RGB")  # P without transparency, YCbCr, LAB, HSV, ...


def normalise(im: Image.Image, orient: int, max_side: int) -> Image.Image:
    """The frame as an RGB/L image, longest side <= max_side, upright."""
    icc = im.info.get("icc_profile")
    size = target_size(im.size, max_side)
    if im.mode in _RESIZE_FIRST_MODES:
        if size != im.size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        im = to_display_mode(im, icc)
    else:
        im = to_display_mode(im, icc)
        if size != im.size:
            im = im.resize(size, Image.Resampling.LANCZOS)
    method = _TRANSPOSE.get(orient)
    return im.transpose(method) if method is not None else im


# --- encoding ----------------------------------------------------------------------------------


def _save(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def encode(im: Image.Image, opts: ImageOptions, try_png: bool) -> tuple[bytes, str, Image.Image]:
    """JPEG (or PNG when smaller), stepping quality, then size, down until under max_bytes."""
    best, mime = _save(im, "JPEG", quality=opts.jpeg_quality), "image/jpeg"
    if try_png:
        png = _save(im, "PNG", compress_level=6)
        if len(png) < len(best):
            best, mime = png, "image/png"
    quality = opts.jpeg_quality
    while len(best) > opts.max_bytes:
        if quality > 40:
            quality = max(40, quality - 15)
        else:
            scale = min(0.8, (opts.max_bytes / len(best)) ** 0.5)
            if min(im.size) * scale < 16:
                raise ImageError(f"cannot encode under {opts.max_bytes} bytes")
            im = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                Image.Resampling.LANCZOS,
            )
        best, mime = _save(im, "JPEG", quality=quality), "image/jpeg"
    return best, mime, im


# --- the whole image ---------------------------------------------------------------------------


def prepare_frames(path: Path, opts: ImageOptions) -> tuple[list[EncodedImage | ImageError], int]:
    """Every frame to send, each encoded or an ImageError; and the frame count.

    Raises ImageError when the file cannot be opened at all (one row for the document).
    """
    im = open_image(path, opts.max_pixels)
    with im:
        fmt = (im.format or "").upper()
        try:
            indices = frames_to_send(im, opts.all_frames)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"unreadable {fmt or 'image'}: {one_line(exc)}") from None
        out: list[EncodedImage | ImageError] = []
        for index in indices:
            out.append(_one_frame(im, index, opts, fmt in _LOSSLESS_SOURCES))
    return out, len(indices)


def _one_frame(
    im: Image.Image, index: int, opts: ImageOptions, try_png: bool
) -> EncodedImage | ImageError:
    try:
        frame, orient = load_frame(im, index, opts.max_side)
        small = normalise(frame, orient, opts.max_side)
        data, mime, final = encode(small, opts, try_png)
    except ImageError as exc:
        return exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return ImageError(f"cannot convert image: {one_line(exc)}")
    return EncodedImage(data, mime, final.width, final.height, index)
