"""Seeded misreads: a prompt version's scripted answers spoiled field by field at set rates.

The truth is the scripted answer of a request's media (`SimSettings.scripted`, built from
labels at test or demo time); `SimSettings.error_rates` maps a version to per-field rates, so
two prompt versions really score differently against the same truth. A request's version is
its `json_schema.name` when that is a key, else the first key whose text its prompt carries (a
marker: the text mode, the `response_format` fallback, sends no schema name). Whether a field
is spoiled is drawn from sha256(seed, media digest, field, version): a run repeats exactly,
and rates of 0 and 1 are exact. A spoiled value stays valid for the field's schema: a wrong
answer, not an invalid one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from datetime import date, timedelta
from typing import Any

from jsonschema import Draft202012Validator

from ernie_batch.sim.answers import generate_value
from ernie_batch.sim.validation import Checked

Rates = Mapping[str, Mapping[str, float]]  # version -> field -> rate


def version_of(checked: Checked, error_rates: Rates) -> str | None:
    """The key of `error_rates` this request belongs to, None when none applies."""
    rf = checked.body.get("response_format")
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict):
        name = rf["json_schema"].get("name")
        if name in error_rates:
            return name
    texts = []
    for msg in checked.messages:
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if isinstance(p, dict)]
    prompt = "\n".join(t for t in texts if isinstance(t, str))
    return next((key for key in error_rates if key in prompt), None)


def draw(seed: int, digest: str, field: str, version: str) -> float:
    """A number in [0, 1) fixed by its inputs."""
    h = hashlib.sha256(f"{seed}:{digest}:{field}:{version}".encode()).hexdigest()
    return int(h[:13], 16) / 16**13


def misread(answer: Any, checked: Checked, error_rates: Rates, seed: int = 0,
            schema: dict[str, Any] | None = None) -> Any:
    """`answer` with the fields its version misreads spoiled (unchanged when none applies);
    `schema`: the answer's, when the request's is a wrapper around it (evidence)."""
    version = version_of(checked, error_rates)
    if version is None or not isinstance(answer, dict):
        return answer
    props = (checked.schema if schema is None else schema).get("properties") or {}
    spoiled = dict(answer)
    for name, rate in error_rates[version].items():
        if name in spoiled and draw(seed, checked.digest, name, version) < rate:
            spoiled[name] = spoil(spoiled[name], props.get(name, {}), f"{checked.digest}:{name}")
    return spoiled


def spoil(value: Any, schema: Any, salt: str) -> Any:
    """A different value that `schema` still accepts (the same one when there is none)."""
    schema = schema if isinstance(schema, dict) else {}
    check = Draft202012Validator(schema)
    for candidate in _candidates(value, schema, salt):
        if candidate != value and _valid(check, candidate):
            return candidate
    return value


def _valid(check: Draft202012Validator, value: Any) -> bool:
    try:
        return check.is_valid(value)
    except Exception:  # noqa: BLE001 - an unresolvable $ref: not a candidate
        return False


def _candidates(value: Any, schema: dict[str, Any], salt: str) -> Iterator[Any]:
    """Wrong values, most plausible first: another enum member, a number off by a quarter,
    a date three days out, a list one item short (or long), a string misread."""
    enum = schema.get("enum")
    if isinstance(enum, list):
        yield from enum
    if value is None:
        yield generate_value({**schema, "type": _non_null(schema)}, salt)
    elif isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield value * 2 + 7
        yield value - 7
    elif isinstance(value, float):
        yield round(value * 1.25 + 1, 2)
        yield round(value * 0.5 - 1, 2)
    elif isinstance(value, str):
        try:
            yield (date.fromisoformat(value) + timedelta(days=3)).isoformat()
        except ValueError:
            pass
        yield f"misread {value}"
        yield value[::-1]
    elif isinstance(value, list):
        if value:
            yield value[:-1]
        yield [*value, generate_value(schema.get("items", {}), salt)]
    elif isinstance(value, dict) and value:
        first = next(iter(value))
        sub = (schema.get("properties") or {}).get(first, {})
        yield {**value, first: spoil(value[first], sub, salt)}
    yield None


def _non_null(schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if isinstance(kind, list):
        return next((k for k in kind if k != "null"), "string")
    return kind if isinstance(kind, str) and kind != "null" else "string"
