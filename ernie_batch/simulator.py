"""A local simulator of the AI/ML API chat-completions endpoint (starlette + uvicorn).

The pipeline's tests, demo and benchmarks run against it, so it behaves like the real API
(see shared/API-FACTS.md): Bearer auth, request validation with the vendor's 400 body,
RPM/TPM sliding windows and a concurrency cap answered with 429 + Retry-After, credits
billed per request, and faults injected at seeded rates, down to dropped connections.
Answers are JSON that satisfies the requested schema and is derived from the digest of
the request's media, so a test can tell which page an answer belongs to. Every billed
request goes into a ledger that tests read back (`GET /_sim/ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG

from ernie_batch import tokens
from ernie_batch.config import CREDITS_PER_USD, DEFAULT_SCHEMA
from ernie_batch.content import ContentError, content_sha256, decode_media

log = logging.getLogger(__name__)

DEFAULT_MODEL = "baidu/ernie-4.5-vl-424b-a47b"
# DEFAULT_SCHEMA is used when the request names no schema at all (no json_schema, no fenced
# schema in the prompt): the pipeline's own default.

# Order matters: with several rates set, the first kind whose draw hits wins.
FAULT_KINDS = (
    "rate_limited",
    "server_error",
    "slow",
    "reset",
    "truncated",
    "non_json",
    "length",
    "invalid_answer",
    "fenced",
)
BILLED_FAULTS = frozenset({"slow", "truncated", "length", "invalid_answer", "fenced"})
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP"})  # what the vendor accepts
LOW_BALANCE_THRESHOLD = 10_000.0
UNLIMITED_BALANCE = 1_000_000_000_000.0


@dataclass
class FaultRates:
    """Probabilities per request (seeded), all 0 by default."""

    rate_limited: float = 0.0  # random 429 (with Retry-After), not billed
    server_error: float = 0.0  # 500/502/503/504 picked at random, not billed
    slow: float = 0.0  # answer only after SimSettings.slow_s; billed
    reset: float = 0.0  # connection dropped before any response byte; not billed
    truncated: float = 0.0  # billed, body cut short then the connection closes
    non_json: float = 0.0  # 200 with an HTML body; not billed
    length: float = 0.0  # finish_reason "length", JSON cut off mid-way; billed
    invalid_answer: float = 0.0  # 200, billed, JSON that violates the schema
    fenced: float = 0.0  # valid answer wrapped in prose + ```json fences; billed


@dataclass
class SimSettings:
    """How the simulated endpoint behaves: key, models, limits, balance, faults, prices."""

    api_key: str
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    rpm: float = 0.0  # 0 = no limit; at most rpm * window_s / 60 accepted per window
    tpm: float = 0.0  # 0 = no limit; prompt tokens accepted per window, scaled the same way
    window_s: float = 60.0  # shorter windows compress time for benchmarks
    max_concurrency: int = 0  # 0 = no limit
    balance_credits: float | None = None  # None = unlimited
    faults: FaultRates = field(default_factory=FaultRates)
    seed: int = 0
    slow_s: float = 30.0
    reject_response_formats: tuple[str, ...] = ()
    reject_system_role: bool = False
    credits_per_prompt_token: float = 0.882
    credits_per_completion_token: float = 2.625
    send_usd: bool = True


@dataclass
class LedgerEntry:
    """One billed request, as the vendor would charge it."""

    response_id: str
    content_sha256: str
    prompt_tokens: int
    completion_tokens: int
    credits: float
    usd: float
    delivered: bool
    status_code: int
    fault: str | None
    at: float


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


def error_body(status: int, message: str, path: str) -> dict[str, Any]:
    """The vendor's error body: {message, path, requestId, statusCode, timestamp}."""
    now = datetime.now(UTC)
    return {
        "message": message,
        "path": path,
        "requestId": str(uuid.uuid4()),
        "statusCode": status,
        "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def error_response(
    status: int, message: str, path: str, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(error_body(status, message, path), status_code=status, headers=headers)


# ----------------------------------------------------------------------------- validation


@dataclass
class Checked:
    """A request that passed validation, with what billing and the answer need."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]
    digest: str
    prompt_tokens: int
    schema: dict[str, Any]
    max_tokens: int | None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_integer(v: Any) -> bool:
    return _is_number(v) and float(v).is_integer()


def _check_number(body: dict[str, Any], key: str, lo: float, hi: float | None, *,
                  integer: bool = False, nullable: bool = False) -> None:
    if key not in body or (nullable and body[key] is None):
        return
    v = body[key]
    kind = "an integer" if integer else "a number"
    if not (_is_integer(v) if integer else _is_number(v)):
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


def check_response_format(rf: Any, settings: SimSettings) -> None:
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


def check_message(i: int, msg: Any, settings: SimSettings) -> None:
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


def check_structure(body: Any, settings: SimSettings) -> list[dict[str, Any]]:
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


# ----------------------------------------------------------------------------- answers

_FENCE = re.compile(r"```json[ \t]*\r?\n(.*?)```", re.DOTALL)
_SCHEMA_KEYS = {"type", "properties", "$schema", "anyOf", "oneOf", "allOf", "$ref"}


def fenced_schema(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first ```json block of the prompt that parses to a JSON Schema object."""
    for msg in messages:
        content = msg.get("content")
        texts = [content] if isinstance(content, str) else [
            p.get("text", "") for p in content or [] if p.get("type") == "text"
        ]
        for text in texts:
            for block in _FENCE.findall(text):
                try:
                    value = json.loads(block)
                except ValueError:
                    continue
                if isinstance(value, dict) and _SCHEMA_KEYS & set(value):
                    return value
    return None


def answer_schema(body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """json_schema's schema if given, else a schema fenced in the prompt, else the default."""
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        schema = rf["json_schema"].get("schema")
        if isinstance(schema, dict):
            return schema
    return fenced_schema(messages) or DEFAULT_SCHEMA


def _h(digest: str, name: str) -> int:
    """A number derived from the digest and a field name (stable variety per field)."""
    return int(hashlib.sha256(f"{digest}:{name}".encode()).hexdigest()[:12], 16)


def _resolve_ref(root: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node: Any = root
    for token in ref.lstrip("#").strip("/").split("/"):
        if not token:
            continue
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or token not in node:
            return None
        node = node[token]
    return node


def _merge_all_of(schema: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in schema["allOf"]:
        if not isinstance(sub, dict):
            continue
        for key, value in sub.items():
            if key == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required":
                merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
            else:
                merged.setdefault(key, value)
    return merged


def _gen_string(schema: dict[str, Any], name: str, digest: str) -> str:
    n = _h(digest, name)
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name) or "value"
    fmt = schema.get("format")
    if fmt == "date":
        value = f"2026-01-{1 + n % 28:02d}"
    elif fmt == "date-time":
        value = f"2026-01-{1 + n % 28:02d}T{n % 24:02d}:00:00Z"
    elif fmt == "time":
        value = f"{n % 24:02d}:00:00"
    elif fmt == "email":
        value = f"{slug}-{digest[:12]}@example.com"
    elif fmt in ("uri", "url"):
        value = f"https://example.com/{slug}/{digest[:12]}"
    elif fmt == "uuid":
        value = str(uuid.UUID(digest[:32]))
    else:
        value = f"{name}-{digest[:12]}"
    min_len, max_len = schema.get("minLength"), schema.get("maxLength")
    if isinstance(min_len, int) and len(value) < min_len:
        value += (digest * (min_len // len(digest) + 1))[: min_len - len(value)]
    if isinstance(max_len, int) and max_len >= 0:
        value = value[:max_len]
    return value


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None, bool, bool]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    lo_open = hi_open = False
    if _is_number(xlo) and (lo is None or xlo >= lo):
        lo, lo_open = xlo, True
    if _is_number(xhi) and (hi is None or xhi <= hi):
        hi, hi_open = xhi, True
    return lo, hi, lo_open, hi_open


def _gen_integer(schema: dict[str, Any], name: str, digest: str) -> int:
    lo_f, hi_f, lo_open, hi_open = _bounds(schema)
    lo = None if lo_f is None else math.floor(lo_f) + 1 if lo_open else math.ceil(lo_f)
    hi = None if hi_f is None else math.ceil(hi_f) - 1 if hi_open else math.floor(hi_f)
    if lo is None:
        lo = 0 if hi is None or hi >= 0 else hi - 100
    if hi is None:
        hi = lo + 1000
    if hi < lo:
        return lo
    value = lo + _h(digest, name) % (hi - lo + 1)
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 0:
        value = math.ceil(value / step) * step
        if value > hi:
            value -= step
    return value


def _gen_number(schema: dict[str, Any], name: str, digest: str) -> float:
    lo, hi, _, _ = _bounds(schema)
    if lo is None:
        lo = 0.0 if hi is None or hi >= 0 else hi - 100.0
    if hi is None:
        hi = lo + 1000.0
    if hi <= lo:
        return lo
    frac = 0.1 + 0.8 * (_h(digest, name) % 10_000) / 10_000  # strictly inside (lo, hi)
    value = round(lo + frac * (hi - lo), 3)
    return value if lo < value < hi else lo + frac * (hi - lo)


def _gen_array(
    schema: dict[str, Any], name: str, digest: str, root: dict[str, Any], depth: int
) -> list[Any]:
    min_items, max_items = schema.get("minItems"), schema.get("maxItems")
    # Deep down (recursive schemas) only the required minimum, so the answer stays small.
    count = 1 + _h(digest, name) % 3 if depth <= 6 else 0
    if isinstance(min_items, int):
        count = max(count, min_items)
    if isinstance(max_items, int):
        count = min(count, max_items)
    prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
    items = schema.get("items", {})
    out = []
    for i in range(count):
        sub = prefix[i] if i < len(prefix) else items
        out.append(generate_value(sub, digest, f"{name}-{i + 1}", root, depth + 1))
    return out


def _gen_object(
    schema: dict[str, Any], digest: str, root: dict[str, Any], depth: int
) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    out = {key: generate_value(sub, digest, key, root, depth + 1) for key, sub in props.items()}
    for key in schema.get("required") or []:
        if isinstance(key, str) and key not in out:
            out[key] = generate_value({"type": "string"}, digest, key, root, depth + 1)
    return out


def _pick_type(schema: dict[str, Any]) -> str:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "null")
    if isinstance(t, str):
        return t
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def generate_value(schema: Any, digest: str, name: str = "value",
                   root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A value satisfying `schema`, derived only from `digest` (deterministic)."""
    if not isinstance(schema, dict) or depth > 16:
        return f"{name}-{digest[:12]}" if depth <= 16 else None
    root = schema if root is None else root
    if isinstance(schema.get("$ref"), str):
        target = _resolve_ref(root, schema["$ref"])
        if target is not None:
            return generate_value(target, digest, name, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[_h(digest, name) % len(enum)]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return generate_value(schema[key][0], digest, name, root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        return generate_value(_merge_all_of(schema), digest, name, root, depth + 1)
    kind = _pick_type(schema)
    if kind == "string":
        return _gen_string(schema, name, digest)
    if kind == "integer":
        return _gen_integer(schema, name, digest)
    if kind == "number":
        return _gen_number(schema, name, digest)
    if kind == "boolean":
        return _h(digest, name) % 2 == 0
    if kind == "array":
        return _gen_array(schema, name, digest, root, depth)
    if kind == "object":
        return _gen_object(schema, digest, root, depth)
    return None


def violate(value: Any, schema: dict[str, Any]) -> Any:
    """The answer made invalid: a required field dropped, or else the wrong top-level type."""
    if isinstance(value, dict):
        required = [k for k in schema.get("required") or [] if k in value]
        if required:
            return {k: v for k, v in value.items() if k != required[0]}
        return [value]
    return {"unexpected": value}


def fence(text: str) -> str:
    """The answer as a chatty model sends it: prose around a ```json block."""
    pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    return f"Here is the extracted data:\n\n```json\n{pretty}\n```\n\nLet me know if you need more."


def compose_answer(checked: Checked, fault: str | None) -> tuple[str, str]:
    """(content, finish_reason) for a billed answer, faults and max_tokens applied."""
    value = generate_value(checked.schema, checked.digest)
    if fault == "invalid_answer":
        value = violate(value, checked.schema)
    content = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    finish = "stop"
    if fault == "fenced":
        content = fence(content)
    elif fault == "length":
        content, finish = content[: max(1, len(content) // 2)], "length"
    limit = checked.max_tokens
    if limit is not None and tokens.completion_tokens(content) > limit:
        content, finish = content[: limit * 4], "length"
    return content, finish


# ----------------------------------------------------------------------------- rate limits


class SlidingWindow:
    """Requests and prompt tokens accepted in the last `window_s` seconds."""

    def __init__(self, rpm: float, tpm: float, window_s: float) -> None:
        scale = window_s / 60.0
        # At least one per window, or a low rate with a short window would admit nothing.
        self.req_cap = max(1, math.floor(rpm * scale + 1e-9)) if rpm > 0 else 0
        self.tok_cap = max(1, math.floor(tpm * scale + 1e-9)) if tpm > 0 else 0
        self.window_s = window_s
        self.entries: deque[tuple[float, int]] = deque()
        self.tokens_used = 0

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.window_s:
            self.tokens_used -= self.entries.popleft()[1]

    def try_admit(self, now: float, prompt_tokens: int) -> float | None:
        """Record the request and return None, or return seconds until it would fit."""
        self._expire(now)
        waits: list[float] = []
        if self.req_cap and len(self.entries) >= self.req_cap:
            waits.append(self.entries[len(self.entries) - self.req_cap][0] + self.window_s - now)
        if self.tok_cap and self.entries and self.tokens_used + prompt_tokens > self.tok_cap:
            # A request larger than a whole window's budget is admitted into an empty window.
            excess, freed = self.tokens_used + prompt_tokens - self.tok_cap, 0
            for at, n in self.entries:
                freed += n
                if freed >= excess:
                    waits.append(at + self.window_s - now)
                    break
            else:
                waits.append(self.entries[-1][0] + self.window_s - now)
        if waits:
            return max(0.001, max(waits))
        self.entries.append((now, prompt_tokens))
        self.tokens_used += prompt_tokens
        return None

    def headers(self, now: float) -> dict[str, str]:
        if not self.req_cap:
            return {}
        self._expire(now)
        return {
            "x-ratelimit-limit-requests": str(self.req_cap),
            "x-ratelimit-remaining-requests": str(max(0, self.req_cap - len(self.entries))),
        }


def retry_after(seconds: float) -> str:
    return f"{max(0.001, seconds):.3f}"


# ----------------------------------------------------------------------------- socket-level faults

TransportLookup = Callable[[Scope], "asyncio.Transport | None"]


async def _wait_disconnect(receive: Receive, timeout: float = 2.0) -> None:
    """Wait until the server has seen the connection go, so it adds no 500 of its own."""
    with anyio.move_on_after(timeout):
        while (await receive())["type"] != "http.disconnect":
            pass


class DroppedResponse(Response):
    """Ends the exchange at the socket: reset before any byte, or a body cut short.

    Needs the connection's transport (SimServer provides the lookup); without one it raises,
    and the ASGI server then answers 500 or closes the connection itself.
    """

    def __init__(self, lookup: TransportLookup | None, full: bytes | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=200, headers=headers, media_type="application/json")
        self.lookup, self.full = lookup, full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = self.lookup(scope) if self.lookup else None
        if self.full is not None:
            headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
            headers.append((b"content-length", str(len(self.full)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            part = self.full[: len(self.full) // 2]
            await send({"type": "http.response.body", "body": part, "more_body": True})
        if transport is None:
            raise RuntimeError("simulated connection drop: no transport to drop")
        if self.full is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # linger 0: the close sends RST, as a dropped connection does
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()  # flushes the partial body, then FIN
        await _wait_disconnect(receive)


def uvicorn_transport_lookup(server: uvicorn.Server) -> TransportLookup:
    """Find a request's connection among the uvicorn server's (by the client's address)."""

    def lookup(scope: Scope) -> asyncio.Transport | None:
        client = tuple(scope.get("client") or ())
        for conn in list(server.server_state.connections):
            if getattr(conn, "client", None) == client:
                return getattr(conn, "transport", None)
        return None

    return lookup


# ----------------------------------------------------------------------------- the simulator

NON_JSON_BODY = (
    b"<html><head><title>502 Bad Gateway</title></head><body>"
    b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


class Simulator:
    """The ASGI app and its state (ledger, stats, windows, balance); no threads of its own."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.ledger: list[LedgerEntry] = []
        self.stats: dict[str, int] = {}
        self.balance = settings.balance_credits
        self.window = SlidingWindow(settings.rpm, settings.tpm, settings.window_s)
        self.in_flight = 0
        self.closing = False  # set on shutdown: slow answers stop waiting
        self.transport_lookup: TransportLookup | None = None
        self._fault_rng = random.Random(settings.seed)
        self._latency_rng = random.Random(settings.seed + 1)
        self._id_rng = random.Random()  # ids unique across simulator instances
        chat = self.chat_completions
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/chat/completions", chat, methods=["POST"]),
                Route("/v1/billing/balance", self.billing_balance, methods=["GET"]),
                Route("/_sim/ledger", self.ledger_view, methods=["GET"]),
                Route("/_sim/reset", self.reset, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # --- bookkeeping

    def count(self, outcome: str) -> None:
        self.stats[outcome] = self.stats.get(outcome, 0) + 1

    def totals(self) -> dict[str, Any]:
        entries = list(self.ledger)
        return {
            "credits": math.fsum(e.credits for e in entries),
            "credits_delivered": math.fsum(e.credits for e in entries if e.delivered),
            "usd": math.fsum(e.usd for e in entries),
            "requests": len(entries),
        }

    def bill(self, response_id: str, checked: Checked, completion: int, *, delivered: bool,
             fault: str | None) -> tuple[float, float]:
        """Charge one request: ledger entry and balance; returns (credits, usd)."""
        s = self.settings
        credits = round(
            checked.prompt_tokens * s.credits_per_prompt_token
            + completion * s.credits_per_completion_token,
            4,
        )
        usd = round(credits / CREDITS_PER_USD, 10)
        self.ledger.append(LedgerEntry(
            response_id=response_id, content_sha256=checked.digest,
            prompt_tokens=checked.prompt_tokens, completion_tokens=completion,
            credits=credits, usd=usd, delivered=delivered, status_code=200,
            fault=fault, at=time.time(),
        ))
        if self.balance is not None:
            self.balance -= credits
        return credits, usd

    def new_id(self) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "chatcmpl-" + "".join(self._id_rng.choices(alphabet, k=24))

    # --- checks in front of the model

    def authorized(self, request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and key.strip() == self.settings.api_key

    async def validate(self, request: Request) -> Checked:
        """Parse and check the body (400 on anything wrong); media decoded off the loop."""
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise bad_request("Request body is not valid JSON") from None
        messages = check_structure(body, self.settings)
        has_media = any(
            isinstance(m.get("content"), list)
            and any(p.get("type") in ("image_url", "file") for p in m["content"])
            for m in messages
        )
        if has_media:
            digest, images, pages = await anyio.to_thread.run_sync(inspect_media, messages)
        else:
            digest, images, pages = content_sha256(messages), [], 0
        limits = [int(body[k]) for k in ("max_tokens", "max_completion_tokens") if k in body]
        return Checked(
            body=body, messages=messages, digest=digest,
            prompt_tokens=tokens.prompt_tokens(tokens.text_chars(messages), images, pages),
            schema=answer_schema(body, messages), max_tokens=min(limits) if limits else None,
        )

    def admit(self, prompt_tokens: int) -> None:
        """RPM/TPM sliding window: record the request or raise 429 (rejections not recorded)."""
        now = time.monotonic()
        wait = self.window.try_admit(now, prompt_tokens)
        if wait is not None:
            headers = {"Retry-After": retry_after(wait), **self.window.headers(now)}
            raise ApiError(429, "Too many requests: rate limit exceeded, retry later",
                           "rate_limited", headers)

    def draw_fault(self) -> str | None:
        rates = self.settings.faults
        for kind in FAULT_KINDS:
            rate = getattr(rates, kind)
            if rate > 0 and self._fault_rng.random() < rate:
                return kind
        return None

    def fault_error(self, fault: str) -> ApiError:
        """The error answer of the rate_limited and server_error faults (not billed)."""
        if fault == "rate_limited":
            wait = min(1.0, self.settings.window_s / 60) * self._fault_rng.uniform(0.5, 2.0)
            return ApiError(429, "Too many requests: the provider is busy, retry later",
                            "fault_rate_limited", {"Retry-After": retry_after(wait)})
        status = self._fault_rng.choice((500, 502, 503, 504))
        return ApiError(status, "Upstream provider error, please retry", "server_error")

    async def pause(self) -> None:
        s = self.settings
        delay = s.latency_s + s.latency_jitter_s * self._latency_rng.random()
        if delay > 0:
            await asyncio.sleep(delay)

    async def wait_slow(self, request: Request) -> bool:
        """Sleep slow_s (or until the client leaves); True if the client is still there.

        Approximation: delivery is judged by `is_disconnected()` just before sending, which
        sees a client that closed its socket but not bytes lost after the send.
        """
        deadline = time.monotonic() + self.settings.slow_s
        while (left := deadline - time.monotonic()) > 0 and not self.closing:
            await asyncio.sleep(min(0.05, left))
            if await request.is_disconnected():
                return False
        return not await request.is_disconnected()

    # --- endpoints

    async def chat_completions(self, request: Request) -> Response:
        self.count("requests")
        try:
            if not self.authorized(request):
                raise ApiError(401, "Unauthorized: invalid or missing API key", "unauthorized")
            if self.balance is not None and self.balance <= 0:
                raise ApiError(403, "You've run out of credits. Please top up your balance "
                               "to continue: https://aimlapi.com/app/billing", "out_of_credits")
            cap = self.settings.max_concurrency
            if cap and self.in_flight >= cap:
                wait = self.settings.latency_s + self.settings.latency_jitter_s / 2
                raise ApiError(429, f"Too many concurrent requests (limit {cap})",
                               "rate_limited", {"Retry-After": retry_after(max(0.01, wait))})
            self.in_flight += 1
            try:
                return await self.answer(request)
            finally:
                self.in_flight -= 1
        except ApiError as exc:
            self.count(exc.outcome)
            return error_response(exc.status, exc.message, request.url.path, exc.headers)

    async def answer(self, request: Request) -> Response:
        """Validate, admit, draw a fault, wait, then answer and bill."""
        checked = await self.validate(request)
        self.admit(checked.prompt_tokens)
        fault = self.draw_fault()
        if fault == "rate_limited":  # a busy provider answers at once
            raise self.fault_error(fault)
        delivered = True
        if fault == "slow":
            delivered = await self.wait_slow(request)
        else:
            await self.pause()
        if fault == "server_error":
            raise self.fault_error(fault)
        headers = self.window.headers(time.monotonic())
        if fault == "reset":
            self.count("reset")
            return DroppedResponse(self.transport_lookup)
        if fault == "non_json":
            self.count("non_json")
            return Response(NON_JSON_BODY, 200, headers, media_type="text/html")
        body = self.completion(checked, fault, delivered=delivered and fault != "truncated")
        self.count(fault or "ok")
        if fault == "truncated":
            return DroppedResponse(self.transport_lookup, self._render(body), headers)
        return JSONResponse(body, headers=headers)

    @staticmethod
    def _render(body: dict[str, Any]) -> bytes:
        return JSONResponse(body).body

    def completion(self, checked: Checked, fault: str | None, *, delivered: bool) -> dict[str, Any]:
        """The 200 body of the vendor's response schema; bills the request."""
        content, finish = compose_answer(checked, fault)
        completion = tokens.completion_tokens(content)
        response_id = self.new_id()
        credits, usd = self.bill(response_id, checked, completion, delivered=delivered, fault=fault)
        meta_usage: dict[str, float] = {"credits_used": credits}
        if self.settings.send_usd:
            meta_usage["usd_spent"] = usd
        return {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": checked.body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": finish,
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": checked.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": checked.prompt_tokens + completion,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "meta": {"usage": meta_usage},
        }

    async def billing_balance(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_response(401, "Unauthorized: invalid or missing API key", request.url.path)
        balance = UNLIMITED_BALANCE if self.balance is None else self.balance
        exhausted = balance <= 0
        return JSONResponse({
            "balance": balance,
            "lowBalance": balance < LOW_BALANCE_THRESHOLD,
            "lowBalanceThreshold": LOW_BALANCE_THRESHOLD,
            "lastUpdated": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "autoDebitStatus": "disabled",
            "status": "exhausted" if exhausted else "current",
            "statusExplanation": "Balance is exhausted: top up to continue" if exhausted
            else "Balance is current and up to date",
        })

    async def ledger_view(self, request: Request) -> Response:
        return JSONResponse({
            "entries": [asdict(e) for e in list(self.ledger)],
            "totals": self.totals(),
            "stats": dict(self.stats),
        })

    async def reset(self, request: Request) -> Response:
        self.ledger.clear()
        self.stats.clear()
        return JSONResponse({"ok": True})

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = "Not found" if status == 404 else str(getattr(exc, "detail", "error"))
        path = request.url.path
        return error_response(status, f"{message}: {request.method} {path}", path)


# ----------------------------------------------------------------------------- running it


def _uvicorn_config(sim: Simulator, host: str, port: int, *, quiet: bool) -> uvicorn.Config:
    return uvicorn.Config(
        sim.app,
        host=host,
        port=port,
        http="h11",
        loop="asyncio",
        lifespan="off",
        access_log=False,
        # In-process: leave the host program's logging alone, show only warnings and errors.
        log_config=None if quiet else LOGGING_CONFIG,
        log_level="warning" if quiet else "info",
        timeout_graceful_shutdown=2,
    )


class SimServer:
    """Runs a Simulator under uvicorn in a background thread (tests, demo, benchmarks)."""

    def __init__(self, settings: SimSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = Simulator(settings)
        self.host, self.port = host, port
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SimServer:
        # Bind here so that port 0 resolves to a real port before the thread starts. The
        # explicit IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when
        # the proto is TCP, and without it every answer waits ~40 ms on Nagle + delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(_uvicorn_config(self.simulator, self.host, self.port, quiet=True))
        self.simulator.transport_lookup = uvicorn_transport_lookup(server)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"sim-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"simulator failed to start on {self.host}:{self.port}")
            time.sleep(0.002)
        self.url = f"http://{self.host}:{self.port}/v1"
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self.simulator.closing = True
        self._server.should_exit = True
        self._thread.join(timeout=15)
        if self._thread.is_alive():
            log.warning("simulator thread on port %s did not stop in time", self.port)
        self._server = self._thread = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(settings: SimSettings, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the simulator in the foreground until interrupted (`ernie-batch sim`)."""
    sim = Simulator(settings)
    server = uvicorn.Server(_uvicorn_config(sim, host, port, quiet=False))
    sim.transport_lookup = uvicorn_transport_lookup(server)
    server.run()
