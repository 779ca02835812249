"""From the model's text to a validated answer and typed `answer_<field>` columns.

Whether this model honours `json_schema` is not documented, so every answer is extracted
(code fences, prose around it) and validated here. Column types come from the JSON
Schema, never from the data, so rows of every prompt version read together (a type that
changes between versions: `store.evolve`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from jsonschema import Draft202012Validator

from ernie_batch.answers.evidence import candidates as evidence_candidates
from ernie_batch.answers.evidence import quotes_of

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Verdict:
    value: dict[str, Any] | None  # the validated answer
    error: str | None  # one line when invalid
    quotes: dict[str, str | None] | None = None  # evidence asked for: field path -> quote


def extract_json(text: str) -> Any:
    """The first JSON value in `text`: the whole text, a fenced block, or the first {...} in prose."""
    text = text.strip()
    candidates = [text, *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
            return value
        except ValueError:
            continue
    raise ValueError("no JSON found in the answer")


_VALIDATORS: dict[int, tuple[dict[str, Any], Draft202012Validator]] = {}


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    """One validator per schema object (a job's schema is a frozen value, judged per answer)."""
    hit = _VALIDATORS.get(id(schema))
    if hit is None or hit[0] is not schema:  # the entry keeps its schema alive: ids stay unique
        if len(_VALIDATORS) >= 8:
            _VALIDATORS.clear()
        hit = _VALIDATORS[id(schema)] = (schema, Draft202012Validator(schema))
    return hit[1]


def judge(text: str | None, finish_reason: str | None, schema: dict[str, Any],
          evidence: bool = False) -> Verdict:
    """Valid answer or one line saying why not (cut off, no JSON, schema violation).

    With `evidence`, the answer is found beside its evidence first (`{"answer", "evidence"}`,
    or the fields with `evidence` among them) and validated alone: the user's schema needs
    no change. Malformed evidence never fails an answer; its fields then have no quote.
    """
    if finish_reason == "length":
        return Verdict(None, "answer cut off at max_tokens (finish_reason=length)")
    if not text:
        return Verdict(None, "empty answer")
    try:
        value = extract_json(text)
    except ValueError as exc:
        return Verdict(None, str(exc))
    readings = evidence_candidates(value) if evidence else [(value, None)]
    first: Verdict | None = None
    for answer, quotes in readings:
        verdict = _validate(answer, schema)
        if verdict.value is not None:
            return Verdict(verdict.value, None, quotes_of(quotes) if evidence else None)
        first = first or verdict
    assert first is not None
    return first


def _validate(value: Any, schema: dict[str, Any]) -> Verdict:
    validator = _validator(schema)
    error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return Verdict(None, f"answer does not match the schema at {where}: {error.message}"[:300])
    if not isinstance(value, dict):
        return Verdict(None, "answer is not a JSON object")
    return Verdict(value, None)


def _arrow_type(prop: dict[str, Any]) -> pa.DataType:
    kind = prop.get("type")
    if isinstance(kind, list):
        non_null = [k for k in kind if k != "null"]
        kind = non_null[0] if len(non_null) == 1 else None
    if kind == "string":
        return pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        item = prop.get("items") or {}
        item_type = _arrow_type(item) if isinstance(item, dict) else pa.string()
        return pa.list_(item_type)
    return pa.string()  # objects, unions, anything else: JSON text


def answer_fields(schema: dict[str, Any]) -> list[pa.Field]:
    """One nullable column per top-level property, named answer_<property>."""
    props = schema.get("properties") or {}
    return [pa.field(f"answer_{name}", _arrow_type(p or {})) for name, p in props.items()]


def _cell(value: Any, arrow: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(arrow):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_list(arrow):
        if not isinstance(value, list):
            return None
        return [_cell(v, arrow.value_type) for v in value]
    if pa.types.is_boolean(arrow):
        return value if isinstance(value, bool) else None
    if pa.types.is_integer(arrow):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if pa.types.is_floating(arrow):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else None
    return json.dumps(value, ensure_ascii=False)


def answer_columns(value: dict[str, Any] | None, fields: list[pa.Field]) -> dict[str, Any]:
    if value is None:
        return {f.name: None for f in fields}
    return {f.name: _cell(value.get(f.name[len("answer_"):]), f.type) for f in fields}
