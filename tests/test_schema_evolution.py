"""A field added to the schema later is a new nullable column; old and new parts read together."""

from __future__ import annotations

import json
import os

import pyarrow as pa
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.engine import run_job
from ernie_batch.store import read_table
from tests.conftest import PROJECT, SAMPLES, TEST_KEY, job_config


def test_a_new_schema_field_reads_with_old_parts(sim_factory, tmp_path):
    sim = sim_factory()
    receipt = tmp_path / "in"
    receipt.mkdir()
    (receipt / "r.png").write_bytes((SAMPLES / "receipt-cafe-aurora.png").read_bytes())
    run_job(job_config(sim.url, tmp_path / "out", [receipt]), SecretStr(TEST_KEY))

    schema = json.loads((PROJECT / "configs" / "schemas" / "page.json").read_text())
    schema["properties"]["author"] = {"type": "string"}
    schema["required"].append("author")
    grown = tmp_path / "page-v2.json"
    grown.write_text(json.dumps(schema))
    run_job(job_config(sim.url, tmp_path / "out", [receipt],
                       **{"prompt.schema_file": str(grown)}), SecretStr(TEST_KEY))

    table = read_table(tmp_path / "out", "pages")
    assert table.num_rows == 2
    assert table.schema.field("answer_author").type == pa.string()
    assert table.schema.field("answer_total_amount").type == pa.float64()
    rows = sorted(table.to_pylist(), key=lambda r: r["started_at"])
    assert rows[0]["answer_author"] is None  # the old part has no such column
    assert rows[1]["answer_author"].startswith("author-")
    assert rows[0]["fingerprint"] != rows[1]["fingerprint"]


def test_the_reading_api_takes_the_str_the_readme_shows(tmp_path, monkeypatch) -> None:
    """`read_table("data/output", "pages")` as a user types it, and any os.PathLike."""
    out = tmp_path / "data" / "output"
    row = {"run_id": "r1", "key": "k", "fingerprint": "f", "source_path": "/in/a.png",
           "source_sha256": "s", "page": 1, "page_last": 1, "status": "ok"}
    writer = store.TableWriter(out, "pages", store.pages_schema([]), "r1", "2026-11-28")
    writer.add(row)
    writer.flush()
    monkeypatch.chdir(tmp_path)
    for root in ("data/output", out, os.fspath(out)):
        assert store.read_table(root, "pages").column("key").to_pylist() == ["k"]
        assert store.read_columns(root, "pages", ["status"]).num_rows == 1
        assert store.load_done(root, "f").status("s", "f", 1, 1) == "ok"
        assert store.rows_of_run(root, "pages", "r1", ["key"]) == {("k",)}


def test_columns_newer_than_every_part_read_as_typed_nulls(tmp_path) -> None:
    """An output written before a column existed (attempts without `client_request_id`, pages
    without `queued_s`) still answers `read_columns` for it: nulls of the column's type."""
    out = tmp_path / "out"
    old = pa.schema([f for f in store.ATTEMPTS_SCHEMA
                     if f.name not in ("client_request_id", "inference_id")])
    writer = store.TableWriter(out, "attempts", old, "r1", "2026-01-02")
    writer.add({"run_id": "r1", "key": "k", "attempt": 1, "outcome": "ok", "credits": 3.0})
    writer.flush()
    table = store.read_columns(out, "attempts", ["key", "client_request_id", "credits"])
    assert table.column_names == ["key", "client_request_id", "credits"]
    assert table.schema.field("client_request_id").type == pa.string()
    assert table.to_pylist() == [{"key": "k", "client_request_id": None, "credits": 3.0}]
