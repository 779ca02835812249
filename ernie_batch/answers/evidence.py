"""Evidence, the request side: which fields are asked for a quote, how, and what came back.

`[prompt] evidence = true` asks the model for `{"answer": <the user's schema>, "evidence":
{FIELD_PATH: quote or null}}`. Field paths name the answer's leaves: `title`, `address.city`,
`line_items[0].amount`, `keywords[2]`. A field is *checkable* when its value is expected to
stand on the page as written: strings, numbers and integers, not enums or constants, not
booleans, not free text (a string allowed 200 characters or more: summaries), and not when the
schema marks it (or a property above it) `"x-evidence": false`; `"x-evidence": true` makes
a field checkable whatever it is, `"x-evidence": "case-sensitive"` too, with case compared.

In `json_schema` mode the evidence object's properties are generated from the schema, one
per checkable path (strict mode forbids `additionalProperties`); an array's items are named
up to its `maxItems`, at most `EVIDENCE_ITEMS`. Without strict mode, any path is allowed
beyond those. In the text modes the same object is asked for in words beside the schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

EVIDENCE_ITEMS = 20  # array items named in the requested evidence schema (strict mode)
FREE_TEXT_CHARS = 200  # a string allowed this many characters is free text: not checked
ITEMS_GUESS = 3  # array items `plan` expects a page to list, per array of the schema
QUOTE_TOKENS = 8  # a short quote, as `plan` counts it

INSTRUCTION = (
    "Beside the answer, give evidence: for each field path (e.g. `title`, "
    "`line_items[0].amount`) the shortest exact text of the page that shows its value, "
    "copied character for character, or null when the page does not show it."
)
WRAPPER_INSTRUCTION = (
    'Answer with one JSON object only: {"answer": <an object following this JSON Schema>, '
    '"evidence": {<field path>: <quote or null>, ...}}\n```json\n{}\n```'
)


@dataclass(frozen=True, slots=True)
class Leaf:
    """One scalar of an answer (or of a schema), where it stands and what the schema says."""

    path: str
    value: Any
    schema: Mapping[str, Any]
    mode: str | None  # "plain", "case-sensitive", or None: not checked


def _resolve(schema: Any, root: Mapping[str, Any]) -> Mapping[str, Any]:
    """A subschema with a local `$ref` followed, a union reduced to its first non-null branch."""
    for _ in range(8):
        if not isinstance(schema, Mapping):
            return {}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            node: Any = root
            for token in ref[2:].split("/"):
                node = node.get(token.replace("~1", "/").replace("~0", "~")) if isinstance(
                    node, Mapping) else None
            schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **(node or {})}
            continue
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list):
                real = [b for b in branches if isinstance(b, Mapping) and b.get("type") != "null"]
                if real:
                    schema = {**{k: v for k, v in schema.items() if k != key}, **real[0]}
                    break
        else:
            return schema
    return schema


def schema_type(schema: Mapping[str, Any]) -> str | None:
    """A JSON schema's one type, "null" aside (["number", "null"] is "number"); None if none."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else None


def _mode(schema: Mapping[str, Any], inherited: bool) -> str | None:
    """How a scalar field is checked by its schema alone (None: not checked)."""
    flag = schema.get("x-evidence")
    if flag is False or inherited:
        return None
    if flag == "case-sensitive":
        return "case-sensitive"
    if flag is True:
        return "plain"
    if "enum" in schema or "const" in schema or schema_type(schema) == "boolean":
        return None
    max_len = schema.get("maxLength")
    if schema_type(schema) == "string" and isinstance(max_len, int) and max_len >= FREE_TEXT_CHARS:
        return None
    return "plain"


def leaves(value: Any, schema: Mapping[str, Any]) -> Iterator[Leaf]:
    """Every scalar of an answer with its path and how it is checked (None: not checked):
    empty values, booleans and values of unchecked fields are not."""
    seen: dict[int, tuple[Mapping[str, Any], bool]] = {}  # a subschema resolved once per answer
    return _leaves(value, schema, schema, "", False, seen)


