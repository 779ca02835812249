"""Merge rules: how the page answers of one document become one answer, with provenance and conflicts.

Each top-level property of the answer schema may carry `"x-merge"` (one of `MergeRule`);
without it arrays `concat` and everything else takes the `first` non-null value. Pure
functions: the input is the document's answered units (their page range and answer), in any
order; the output depends only on the pages, never on the order rows were read in.

A page reference in provenance and conflicts is the page number, or `"3-4"` for a unit
that carried several pages (`pdf.pages_per_request > 1`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ernie_batch.errors import ConfigError
from ernie_batch.vocab import MergeRule

PageRef = int | str
_NUMBERS = frozenset({"integer", "number"})


@dataclass(frozen=True, slots=True)
class PagePart:
    """One answered unit of a document: its pages and its validated answer."""

    page: int
    page_last: int
    answer: Mapping[str, Any]

    @property
    def ref(self) -> PageRef:
        return self.page if self.page == self.page_last else f"{self.page}-{self.page_last}"


@dataclass(frozen=True, slots=True)
class FieldMerge:
    """One field merged: its value, the pages it came from, and (rule `all`) the disagreement."""

    value: Any
    provenance: list[Any]  # page refs; for concat/unique one per item
    conflict: list[dict[str, Any]] | None = None  # [{"value", "pages"}] when pages disagree
    items: list[int] | None = None  # concat/unique: each item's index in its page's list


@dataclass
class MergedAnswer:
    """A whole document's answer, field by field in schema order."""

    answer: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, list[Any]] = field(default_factory=dict)
    conflicts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    items: dict[str, list[int]] = field(default_factory=dict)  # concat/unique fields' (FieldMerge)


# ---- rules from the schema


def _types(prop: Mapping[str, Any]) -> frozenset[str]:
    """The non-null JSON types a property declares (empty: not declared)."""
    kind = prop.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else []
    return frozenset(k for k in kinds if k != "null")


def _fits(rule: MergeRule, kinds: frozenset[str]) -> str | None:
    """None when `rule` suits a property of `kinds`, else what the rule needs."""
    if rule in (MergeRule.CONCAT, MergeRule.UNIQUE):
        return None if kinds == {"array"} else "an array"
    if rule == MergeRule.SUM:
        return None if kinds and kinds <= _NUMBERS else "a number or integer"
    if rule in (MergeRule.MIN, MergeRule.MAX):
        ok = (kinds and kinds <= _NUMBERS) or kinds == {"string"}
        return None if ok else "a number, integer or string"
    return None


def rules_of(schema: Mapping[str, Any]) -> dict[str, MergeRule]:
    """The merge rule of every top-level property; ConfigError naming the property otherwise."""
    rules: dict[str, MergeRule] = {}
    props = schema.get("properties") or {}
    for name, prop in props.items():
        prop = prop if isinstance(prop, Mapping) else {}
        kinds = _types(prop)
        given = prop.get("x-merge")
        if given is None:
            rules[name] = MergeRule.CONCAT if kinds == {"array"} else MergeRule.FIRST
            continue
        try:
            rule = MergeRule(given)
        except ValueError:
            known = ", ".join(r.value for r in MergeRule)
            raise ConfigError(f"properties.{name}: unknown x-merge rule {given!r} "
                              f"(known: {known})") from None
        needs = _fits(rule, kinds)
        if needs is not None:
            declared = "/".join(sorted(kinds)) or "no type"
            raise ConfigError(f"properties.{name}: x-merge {rule.value!r} needs {needs}, "
                              f"the property is {declared}")
        rules[name] = rule
    return rules


# ---- merging


def canonical(value: Any) -> str:
    """A value's identity for `all` and `unique`: JSON with sorted keys, 2.0 the same as 2."""
    return json.dumps(_plain(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def in_page_order(parts: Iterable[PagePart]) -> list[PagePart]:
    """Parts sorted by their pages (the answer's identity breaks ties: the order is total)."""
    return sorted(parts, key=lambda p: (p.page, p.page_last, canonical(dict(p.answer))))


def _present(parts: list[PagePart], name: str) -> list[tuple[PageRef, Any]]:
    return [(p.ref, p.answer.get(name)) for p in parts if p.answer.get(name) is not None]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def merge_field(name: str, rule: MergeRule, parts: list[PagePart]) -> FieldMerge:
    """One field over parts already `in_page_order`."""
    if rule in (MergeRule.CONCAT, MergeRule.UNIQUE):
        items: list[Any] = []
        refs: list[PageRef] = []
        where: list[int] = []
        seen: set[str] = set()
        for ref, value in _present(parts, name):
            for j, item in enumerate(value if isinstance(value, list) else [value]):
                if rule == MergeRule.UNIQUE:
                    ident = canonical(item)
                    if ident in seen:
                        continue
                    seen.add(ident)
                items.append(item)
                refs.append(ref)
                where.append(j)
        return FieldMerge(items, refs, items=where)
    present = _present(parts, name)
    if not present:
        return FieldMerge(None, [])
    if rule == MergeRule.FIRST:
        return FieldMerge(present[0][1], [present[0][0]])
    if rule == MergeRule.LAST:
        return FieldMerge(present[-1][1], [present[-1][0]])
    if rule == MergeRule.SUM:
        numbers = [(ref, v) for ref, v in present if _number(v)]
        if not numbers:
            return FieldMerge(None, [])
        values = [v for _, v in numbers]
        total = sum(values) if all(isinstance(v, int) for v in values) else math.fsum(values)
        return FieldMerge(total, [ref for ref, _ in numbers])
    if rule in (MergeRule.MIN, MergeRule.MAX):
        comparable = ([(ref, v) for ref, v in present if _number(v)]
                      or [(ref, v) for ref, v in present if isinstance(v, str)])
        if not comparable:
            return FieldMerge(None, [])
        best = (min if rule == MergeRule.MIN else max)(v for _, v in comparable)
        return FieldMerge(best, [next(ref for ref, v in comparable if v == best)])
    # MergeRule.ALL: every page that answers must say the same
    groups: dict[str, tuple[Any, list[PageRef]]] = {}
    for ref, value in present:
        groups.setdefault(canonical(value), (value, []))[1].append(ref)
    if len(groups) == 1:
        value, refs = next(iter(groups.values()))
        return FieldMerge(value, refs)
    conflict = [{"value": value, "pages": refs} for value, refs in groups.values()]
    return FieldMerge(None, [ref for ref, _ in present], conflict)


def merge(parts: Iterable[PagePart], rules: Mapping[str, MergeRule]) -> MergedAnswer:
    """The document's answer: every field of `rules` merged over the parts, in page order."""
    ordered = in_page_order(parts)
    out = MergedAnswer()
    for name, rule in rules.items():
        merged = merge_field(name, rule, ordered)
        out.answer[name] = merged.value
        out.provenance[name] = merged.provenance
        if merged.items is not None:
            out.items[name] = merged.items
        if merged.conflict is not None:
            out.conflicts[name] = merged.conflict
    return out
