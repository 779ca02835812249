"""Answer extraction, validation and typed columns (pure functions)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ernie_batch.answers.judge import answer_columns, answer_fields, extract_json, judge

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "total": {"type": ["number", "null"]},
        "pages": {"type": "integer"},
        "paid": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    "required": ["title"],
}


@pytest.mark.parametrize("text", [
    '{"title": "a"}',
    '```json\n{"title": "a"}\n```',
    'Sure! Here is the JSON:\n```\n{"title": "a"}\n```\nAnything else?',
    'The answer is {"title": "a"} as requested.',
])
def test_extract_json_copes_with_fences_and_prose(text):
    assert extract_json(text) == {"title": "a"}


def test_extract_json_without_json_raises():
    with pytest.raises(ValueError, match="no JSON"):
        extract_json("I cannot read this page.")


def test_judge_accepts_valid_and_says_why_not():
    assert judge('{"title": "x"}', "stop", SCHEMA).value == {"title": "x"}
    missing = judge('{"total": 3}', "stop", SCHEMA)
    assert missing.value is None and "'title' is a required property" in missing.error
    wrong = judge('{"title": "x", "pages": "two"}', "stop", SCHEMA)
    assert "at pages" in wrong.error
    cut = judge('{"title": "x"', "length", SCHEMA)
    assert cut.value is None and "finish_reason=length" in cut.error
    assert judge("", "stop", SCHEMA).error == "empty answer"


def test_columns_follow_the_schema_not_the_data():
    fields = answer_fields(SCHEMA)
    types = {f.name: f.type for f in fields}
    assert types == {
        "answer_title": pa.string(), "answer_total": pa.float64(), "answer_pages": pa.int64(),
        "answer_paid": pa.bool_(), "answer_tags": pa.list_(pa.string()),
        "answer_address": pa.string(),
    }
    row = answer_columns({"title": "t", "total": 3, "pages": 2, "paid": True, "tags": ["a"],
                          "address": {"city": "Oslo"}}, fields)
    assert row == {"answer_title": "t", "answer_total": 3.0, "answer_pages": 2,
                   "answer_paid": True, "answer_tags": ["a"],
                   "answer_address": '{"city": "Oslo"}'}
    empty = answer_columns(None, fields)
    assert set(empty.values()) == {None}
    # an all-null column still has its schema type, not Arrow's null type
    table = pa.Table.from_pylist([empty], schema=pa.schema(fields))
    assert table.schema.field("answer_total").type == pa.float64()
