"""Request validation: what the vendor checks before the model, each failure a 400 with its message.

Bodies are checked with the vendor schema's types, bounds and the shapes it gives each message
role, and every media part is decoded (in a worker thread: see `Simulator.validate`), so a body
the real API rejects with 400 is rejected here as well, before it is admitted or billed.
`ApiError` lives here, beside `bad_request`, because validation raises it and `app` imports
validation (defining it in `app` would make an import cycle).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

from ernie_batch.intake.content import ContentError, content_sha256, decode_media

IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP"})  # what the vendor accepts


class ApiError(Exception):
    """An error answer with the vendor's body; `outcome` is the stats key it counts under."""

    def __init__(
        self,
        status: int,
        message: str,
        outcome: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, "bad_request")


class Rules(Protocol):
    """What validation reads from the settings (`SimSettings` has it)."""

    models: tuple[str, ...]
    reject_response_formats: tuple[str, ...]
    reject_system_role: bool


@dataclass
class Checked:
    """A request that passed validation, with what billing and the answer need."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]
    digest: str
    prompt_tokens: int
    schema: dict[str, Any]
    max_tokens: int | None


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_integer(v: Any) -> bool:
    return is_number(v) and float(v).is_integer()


def _check_number(body: dict[str, Any], key: str, lo: float, hi: float | None, *,
                  integer: bool = False, nullable: bool = False) -> None:
    if key not in body or (nullable and body[key] is None):
        return
    v = body[key]
    kind = "an integer" if integer else "a number"
    if not (_is_integer(v) if integer else is_number(v)):
        raise bad_request(f"{key}: expected {kind}, received {json.dumps(v)[:40]}")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"{key}: must be {bound}, received {v}")


def check_params(body: dict[str, Any]) -> None:
    """Sampling and length parameters, with the vendor schema's types and bounds."""
    _check_number(body, "max_tokens", 1, None)
    _check_number(body, "max_completion_tokens", 1, None, integer=True)
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0.01, 1)
    _check_number(body, "seed", 1, None, integer=True)
    _check_number(body, "frequency_penalty", -2, 2, nullable=True)
    _check_number(body, "presence_penalty", -2, 2, nullable=True)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise bad_request("stop: expected a string, an array of strings or null")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("stream: expected a boolean")
    if body.get("stream"):
        # The real API streams; the pipeline never asks to, so the simulator does not either.
        raise bad_request("stream: streaming is not supported by the simulator")


def check_response_format(rf: Any, settings: Rules) -> None:
    """`response_format` is one of text / json_object / json_schema, shaped as documented."""
    if rf is None:
        return
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(
            "response_format: expected {type: 'text' | 'json_object' | 'json_schema'}"
        )
    kind = rf["type"]
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(rf) - allowed)
    if extra:
        raise bad_request(f"response_format: unrecognized key(s) {extra}")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str):
            raise bad_request("response_format.json_schema: expected an object with a 'name'")
        extra = sorted(set(js) - {"name", "schema", "strict", "description"})
        if extra:
            raise bad_request(f"response_format.json_schema: unrecognized key(s) {extra}")
        if "schema" in js and not isinstance(js["schema"], dict):
            raise bad_request("response_format.json_schema.schema: expected an object")
        if js.get("strict") is not None and not isinstance(js["strict"], bool):
            raise bad_request("response_format.json_schema.strict: expected a boolean or null")
        if "description" in js and not isinstance(js["description"], str):
            raise bad_request("response_format.json_schema.description: expected a string")
    if kind in settings.reject_response_formats:
        raise bad_request(f"response_format of type '{kind}' is not supported with this model.")


def _check_text_part(where: str, part: dict[str, Any]) -> None:
    if not isinstance(part.get("text"), str):
        raise bad_request(f"{where}.text: expected a string")


def _check_user_part(where: str, part: Any) -> None:
    if not isinstance(part, dict):
        raise bad_request(f"{where}: expected an object")
    kind = part.get("type")
    if kind == "text":
        _check_text_part(where, part)
    elif kind == "image_url":
        img = part.get("image_url")
        if not isinstance(img, dict) or not isinstance(img.get("url"), str):
            raise bad_request(f"{where}.image_url: expected an object with a string 'url'")
        if "detail" in img and img["detail"] not in ("low", "high", "auto"):
            raise bad_request(f"{where}.image_url.detail: expected 'low', 'high' or 'auto'")
    elif kind == "file":
        f = part.get("file")
        if not isinstance(f, dict):
            raise bad_request(f"{where}.file: expected an object")
        for key in ("file_data", "filename"):
            if key in f and not isinstance(f[key], str):
                raise bad_request(f"{where}.file.{key}: expected a string")
    else:
        raise bad_request(f"{where}.type: expected 'text', 'image_url' or 'file'")


