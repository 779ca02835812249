"""Building and reading the media content parts of a chat request.

`content_sha256` is defined here once and used by both the pipeline and the simulator:
sha256 over the decoded bytes of the media parts of all messages, in message order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from ernie_batch.errors import ContentError
from ernie_batch.intake.units import MediaPart

__all__ = ["ContentError", "content_sha256", "decode_media", "media_part_json", "parts_sha256"]


def media_part_json(part: MediaPart, detail: str | None = None) -> dict[str, Any]:
    """The API's content part for one media item (PDF as `file`, image as `image_url`)."""
    b64 = base64.b64encode(part.data).decode("ascii")
    if part.is_pdf:
        return {"type": "file", "file": {"file_data": b64, "filename": part.filename}}
    image_url: dict[str, Any] = {"url": f"data:{part.mime};base64,{b64}"}
    if detail:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}


def decode_media(part: dict[str, Any]) -> tuple[str, bytes] | None:
    """(mime, bytes) of a media content part, None for a text part; ContentError if malformed."""
    kind = part.get("type")
    if kind == "file":
        data = (part.get("file") or {}).get("file_data")
        if not isinstance(data, str):
            raise ContentError("file.file_data must be a base64 string")
        if data.startswith("data:"):
            _, _, data = data.partition(",")
        return "application/pdf", _b64(data, "file.file_data")
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url")
        if not isinstance(url, str):
            raise ContentError("image_url.url must be a string")
        if not url.startswith("data:"):
            raise ContentError("image_url.url must be a data: URL (remote URLs are not fetched)")
        header, sep, data = url.partition(",")
        if not sep or ";base64" not in header:
            raise ContentError("image_url.url must be a base64 data: URL")
        return header[5:].split(";")[0], _b64(data, "image_url.url")
    return None


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ContentError(f"{where} is not valid base64: {exc}") from None


def iter_media(messages: Iterable[dict[str, Any]]) -> Iterator[tuple[str, bytes]]:
    """Every media item of a request's messages, in order."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    media = decode_media(part)
                    if media is not None:
                        yield media


def content_sha256(messages: Iterable[dict[str, Any]]) -> str:
    """sha256 over the decoded bytes of the media parts sent, in message order."""
    digest = hashlib.sha256()
    for _, data in iter_media(messages):
        digest.update(data)
    return digest.hexdigest()


def parts_sha256(parts: Iterable[MediaPart]) -> str:
    """The same digest, computed from the prepared parts before they are encoded."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.data)
    return digest.hexdigest()
