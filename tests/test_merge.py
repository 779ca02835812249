"""Merge rules: checked against the schema at load, never part of what is sent or hashed, and the
merge functions' promises (order of rows never matters, concat keeps and unique never drops
an item), property-tested with hypothesis."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_batch.answers.merge import PagePart, canonical, merge, rules_of
from ernie_batch.answers.prompt import fingerprint
from ernie_batch.answers.template import strip_extensions
from ernie_batch.config import ConfigError, load_config
from ernie_batch.sim import SimSettings, Simulator
from ernie_batch.vocab import MergeRule
from tests.conftest import SAMPLES, TEST_KEY, job_config, run_mounted

# fingerprints computed on main before merge rules existed: outputs made then are not re-sent
DEFAULT_FINGERPRINT = "1972bfcc96d98cc143551005b89f1808d8205be4d7a9cb98f7cb658a75639a86"
NESTED = {"type": "object", "properties": {
    "x-id": {"type": "string"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "amount": {"type": ["number", "null"]}},
        "required": ["name", "amount"]}},
    "total": {"type": ["number", "null"], "enum": [1.5, {"x-a": 1}]}},
    "required": ["x-id", "items", "total"], "additionalProperties": False}
NESTED_FINGERPRINT = "0f2497e2527a05be278346be15698b39c4bc03e70ec6c6ed78fb58473a00ba89"

INVOICE = {"type": "object", "properties": {
    "invoice_number": {"type": ["string", "null"], "x-merge": "all"},
    "line_items": {"type": "array", "items": {"type": "string"}, "x-merge": "concat"},
    "total": {"type": ["number", "null"], "x-merge": "last"},
    "title": {"type": "string"}},
    "required": ["invoice_number", "line_items", "total", "title"]}


def test_fingerprints_of_schemas_without_merge_rules_are_unchanged():
    assert fingerprint(load_config(None)) == DEFAULT_FINGERPRINT
    nested = load_config(None, {"prompt.schema": NESTED})
    assert fingerprint(nested) == NESTED_FINGERPRINT
    # property names that start with x- and data under enum are kept
    assert strip_extensions(NESTED) == NESTED


def test_a_merge_rule_never_changes_the_fingerprint_nor_what_is_sent():
    plain = json.loads(json.dumps(INVOICE))
    for prop in plain["properties"].values():
        prop.pop("x-merge", None)
    ruled = load_config(None, {"prompt.schema": INVOICE})
    other = json.loads(json.dumps(INVOICE))
    other["properties"]["total"]["x-merge"] = "max"
    other["properties"]["line_items"]["x-note"] = "any x- keyword"
    fps = {fingerprint(load_config(None, {"prompt.schema": s})) for s in (plain, INVOICE, other)}
    assert len(fps) == 1
    assert ruled.resolved.sent_schema == plain
    assert ruled.resolved.merge_rules["total"] == MergeRule.LAST


class Recording:
    """The simulator's ASGI app, keeping the raw body of every chat request it receives."""

    def __init__(self, app) -> None:
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def recording():
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                self.bodies.append(b"".join(chunks))
            return message

        return await self.app(scope, recording, send)


def received_bodies(cfg) -> list[bytes]:
    app = Recording(Simulator(SimSettings(api_key=TEST_KEY)).app)
    run_mounted(cfg, app)
    return sorted(app.bodies)


@pytest.mark.parametrize("mode", ["json_schema", "text"])
def test_the_simulator_receives_byte_identical_bodies_whatever_the_rules(tmp_path, mode):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLES / "receipt-cafe-aurora.png", src)
    shutil.copy(SAMPLES / "survey-report.pdf", src)
    bodies = []
    for n, total_rule in enumerate(("last", "max")):
        schema = json.loads(json.dumps(INVOICE))
        schema["properties"]["total"]["x-merge"] = total_rule
        cfg = job_config("http://127.0.0.1:9/v1", tmp_path / f"out{n}", [src],
                         **{"prompt.schema": schema, "prompt.schema_file": None,
                            "request.response_format": mode})
        bodies.append(received_bodies(cfg))
    assert len(bodies[0]) == 5 and bodies[0] == bodies[1]
    assert b"x-merge" not in b"".join(bodies[0])