def _check_content(where: str, content: Any, role: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad_request(f"{where}.content: expected a string or an array of content parts")
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if role == "user":
            _check_user_part(pw, part)
        elif not isinstance(part, dict):
            raise bad_request(f"{pw}: expected an object")
        elif part.get("type") == "text":
            _check_text_part(pw, part)
        elif role == "assistant" and part.get("type") == "refusal":
            if not isinstance(part.get("refusal"), str):
                raise bad_request(f"{pw}.refusal: expected a string")
        else:
            raise bad_request(f"{pw}.type: a {role} message takes only text parts")


def _check_extra_keys(where: str, msg: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(msg) - allowed)
    if extra:
        raise bad_request(f"{where}: unrecognized key(s) {extra}")


def check_message(i: int, msg: Any, settings: Rules) -> None:
    """One message, with the shapes the vendor schema gives each role."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise bad_request(f"{where}: expected an object")
    role = msg.get("role")
    if role not in ("user", "system", "assistant", "tool"):
        raise bad_request(f"{where}.role: expected 'user', 'system', 'assistant' or 'tool'")
    name_ok = isinstance(msg.get("name"), str) or (role == "tool" and msg.get("name") is None)
    if "name" in msg and not name_ok:
        raise bad_request(f"{where}.name: expected a string")
    if role == "system" and settings.reject_system_role:
        raise bad_request(
            f"Unsupported value: '{where}.role' does not support 'system' with this model."
        )
    if role in ("user", "system") and "content" not in msg:
        raise bad_request(f"{where}.content: required")
    if role == "system":
        _check_extra_keys(where, msg, {"role", "content", "name"})
    if role == "tool":
        _check_extra_keys(where, msg, {"role", "content", "tool_call_id", "name"})
        if not isinstance(msg.get("content"), str) or not isinstance(msg.get("tool_call_id"), str):
            raise bad_request(f"{where}: a tool message needs string 'content' and 'tool_call_id'")
        return
    if role == "assistant":
        if msg.get("refusal") is not None and not isinstance(msg["refusal"], str):
            raise bad_request(f"{where}.refusal: expected a string or null")
        if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
            raise bad_request(f"{where}.tool_calls: expected an array")
        if msg.get("content") is None:
            return
    _check_content(where, msg["content"], role)


def check_structure(body: Any, settings: Rules) -> list[dict[str, Any]]:
    """Everything about the body that is cheap to check; returns the messages."""
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("model: required, a string")
    if model not in settings.models:
        raise bad_request(
            f"Invalid model: '{model}' is not available. "
            f"Available models: {', '.join(settings.models)}"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: required, a non-empty array")
    for i, msg in enumerate(messages):
        check_message(i, msg, settings)
    check_params(body)
    check_response_format(body.get("response_format"), settings)
    return messages


def _image_size(data: bytes, where: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, size = img.format, img.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure (bombs included) is a 400
        raise bad_request(f"{where}: the image cannot be decoded ({type(exc).__name__})") from None
    if fmt not in IMAGE_FORMATS:
        raise bad_request(f"{where}: unsupported image format {fmt}; use JPEG, PNG, GIF or WEBP")
    return size


def _pdf_pages(data: bytes, where: str) -> int:
    from pypdf import PdfReader

    if b"%PDF-" not in data[:1024]:  # spares pypdf's log warnings on what is plainly no PDF
        raise bad_request(f"{where}: the file is not a PDF (only PDF files are supported)")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError("encrypted")
        pages = len(reader.pages)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a 400
        reason = type(exc).__name__
        raise bad_request(f"{where}: the file is not a readable PDF ({reason})") from None
    if pages < 1:
        raise bad_request(f"{where}: the PDF has no pages")
    return pages


def inspect_media(messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]], int]:
    """(content digest, image sizes, PDF pages); decodes every media part (run in a thread)."""
    images: list[tuple[int, int]] = []
    pages = 0
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if msg.get("role") != "user" or not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            try:
                media = decode_media(part)
            except ContentError as exc:
                raise bad_request(f"{where}: {exc}") from None
            if media is None:
                continue
            mime, data = media
            if part["type"] == "file":
                pages += _pdf_pages(data, where)
            else:
                images.append(_image_size(data, where))
    return content_sha256(messages), images, pages
