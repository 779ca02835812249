"""Scoring by schema type, the labels file's errors, the simulator's misreads: the pure parts of eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from ernie_batch.errors import LabelsError
from ernie_batch.evaluation import Tolerances, correct, overlap, read_labels
from ernie_batch.sim.misreads import misread, spoil, version_of
from ernie_batch.sim.validation import Checked

TOL = Tolerances({"line_items.amount": 0.1}, default=0.005)
STRING, NUMBER = {"type": "string"}, {"type": ["number", "null"]}
ENUM = {"type": "string", "enum": ["invoice", "receipt"]}
ITEMS = {"type": "array", "items": {"type": "object", "properties": {
    "description": {"type": "string"}, "amount": {"type": "number"}}}}


@pytest.mark.parametrize(("expected", "got", "schema", "right"), [
    ("Rechnung Nr. 7", "  rechnung   NR. 7 ", STRING, True),  # case and whitespace
    ("ﬁle Ⅸ", "file IX", STRING, True),  # NFKC: ligature and roman numeral
    ("Invoice 7", "Invoice 8", STRING, False),
    (100.0, 100.49, NUMBER, True),  # within 0.5 %
    (100.0, 100.51, NUMBER, False),
    (0, 0.0, NUMBER, True),
    (0, 0.001, NUMBER, False),  # a label of 0 wants exactly 0
    ("2026-11-02", "2 November 2026", {"type": "string"}, True),  # the label is an ISO date
    ("2026-11-02", "02.11.2026", {"type": "string", "format": "date"}, True),
    ("2026-11-02", "2026-11-02T09:30:00", {"type": "string", "format": "date"}, True),
    ("2026-11-02", "November 2026", {"type": "string", "format": "date"}, False),  # no day
    ("invoice", "invoice", ENUM, True),
    ("invoice", "Invoice", ENUM, False),  # enums exact
    (True, 1, {"type": "boolean"}, False),  # booleans exact: 1 is no boolean
    (None, None, NUMBER, True),
    (None, 0, NUMBER, False),
    (5.5, None, NUMBER, False),
    (["Tax", "a"], ["A", "tax", "tax"], {"type": "array", "items": STRING}, True),  # sets
    (["a", "b"], ["a"], {"type": "array", "items": STRING}, False),
    ([{"description": "Paper", "amount": 24.5}], [{"description": "paper ", "amount": 26.0}],
     ITEMS, True),  # item by item; line_items.amount has its own tolerance
    ([{"description": "A", "amount": 1}, {"description": "B", "amount": 2}],
     [{"description": "B", "amount": 2}, {"description": "A", "amount": 1}], ITEMS, False),
])
def test_a_value_is_right_by_its_schema_type(expected, got, schema, right):
    assert correct(expected, got, schema, "line_items" if "items" in schema else "f", TOL) is right


def test_list_overlap_counts_distinct_items():
    schema = {"type": "array", "items": STRING}
    assert overlap(["a", "b", "c"], ["A", "a", "d"], schema, "k", TOL) == (1, 2, 3)
    assert overlap(["a"], None, schema, "k", TOL) == (0, 0, 1)


@pytest.mark.parametrize(("line", "says"), [
    ("{not json", "not JSON"),
    ('{"path": "a.png", "page": 0, "fields": {"t": 1}}', "page: a page number from 1"),
    ('{"path": "a.png", "page": 1, "fields": {}}', "fields:"),
    ('{"path": "gone.png", "page": 1, "fields": {"t": 1}}', "gone.png is not a file"),
    ('{"path": "a.png", "page": 1, "fields": {"t": 1}, "note": 1}', "unknown key 'note'"),
    ('{"path": "a.png", "page": 1, "fields": {"t": 2}}', "labelled again (first on line 1)"),
])
def test_a_bad_label_names_file_and_line(tmp_path: Path, line: str, says: str):
    (tmp_path / "a.png").write_bytes(b"x")
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"path": "a.png", "page": 1, "fields": {"t": 1}}\n\n' + line + "\n")
    with pytest.raises(LabelsError) as err:
        read_labels(labels)
    assert str(err.value).startswith(f"{labels}:3: ") and says in str(err.value)


def test_labels_select_pages_and_whole_documents(tmp_path: Path):
    for name in ("a.pdf", "b.pdf"):
        (tmp_path / name).write_bytes(b"%PDF")
    rows = [("a.pdf", 2), ("a.pdf", 5), ("b.pdf", 1), ("b.pdf", None)]
    (tmp_path / "l.jsonl").write_text("".join(
        json.dumps({"path": p, "page": n, "fields": {"t": 1}}) + "\n" for p, n in rows))
    labels = read_labels(tmp_path / "l.jsonl")
    assert labels.selection() == {str(tmp_path / "a.pdf"): {2, 5}, str(tmp_path / "b.pdf"): None}


def checked(schema_name: str | None, prompt: str, schema: dict) -> Checked:
    body: dict = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    if schema_name:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": schema_name, "schema": schema}}
    return Checked(body=body, messages=body["messages"], digest="d" * 64, prompt_tokens=1,
                   schema=schema, max_tokens=None)


def test_the_version_is_the_schema_name_else_a_marker_of_the_prompt():
    rates = {"extraction_v2": {"t": 1.0}, "STRICT-PROMPT": {"t": 1.0}}
    assert version_of(checked("extraction_v2", "hello", {}), rates) == "extraction_v2"
    assert version_of(checked("page_extraction", "a STRICT-PROMPT here", {}), rates) == "STRICT-PROMPT"
    assert version_of(checked(None, "a STRICT-PROMPT here", {}), rates) == "STRICT-PROMPT"
    assert version_of(checked(None, "plain", {}), rates) is None


def test_a_misread_stays_valid_and_is_wrong():
    from tests.test_eval import SCHEMA

    props = SCHEMA["properties"]
    truth = {"title": "Invoice", "date": "2026-11-02", "total_amount": 12.5, "keywords": ["a"],
             "paid": True}
    spoiled = misread(truth, checked("v", "", SCHEMA), {"v": {k: 1.0 for k in truth}})
    assert Draft202012Validator(SCHEMA).is_valid(spoiled)
    for name, value in truth.items():
        assert not correct(value, spoiled[name], props[name], name, TOL), name
    assert misread(truth, checked("v", "", SCHEMA), {"v": {k: 0.0 for k in truth}}) == truth
    assert spoil("invoice", ENUM, "s") == "receipt"
    assert spoil(None, NUMBER, "s") is not None