@pytest.mark.parametrize("rule, prop, says", [
    ("sometimes", {"type": "string"}, "unknown x-merge rule 'sometimes'"),
    ("sum", {"type": "string"}, "x-merge 'sum' needs a number or integer"),
    ("concat", {"type": ["number", "null"]}, "x-merge 'concat' needs an array"),
    ("unique", {"type": "string"}, "x-merge 'unique' needs an array"),
    ("max", {"type": "boolean"}, "x-merge 'max' needs a number, integer or string"),
])
def test_an_unknown_or_unfitting_rule_is_a_config_error_naming_the_property(
        tmp_path, rule, prop, says):
    schema = {"type": "object", "properties": {"ok": {"type": "string"},
                                               "amount": {**prop, "x-merge": rule}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "job.toml").write_text('[prompt]\nschema_file = "s.json"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "job.toml")
    message = str(exc.value)
    assert "job.toml" in message and "properties.amount" in message and says in message


def test_defaults_arrays_concat_everything_else_first():
    rules = rules_of({"type": "object", "properties": {
        "tags": {"type": ["array", "null"]}, "n": {"type": "integer"}, "any": {}}})
    assert rules == {"tags": MergeRule.CONCAT, "n": MergeRule.FIRST, "any": MergeRule.FIRST}


def test_each_rule_on_three_pages():
    parts = [PagePart(1, 1, {"v": 3, "s": "b", "items": ["a", "b"]}),
             PagePart(2, 2, {"v": None, "s": "b", "items": ["b", "c"]}),
             PagePart(3, 3, {"v": 5, "s": "a", "items": []})]

    def one(rule: MergeRule, name: str = "v"):
        m = merge(parts, {name: rule})
        return m.answer[name], m.provenance[name], m.conflicts.get(name)

    assert one(MergeRule.FIRST) == (3, [1], None)
    assert one(MergeRule.LAST) == (5, [3], None)
    assert one(MergeRule.SUM) == (8, [1, 3], None)
    assert one(MergeRule.MIN) == (3, [1], None)
    assert one(MergeRule.MAX, "s") == ("b", [1], None)
    assert one(MergeRule.CONCAT, "items") == (["a", "b", "b", "c"], [1, 1, 2, 2], None)
    assert one(MergeRule.UNIQUE, "items") == (["a", "b", "c"], [1, 1, 2], None)
    assert one(MergeRule.ALL, "s") == (None, [1, 2, 3], [{"value": "b", "pages": [1, 2]},
                                                         {"value": "a", "pages": [3]}])
    agreed = merge(parts[:2], {"s": MergeRule.ALL})
    assert agreed.answer["s"] == "b" and not agreed.conflicts
    # a unit of several pages is one source, named by its range
    wide = merge([PagePart(1, 2, {"v": 1}), PagePart(3, 3, {"v": 2})], {"v": MergeRule.SUM})
    assert wide.provenance["v"] == ["1-2", 3]


# ---- properties

values = st.one_of(st.none(), st.integers(-5, 5), st.sampled_from(["a", "b", "c"]))
items = st.lists(st.one_of(st.integers(0, 4), st.sampled_from(["x", "y"]),
                           st.fixed_dictionaries({"k": st.integers(0, 2)})), max_size=4)
answers = st.fixed_dictionaries({"v": values, "n": st.one_of(st.none(), st.integers(-9, 9),
                                                             st.floats(-9, 9)),
                                 "items": st.one_of(st.none(), items)})
parts_strategy = st.lists(st.builds(lambda page, width, answer: PagePart(page, page + width,
                                                                         answer),
                                    st.integers(1, 12), st.integers(0, 1), answers), max_size=8)
ALL_RULES = {"v": MergeRule.FIRST, "n": MergeRule.SUM, "items": MergeRule.CONCAT}


@settings(max_examples=200, deadline=None)
@given(parts_strategy, st.randoms(use_true_random=False),
       st.sampled_from(list(MergeRule)))
def test_the_order_of_page_rows_never_changes_the_result(parts, rng, rule):
    name = "items" if rule in (MergeRule.CONCAT, MergeRule.UNIQUE) else "n" if rule in (
        MergeRule.SUM, MergeRule.MIN, MergeRule.MAX) else "v"
    shuffled = list(parts)
    rng.shuffle(shuffled)
    assert merge(parts, {name: rule}) == merge(shuffled, {name: rule})
    assert merge(parts, ALL_RULES) == merge(shuffled, ALL_RULES)


@settings(max_examples=200, deadline=None)
@given(parts_strategy)
def test_concat_keeps_every_item_in_page_order(parts):
    merged = merge(parts, {"items": MergeRule.CONCAT})
    everything = [i for p in parts for i in (p.answer["items"] or [])]
    got = merged.answer["items"]
    assert sorted(map(canonical, got)) == sorted(map(canonical, everything))
    pages = [int(str(ref).split("-")[0]) for ref in merged.provenance["items"]]
    assert len(pages) == len(got) and pages == sorted(pages)


@settings(max_examples=200, deadline=None)
@given(parts_strategy)
def test_unique_never_drops_a_distinct_item_and_never_repeats_one(parts):
    got = merge(parts, {"items": MergeRule.UNIQUE}).answer["items"]
    distinct = {canonical(i) for p in parts for i in (p.answer["items"] or [])}
    assert {canonical(i) for i in got} == distinct
    assert len(got) == len(distinct)


@settings(max_examples=200, deadline=None)
@given(parts_strategy)
def test_sum_is_the_exact_sum_of_the_pages_values(parts):
    got = merge(parts, {"n": MergeRule.SUM}).answer["n"]
    numbers = [p.answer["n"] for p in parts if p.answer["n"] is not None]
    assert got == (math.fsum(numbers) if numbers else None)

