"""Whether an answered value is right, by the field's schema type: pure functions, no I/O.

- strings: Unicode NFKC, case and whitespace normalised, then equal;
- numbers: within a relative tolerance of the label (`[eval] tolerances`, dotted names
  for values inside lists of objects, default 0.5 %); a label of 0 needs exactly 0;
- dates (`format: date` or `date-time`, or a label that is an ISO date): equal as dates,
  whatever the answer's notation (ISO, `2 November 2026`, `02.11.2026`);
- lists of values: equal as sets after normalisation (precision and recall from `overlap`);
  lists of objects: equal item by item, in order;
- objects: every key the label names right (keys it leaves out are not scored);
- booleans and enums: exactly equal;
- null: right only against null.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from ernie_batch.answers.evidence import schema_type

# notations of a whole date besides ISO; none with slashes (day and month order is ambiguous)
DATE_FORMATS = ("%d.%m.%Y", "%d %B %Y", "%d %b %Y", "%B %d, %Y", "%b %d, %Y", "%B %d %Y",
                "%d. %B %Y", "%Y/%m/%d")


class Kind(StrEnum):
    STRING = "string"
    NUMBER = "number"
    DATE = "date"
    BOOLEAN = "boolean"
    ENUM = "enum"
    LIST = "list"
    OBJECT = "object"


@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances of number fields by dotted name, and the default for the rest."""

    by_field: Mapping[str, float]
    default: float = 0.005

    def of(self, path: str) -> float:
        return self.by_field.get(path, self.default)


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def as_date(value: Any) -> date | None:
    """The date a string names, None when it names no whole date."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    for parse in (date.fromisoformat, lambda t: datetime.fromisoformat(t).date()):
        try:
            return parse(text)
        except ValueError:
            pass
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            pass
    return None


def _is_iso_date(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(date.fromisoformat(value))
    except ValueError:
        return False


def kind_of(schema: Mapping[str, Any], expected: Any) -> Kind:
    """How a value is compared: by the schema, else (no type given) by the label's value."""
    if isinstance(schema.get("enum"), list):
        return Kind.ENUM
    kind = schema_type(schema)
    if kind is None:  # the schema does not say (or has no such field): the label's value does
        kind = ("boolean" if isinstance(expected, bool) else
                "number" if isinstance(expected, int | float) else
                "array" if isinstance(expected, list) else
                "object" if isinstance(expected, dict) else "string")
    if kind == "string" and (schema.get("format") in ("date", "date-time")
                             or _is_iso_date(expected)):
        return Kind.DATE
    return {"boolean": Kind.BOOLEAN, "number": Kind.NUMBER, "integer": Kind.NUMBER,
            "array": Kind.LIST, "object": Kind.OBJECT}.get(kind, Kind.STRING)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def correct(expected: Any, got: Any, schema: Mapping[str, Any], path: str,
            tol: Tolerances) -> bool:
    """Whether `got` is right for the label `expected` of the field at `path`."""
    if expected is None or got is None:
        return expected is None and got is None
    kind = kind_of(schema, expected)
    if kind in (Kind.ENUM, Kind.BOOLEAN):
        return type(got) is type(expected) and got == expected
    if kind == Kind.NUMBER:
        want, have = _number(expected), _number(got)
        return want is not None and have is not None and abs(have - want) <= tol.of(path) * abs(want)
    if kind == Kind.DATE:
        want_d = as_date(expected)
        return want_d is not None and as_date(got) == want_d
    if kind == Kind.STRING:
        return isinstance(got, str) and isinstance(expected, str) and normalise(got) == normalise(expected)
    if kind == Kind.OBJECT:
        props = schema.get("properties") or {}
        return isinstance(got, dict) and isinstance(expected, dict) and all(
            correct(v, got.get(k), props.get(k, {}), f"{path}.{k}", tol) for k, v in expected.items())
    if not isinstance(got, list) or not isinstance(expected, list):
        return False
    items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
    same = _same(items, path, tol)
    if _of_objects(items, expected):
        return len(got) == len(expected) and all(same(e, g) for e, g in zip(expected, got, strict=True))
    want, have = _distinct(expected, same), _distinct(got, same)
    return len(want) == len(have) == _matched(want, have, same)


def overlap(expected: Any, got: Any, schema: Mapping[str, Any], path: str,
            tol: Tolerances) -> tuple[int, int, int]:
    """(items matched, items answered, items labelled) of a list field, distinct items each
    (a missing list counts as empty): the sums give precision and recall."""
    want = expected if isinstance(expected, list) else []
    have = got if isinstance(got, list) else []
    items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
    same = _same(items, path, tol)
    if not _of_objects(items, want):
        want, have = _distinct(want, same), _distinct(have, same)
    return _matched(want, have, same), len(have), len(want)


def _same(items: Mapping[str, Any], path: str, tol: Tolerances) -> Callable[[Any, Any], bool]:
    return lambda e, g: correct(e, g, items, path, tol)


def _of_objects(items: Mapping[str, Any], values: list[Any]) -> bool:
    return schema_type(items) == "object" or any(isinstance(v, dict) for v in values)


def _distinct(values: list[Any], same: Callable[[Any, Any], bool]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if not any(same(value, kept) for kept in out):
            out.append(value)
    return out


def _matched(want: list[Any], have: list[Any], same: Callable[[Any, Any], bool]) -> int:
    """Items of `want` paired with an item of `have` (each used once), greedily."""
    free = list(have)
    n = 0
    for item in want:
        hit = next((i for i, g in enumerate(free) if same(item, g)), None)
        if hit is not None:
            free.pop(hit)
            n += 1
    return n
