"""Answer generation: JSON that satisfies the requested schema, derived from the request's digest.

Answers are derived from the digest of the request's media (`content_sha256`) and nothing
else, so a test can tell which page an answer belongs to; a test may script the answer of
a digest instead (`SimSettings.scripted`). The schema is the request's
json_schema, else a JSON Schema fenced in its prompt, else the pipeline's default. The
faults that spoil a billed answer (invalid_answer, fenced, length) are applied here too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from typing import Any

from ernie_batch.api import tokens
from ernie_batch.config import DEFAULT_SCHEMA
from ernie_batch.sim.validation import Checked, is_number

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


# DEFAULT_SCHEMA is used when the request names no schema at all (no json_schema, no fenced
# schema in the prompt): the pipeline's own default.
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
    if is_number(xlo) and (lo is None or xlo >= lo):
        lo, lo_open = xlo, True
    if is_number(xhi) and (hi is None or xhi <= hi):
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


def compose_answer(checked: Checked, fault: str | None, scripted: Any = None) -> tuple[str, str]:
    """(content, finish_reason) for a billed answer (`scripted`, else generated), faults and
    max_tokens applied."""
    value = generate_value(checked.schema, checked.digest) if scripted is None else scripted
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
