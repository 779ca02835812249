"""Prompt-token estimates, shared by the rate limiter, `plan` and the simulator's billing.

The vendor publishes no tokenizer for ERNIE 4.5 VL. These are the documented rules of thumb
the simulator bills by, and the pipeline corrects its estimates from each response's `usage`:
text ~ 4 characters a token; an image one token per 28x28-pixel patch (ERNIE's ViT patch
size) plus 8 for its frame; a PDF page as an image of 1288 px on its longer side. An answer
is guessed from its schema (`answer_tokens`) until the output's history says better.
"""

from __future__ import annotations

import math
from typing import Any

PATCH = 28
PDF_PAGE_TOKENS = math.ceil(1288 * 1000 / (PATCH * PATCH)) + 8  # a letter-size page at 1288 px


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def image_tokens(width: int, height: int) -> int:
    return math.ceil(width / PATCH) * math.ceil(height / PATCH) + 8


def text_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in all messages (string contents and text parts)."""
    total = 0
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if p.get("type") == "text")
    return total


def prompt_tokens(chars: int, images: list[tuple[int, int]], pdf_pages: int) -> int:
    """Estimated prompt tokens for a request with this much text, these images, these PDF pages."""
    return (
        math.ceil(chars / 4)
        + sum(image_tokens(w, h) for w, h in images)
        + pdf_pages * PDF_PAGE_TOKENS
    )


def completion_tokens(text: str) -> int:
    return max(1, text_tokens(text))


# a typical answer's value sizes, characters as JSON: what `answer_tokens` assumes
TYPICAL_STRING = 16  # a short value, quotes included: a name, a title, a keyword
TYPICAL_ITEMS = 2  # items of an array without minItems/maxItems saying otherwise
_SCALAR = {"number": 7, "integer": 4, "boolean": 5, "null": 4}
_FORMATS = {"date": 12, "date-time": 22, "time": 10, "email": 24, "uri": 32, "uuid": 38}


def answer_tokens(schema: Any) -> int:
    """Estimated completion tokens of a compact JSON answer of `schema`: every property
    present, strings of a typical length, arrays of a typical count. A first guess only:
    `plan` replaces it with the completion tokens earlier runs were billed."""
    return max(1, math.ceil(_json_chars(schema, schema, 0) / 4))


def _json_chars(schema: Any, root: Any, depth: int) -> int:
    if not isinstance(schema, dict) or depth > 8:
        return TYPICAL_STRING
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and isinstance(root, dict):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _json_chars(target, root, depth + 1)
    if "const" in schema:
        return len(str(schema["const"])) + 2
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        values = schema["enum"]
        return math.ceil(sum(len(str(v)) + 2 for v in values) / len(values))
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _json_chars(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        return 2 + sum(len(name) + 4 + _json_chars(sub, root, depth + 1)
                       for name, sub in props.items())
    if kind == "array" or "items" in schema:
        count = TYPICAL_ITEMS
        if isinstance(schema.get("minItems"), int):
            count = max(count, schema["minItems"])
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        return 2 + count * (_json_chars(schema.get("items", {}), root, depth + 1) + 1)
    if kind in _SCALAR:
        return _SCALAR[kind]
    size = _FORMATS.get(schema.get("format"), TYPICAL_STRING)
    limit = schema.get("maxLength")
    return min(size, limit + 2) if isinstance(limit, int) else size