def _leaves(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any], path: str, off: bool,
            seen: dict[int, tuple[Mapping[str, Any], bool]]) -> Iterator[Leaf]:
    hit = seen.get(id(schema))
    if hit is None:
        resolved = _resolve(schema, root)
        hit = seen[id(schema)] = (resolved, resolved.get("x-evidence") is False)
    schema, off = hit[0], off or hit[1]
    if type(value) is dict:  # answers are decoded JSON: a dict check, not the Mapping ABC's
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        for key, sub in value.items():
            yield from _leaves(sub, props.get(key, _EMPTY), root, f"{path}.{key}" if path else key,
                               off, seen)
    elif type(value) is list:
        items = schema.get("items")
        items = items if isinstance(items, dict) else _EMPTY
        for i, sub in enumerate(value):
            yield from _leaves(sub, items, root, f"{path}[{i}]", off, seen)
    else:
        empty = value is None or value == "" or isinstance(value, bool)
        yield Leaf(path, value, schema, None if empty else _mode(schema, off))


_EMPTY: Mapping[str, Any] = {}


def request_paths(schema: Mapping[str, Any], items: int = EVIDENCE_ITEMS,
                  root: Mapping[str, Any] | None = None, path: str = "",
                  depth: int = 0) -> list[tuple[str, bool]]:
    """The checkable paths a schema can produce, with whether each is always there (no array
    index on the way): what the evidence object is asked to name."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if schema.get("x-evidence") is False or depth > 6:
        return []
    kind = schema_type(schema)
    if kind == "object" or isinstance(schema.get("properties"), Mapping):
        props = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
        return [p for key, sub in props.items()
                for p in request_paths(sub, items, root, f"{path}.{key}" if path else key,
                                       depth + 1)]
    if kind == "array":
        sub = schema.get("items") if isinstance(schema.get("items"), Mapping) else {}
        max_items = schema.get("maxItems")
        n = min(items, max_items) if isinstance(max_items, int) else items
        return [(p, False) for i in range(n)
                for p, _ in request_paths(sub, items, root, f"{path}[{i}]", depth + 1)]
    return [(path, depth <= 1)] if _mode(schema, False) is not None else []


def evidence_schema(schema: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    """The requested `evidence` object: one property per checkable path."""
    quote = {"type": ["string", "null"]}
    paths = request_paths(schema)
    return {
        "type": "object",
        "description": INSTRUCTION,
        "properties": {p: quote for p, _ in paths},
        "required": [p for p, always in paths if always],
        "additionalProperties": False if strict else quote,
    }


def wrapper_schema(sent: Mapping[str, Any], schema: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    """What `json_schema` mode sends: the user's schema as `answer`, the evidence beside it."""
    return {"type": "object",
            "properties": {"answer": sent, "evidence": evidence_schema(schema, strict)},
            "required": ["answer", "evidence"], "additionalProperties": False}


def text_instruction(sent: Mapping[str, Any]) -> str:
    """The text modes' schema instruction: the wrapper in words, the user's schema fenced."""
    return WRAPPER_INSTRUCTION.replace("{}", json.dumps(sent, indent=1)) + "\n" + INSTRUCTION


def candidates(value: Any) -> list[tuple[Any, Any]]:
    """(answer, evidence) readings of a response, most likely first: the wrapper asked for, the
    answer's fields with `evidence` beside them, the whole value with no evidence."""
    out: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        if isinstance(value.get("answer"), dict) and set(value) <= {"answer", "evidence"}:
            out.append((value["answer"], value.get("evidence")))
        if "evidence" in value:
            out.append(({k: v for k, v in value.items() if k != "evidence"}, value["evidence"]))
    out.append((value, None))
    return out


def quotes_of(evidence: Any) -> dict[str, str | None]:
    """The evidence object as path -> quote; anything malformed counts as no quote."""
    if not isinstance(evidence, Mapping):
        return {}
    out: dict[str, str | None] = {}
    for path, quote in evidence.items():
        if isinstance(quote, str):
            out[str(path)] = quote
        elif isinstance(quote, int | float) and not isinstance(quote, bool):
            out[str(path)] = str(quote)
        else:
            out[str(path)] = None
    return out


def extra_completion_tokens(schema: Mapping[str, Any]) -> int:
    """Completion tokens evidence adds to one answer, as `plan` counts them: per checkable
    path (each array taken at `ITEMS_GUESS` items), its JSON key and a short quote."""
    paths = request_paths(schema, items=ITEMS_GUESS)
    chars = sum(len(json.dumps(p)) + 2 for p, _ in paths) + len('"evidence":{}')
    return math.ceil(chars / 4) + QUOTE_TOKENS * len(paths)
