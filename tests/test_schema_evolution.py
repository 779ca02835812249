"""A field added to the schema later is a new nullable column; a field whose type changes
between prompt versions takes the type rule (`store.evolve`); both versions read together."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.run.engine import RunOptions, run_job
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


def test_a_backfill_that_changes_a_fields_type_reads_back_typed_in_both_versions(sim_factory,
                                                                               tmp_path):
    """v1 answers `total_amount` as a number, a v2 backfill as a string: one table, each
    version's value typed, in `pages` and in `documents` (README "Output schema")."""
    sim = sim_factory()
    receipt = tmp_path / "in"
    receipt.mkdir()
    (receipt / "r.png").write_bytes((SAMPLES / "receipt-cafe-aurora.png").read_bytes())
    v1 = run_job(job_config(sim.url, tmp_path / "out", [receipt]), SecretStr(TEST_KEY))
    schema = json.loads((PROJECT / "configs" / "schemas" / "page.json").read_text())
    schema["properties"]["total_amount"] = {"type": "string"}
    (tmp_path / "v2.json").write_text(json.dumps(schema))
    v2 = run_job(job_config(sim.url, tmp_path / "out", [receipt],
                            **{"prompt.schema_file": str(tmp_path / "v2.json")}),
                 SecretStr(TEST_KEY), RunOptions(kind="backfill"))
    assert (v1.units_ok, v2.units_ok) == (1, 1)
    for table in ("pages", "documents"):
        rows = {r["run_id"]: r for r in read_table(tmp_path / "out", table).to_pylist()}
        first, second = rows[v1.run_id], rows[v2.run_id]
        assert isinstance(first["answer_total_amount"], float), table
        assert first["answer_total_amount"] == json.loads(first["answer_json"])["total_amount"]
        assert first["answer_total_amount__string"] is None
        assert second["answer_total_amount"] is None
        assert second["answer_total_amount__string"] == json.loads(
            second["answer_json"])["total_amount"]
        assert isinstance(second["answer_total_amount__string"], str), table


def test_the_reading_api_takes_the_str_the_readme_shows(tmp_path, monkeypatch) -> None:
    """`read_table("data/output", "pages")` as a user types it, and any os.PathLike."""
    out = tmp_path / "data" / "output"
    row = {"run_id": "r1", "key": "k", "fingerprint": "f", "source_path": "/in/a.png",
           "source_sha256": "s", "page": 1, "page_last": 1, "status": "ok"}
    writer = store.TableWriter(out, "pages", store.pages_schema([]), "2026-11-28")
    writer.add(row)
    writer.flush()
    monkeypatch.chdir(tmp_path)
    for root in ("data/output", out, os.fspath(out)):
        assert store.read_table(root, "pages").column("key").to_pylist() == ["k"]
        assert store.read_columns(root, "pages", ["status"]).num_rows == 1
        assert store.load_done(root, "f").status("s", "f", 1, 1) == "ok"
        assert store.rows_of_run(root, "pages", "r1", ["key"]) == {("k",)}


def test_columns_newer_than_every_part_read_as_typed_nulls(tmp_path) -> None:
    """A table written before a column existed (attempts without `client_request_id`)
    still answers `read_columns` for it, and filters on it: nulls of the column's type."""
    out = tmp_path / "out"
    old = pa.schema([f for f in store.ATTEMPTS_SCHEMA
                     if f.name not in ("client_request_id", "inference_id")])
    writer = store.TableWriter(out, "attempts", old, "2026-01-02")
    writer.add({"run_id": "r1", "key": "k", "attempt": 1, "outcome": "ok", "credits": 3.0})
    writer.flush()
    table = store.read_columns(out, "attempts", ["key", "client_request_id", "credits"])
    assert table.column_names == ["key", "client_request_id", "credits"]
    assert table.schema.field("client_request_id").type == pa.string()
    assert table.to_pylist() == [{"key": "k", "client_request_id": None, "credits": 3.0}]
    assert store.read_columns(out, "attempts", ["key"],
                              pc.field("client_request_id").is_null()).num_rows == 1


def test_a_schema_change_racing_another_writers_is_read_again_and_retried(tmp_path,
                                                                          monkeypatch) -> None:
    """Two prompt versions commit a new field at the same moment, as a number and as a
    string: the one that loses ("metadata changed") reads the table again, fits its rows by
    the type rule and commits; both rows read back typed."""
    from deltalake.exceptions import CommitFailedError

    from ernie_batch.store import delta, evolve
    from ernie_batch.store.delta import Raced

    out = tmp_path / "out"
    schema = store.pages_schema([])
    seed = store.TableWriter(out, "pages", schema, "2026-06-01")
    seed.add({"run_id": "r0", "key": "k0"})
    seed.flush()
    number = store.TableWriter(out, "pages", store.pages_schema([pa.field("answer_x", pa.float64())]),
                               "2026-06-01")
    number.add({"run_id": "r1", "key": "k1", "answer_x": 1.5})
    text = store.TableWriter(out, "pages", store.pages_schema([pa.field("answer_x", pa.string())]),
                             "2026-06-01")
    text.add({"run_id": "r2", "key": "k2", "answer_x": "one and a half"})
    fit, raced, lost = evolve.fit, [], []

    def racing(rows, table, where):  # the other writer commits between our read and write
        fitted = fit(rows, table, where)
        if not raced:
            raced.append(True)
            number.flush()
        return fitted

    retrying = delta.retrying

    def counting(what, attempt):
        def once():
            try:
                return attempt()
            except (CommitFailedError, Raced):
                lost.append(what)
                raise
        return retrying(what, once)

    monkeypatch.setattr(evolve, "fit", racing)
    monkeypatch.setattr(delta, "retrying", counting)
    assert text.flush()
    assert lost  # the first try lost to the number's schema change
    rows = {r["key"]: r for r in store.read_table(out, "pages").to_pylist()}
    assert (rows["k1"]["answer_x"], rows["k1"]["answer_x__string"]) == (1.5, None)
    assert (rows["k2"]["answer_x"], rows["k2"]["answer_x__string"]) == (None, "one and a half")
