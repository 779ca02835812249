"""One answer per document: the `documents` table built at the end of each run from the page
answers (the simulator answers each page as scripted), rebuilt with other merge rules
without a request, read back with pandas and DuckDB."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageDraw
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.answers.documents import document_key
from ernie_batch.answers.prompt import fingerprint
from ernie_batch.config import load_config
from ernie_batch.intake.content import parts_sha256
from ernie_batch.intake.discover import discover
from ernie_batch.intake.prepare import prepare_document
from ernie_batch.intake.units import PageUnit
from ernie_batch.money.report import dataset_report
from ernie_batch.run.engine import run_job
from ernie_batch.run.rebuild import rebuild_documents
from ernie_batch.sim import SimServer, SimSettings, Simulator
from tests.conftest import PROJECT, SAMPLES, TEST_KEY, run_mounted

SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": ["string", "null"], "x-merge": "all"},
        "line_items": {"type": "array", "x-merge": "concat", "items": {
            "type": "object", "properties": {"item": {"type": "string"},
                                             "amount": {"type": "number"}},
            "required": ["item", "amount"]}},
        "total": {"type": ["number", "null"], "x-merge": "last"},
        "title": {"type": "string"},
    },
    "required": ["invoice_number", "line_items", "total", "title"],
}
PAGE_ANSWERS = [
    {"invoice_number": "INV-7", "line_items": [{"item": "paper", "amount": 24.5},
                                               {"item": "toner", "amount": 89.0}],
     "total": None, "title": "Invoice INV-7"},
    {"invoice_number": "INV-7", "line_items": [{"item": "stapler", "amount": 12.25}],
     "total": None, "title": "Invoice INV-7 (continued)"},
    {"invoice_number": None, "line_items": [], "total": 125.75, "title": "Totals"},
]
BASE = "http://127.0.0.1:9/v1"  # never dialled: the simulator is mounted in process


def invoice_pdf(path: Path, pages: int = 3) -> Path:
    images = []
    for n in range(pages):
        im = Image.new("L", (300, 400), 250)
        ImageDraw.Draw(im).text((20, 20 + 30 * n), f"INVOICE INV-7 page {n + 1}", fill=0)
        images.append(im)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)
    return path


def config(tmp_path: Path, sources: list[Path], schema: dict | None = None, **more):
    values = {"api.base_url": BASE, "sources.paths": [str(s) for s in sources],
              "output.path": str(tmp_path / "out"), "prepare.workers": -1,
              "prompt.schema": schema or SCHEMA, "prompt.schema_file": None,
              "retries.answer": 0, **more}
    return load_config(PROJECT / "configs" / "demo.toml", values)


def units_of(cfg) -> list[PageUnit]:
    docs, _ = discover(cfg.sources)
    return [u for d in docs for u in prepare_document(d, cfg.images, cfg.pdf)
            if isinstance(u, PageUnit)]


def script(sim: Simulator, cfg, answers: list) -> None:
    """The simulator answers page n of the invoice with answers[n - 1]."""
    for unit in units_of(cfg):
        sim.settings.scripted[parts_sha256(unit.parts)] = answers[unit.page - 1]


def run(cfg, sim: Simulator):
    return run_mounted(cfg, sim.app)


def documents(cfg, current: bool = False) -> pd.DataFrame:
    return store.read_table(Path(cfg.output.path), "documents", current=current).to_pandas()


@pytest.fixture
def invoice(tmp_path):
    src = tmp_path / "in"
    invoice_pdf(src / "invoice.pdf")
    cfg = config(tmp_path, [src])
    sim = Simulator(SimSettings(api_key=TEST_KEY))
    script(sim, cfg, PAGE_ANSWERS)
    return cfg, sim


def test_a_three_page_invoice_is_one_document_items_in_order_total_from_page_3(invoice):
    cfg, sim = invoice
    summary = run(cfg, sim)
    assert summary.units_ok == 3 and summary.documents_built == summary.documents_complete == 1
    docs = documents(cfg)
    assert len(docs) == 1
    doc = docs.iloc[0]
    answer = json.loads(doc["answer_json"])
    assert [i["item"] for i in answer["line_items"]] == ["paper", "toner", "stapler"]
    assert answer["total"] == 125.75 and doc["answer_total"] == 125.75
    assert answer["invoice_number"] == "INV-7" and answer["title"] == "Invoice INV-7"
    provenance = json.loads(doc["provenance_json"])
    assert provenance["line_items"] == [1, 1, 2] and provenance["total"] == [3]
    assert provenance["invoice_number"] == [1, 2]
    assert pd.isna(doc["conflicts_json"])  # titles differ by page, by design: no conflict
    assert bool(doc["complete"]) and doc["page_count"] == 3 and doc["pages_ok"] == 3
    assert doc["pages_missing"] == 0 and doc["pages_failed"] == 0
    assert list(doc["source_paths"]) == [str(Path(cfg.sources.paths[0]) / "invoice.pdf")]
    assert doc["key"] == document_key(doc["source_sha256"], fingerprint(cfg))
    assert doc["credits"] == math.fsum(e.credits for e in sim.ledger)
    assert doc["credits"] == math.fsum(store.read_table(Path(cfg.output.path),
                                                        "pages").to_pandas()["credits"])
    assert dataset_report(Path(cfg.output.path))["documents"] == [
        {"run_id": summary.run_id, "documents": 1, "complete": 1, "incomplete": 0,
         "conflicting": 0}]


def test_pages_disagreeing_on_a_field_whose_rule_is_all_is_a_conflict_with_both_values(invoice):
    cfg, sim = invoice
    answers = [dict(a) for a in PAGE_ANSWERS]
    answers[1]["invoice_number"] = "INV-1"
    script(sim, cfg, answers)
    run(cfg, sim)
    doc = documents(cfg).iloc[0]
    assert json.loads(doc["conflicts_json"]) == {"invoice_number": [
        {"value": "INV-7", "pages": [1]}, {"value": "INV-1", "pages": [2]}]}
    assert pd.isna(doc["answer_invoice_number"])  # no value is chosen when pages disagree
    assert bool(doc["complete"])  # every page answered: complete, but in conflict


def test_a_failed_page_then_a_rerun_that_answers_it(invoice):
    cfg, sim = invoice
    broken = [dict(a) for a in PAGE_ANSWERS]
    broken[1] = {"line_items": "not a list"}  # fails validation: invalid_answer
    script(sim, cfg, broken)
    first = run(cfg, sim)
    assert first.units_failed == 1 and first.documents_complete == 0
    row = documents(cfg).iloc[0]
    assert not row["complete"] and row["pages_ok"] == 2 and row["pages_failed"] == 1
    assert row["pages_missing"] == 1
    assert json.loads(row["provenance_json"])["line_items"] == [1, 1]  # what answered

    script(sim, cfg, PAGE_ANSWERS)
    second = run(cfg, sim)
    assert second.requests == 1 and second.documents_complete == 1
    rows = documents(cfg).sort_values("built_at")
    assert rows["run_id"].tolist() == [first.run_id, second.run_id]
    assert rows["complete"].tolist() == [False, True]
    current = documents(cfg, current=True)
    assert len(current) == 1 and current.iloc[0]["run_id"] == second.run_id
    assert [i["item"] for i in json.loads(current.iloc[0]["answer_json"])["line_items"]] == [
        "paper", "toner", "stapler"]
    # credits: every attempt of every page, both runs (the failed one included)
    assert current.iloc[0]["credits"] == math.fsum(e.credits for e in sim.ledger)


def test_rebuild_with_a_changed_rule_changes_only_what_it_touches_and_sends_nothing(invoice):
    cfg, sim = invoice
    run(cfg, sim)
    requests = len(sim.ledger)
    before = documents(cfg, current=True).iloc[0]
    changed = json.loads(json.dumps(SCHEMA))
    changed["properties"]["line_items"]["x-merge"] = "unique"
    changed["properties"]["title"]["x-merge"] = "last"
    recfg = config(Path(cfg.output.path).parent, cfg.sources.paths, changed)
    assert fingerprint(recfg) == fingerprint(cfg)

    done = rebuild_documents(recfg, None)
    assert done.documents == 1 and done.changed == 1
    assert len(sim.ledger) == requests  # nothing sent
    after = documents(cfg, current=True).iloc[0]
    assert after["run_id"] == done.run_id
    a, b = json.loads(before["answer_json"]), json.loads(after["answer_json"])
    assert b["title"] == "Totals" and a["title"] == "Invoice INV-7"
    assert {k: v for k, v in a.items() if k != "title"} == {k: v for k, v in b.items()
                                                             if k != "title"}
    pa_, pb = json.loads(before["provenance_json"]), json.loads(after["provenance_json"])
    assert pb["title"] == [3] and {k: v for k, v in pa_.items() if k != "title"} == {
        k: v for k, v in pb.items() if k != "title"}

    again = rebuild_documents(recfg, None)
    assert again.changed == 0
    rows = documents(cfg).sort_values("built_at")
    last_two = rows.tail(2).drop(columns=["run_id", "built_at"])
    assert last_two.iloc[0].to_json() == last_two.iloc[1].to_json()
    runs = store.read_table(Path(cfg.output.path), "runs").to_pandas().set_index("run_id")
    assert runs.loc[done.run_id, "kind"] == "rebuild" and runs.loc[done.run_id, "requests"] == 0
    assert runs.loc[done.run_id, "documents"] == 1


def test_pandas_polars_and_duckdb_read_the_typed_columns(invoice):
    """The README's three readers of a Delta table, as a user types them."""
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    from deltalake import DeltaTable

    cfg, sim = invoice
    run(cfg, sim)
    root = Path(cfg.output.path)
    frame = DeltaTable(str(root / "documents")).to_pandas()
    assert str(frame["pages_ok"].dtype) == "int32" and str(frame["answer_total"].dtype) == "float64"
    assert frame["complete"].dtype == bool
    polars = pl.read_delta(str(root / "documents"))
    assert polars.schema["answer_total"] == pl.Float64
    assert polars.schema["answer_line_items"] == pl.List(pl.String)
    assert polars["answer_total"].to_list() == [125.75]
    con = duckdb.connect()
    con.register("documents", DeltaTable(str(root / "documents")).to_pyarrow_dataset())
    rel = con.sql("SELECT * FROM documents")
    types = dict(zip(rel.columns, map(str, rel.types), strict=True))
    assert types["source_paths"] == "VARCHAR[]" and types["complete"] == "BOOLEAN"
    assert types["answer_line_items"] == "VARCHAR[]" and types["answer_total"] == "DOUBLE"
    assert types["built_at"].startswith("TIMESTAMP WITH TIME ZONE")
    got = con.execute("SELECT answer_total, len(answer_line_items) FROM documents").fetchall()
    assert got == [(125.75, 3)]


def test_several_pages_per_request_contribute_once_with_their_range(tmp_path):
    src = tmp_path / "in"
    invoice_pdf(src / "invoice.pdf")
    cfg = config(tmp_path, [src], **{"pdf.pages_per_request": 2})
    sim = Simulator(SimSettings(api_key=TEST_KEY))
    units = units_of(cfg)
    assert [(u.page, u.page_last) for u in units] == [(1, 2), (3, 3)]
    sim.settings.scripted[parts_sha256(units[0].parts)] = {
        **PAGE_ANSWERS[0], "line_items": PAGE_ANSWERS[0]["line_items"] + PAGE_ANSWERS[1][
            "line_items"]}
    sim.settings.scripted[parts_sha256(units[1].parts)] = PAGE_ANSWERS[2]
    run(cfg, sim)
    doc = documents(cfg).iloc[0]
    assert json.loads(doc["provenance_json"])["line_items"] == ["1-2", "1-2", "1-2"]
    assert json.loads(doc["provenance_json"])["total"] == [3]
    assert doc["pages_ok"] == 3 and bool(doc["complete"])


def test_the_page_range_decides_completeness_and_copies_add_their_paths(tmp_path):
    src = tmp_path / "in"
    invoice_pdf(src / "invoice.pdf", pages=4)
    shutil.copy(src / "invoice.pdf", src / "copy-of-invoice.pdf")
    cfg = config(tmp_path, [src], **{"pdf.last_page": 3})
    sim = Simulator(SimSettings(api_key=TEST_KEY))
    script(sim, cfg, PAGE_ANSWERS)
    summary = run(cfg, sim)
    assert summary.units_duplicate == 3 and summary.requests == 3
    doc = documents(cfg).iloc[0]
    assert len(documents(cfg)) == 1
    assert [Path(p).name for p in doc["source_paths"]] == ["copy-of-invoice.pdf", "invoice.pdf"]
    assert doc["page_count"] == 4 and doc["pages_ok"] == 3 and bool(doc["complete"])


def test_documents_of_a_killed_run_are_built_by_the_run_that_folds_its_journal(tmp_path):
    from tests.test_crash_safety import killed_run

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLES / "survey-report.pdf", src)
    shutil.copy(SAMPLES / "receipt-cafe-aurora.png", src)
    with SimServer(SimSettings(api_key=TEST_KEY)) as server:
        cfg = config(tmp_path, [src], **{"api.base_url": server.url, "output.flush_rows": 2})
        dead = killed_run(cfg)
        assert not (Path(cfg.output.path) / "documents").exists()
        summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.recovered_runs == [dead.run_id] and summary.requests == 0
    docs = documents(cfg)
    assert docs["run_id"].tolist() == [dead.run_id] * 2  # the new run touched nothing
    assert docs["complete"].all() and sorted(docs["page_count"]) == [1, 4]
    # committed once, as the round recovery added for the rows only the journal held
    assert dead.recorder.round == 2 and store.committed_version(
        cfg.output.path, "documents", store.app_id(dead.run_id, "documents")) == 3


def test_the_documents_command_counts_and_rebuilds_and_waits_for_the_lock(invoice, tmp_path):
    cfg, sim = invoice
    broken = [dict(a) for a in PAGE_ANSWERS]
    broken[2] = {"total": "n/a"}
    script(sim, cfg, broken)
    run(cfg, sim)
    job = tmp_path / "job.toml"
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    job.write_text(f'[prompt]\ntemplate_file = "{PROJECT}/configs/prompts/page.txt"\n'
                   f'schema_file = "schema.json"\n[output]\npath = "{cfg.output.path}"\n')
    assert fingerprint(load_config(job)) == fingerprint(cfg)  # the same documents

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ernie_batch.cli", "documents", "-c",
                               str(job), *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "250"})

    res = cli("--json")
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout)
    assert (counts["documents"], counts["complete"], counts["incomplete"]) == (1, 0, 1)
    res = cli()
    assert "invoice.pdf" in res.stdout and "incomplete or conflicting" in res.stdout
    lock = store.OutputLock(Path(cfg.output.path), "a-test-holding-it")
    lock.acquire()
    try:
        res = cli("--rebuild")
        assert res.returncode == 5 and "locked" in res.stderr
    finally:
        lock.release()
    res = cli("--rebuild", "--json")
    assert res.returncode == 0, res.stderr
    rebuilt = json.loads(res.stdout)
    assert rebuilt["rebuild"]["documents"] == 1 and rebuilt["runs"] == [
        rebuilt["rebuild"]["run_id"]]
    assert len(documents(cfg)) == 2


def test_a_journal_from_before_documents_is_built_with_the_default_rules():
    """Journals written before merge rules existed carry no rules: arrays concat, the rest first."""
    from ernie_batch.answers.documents import DocumentSpec
    from ernie_batch.answers.judge import answer_fields
    from ernie_batch.vocab import MergeRule

    cfg = load_config(PROJECT / "configs" / "demo.toml")
    fields = answer_fields(cfg.resolved.schema)
    spec = DocumentSpec.from_header(None, store.pages_schema(fields))
    assert spec.answer_fields == fields and (spec.first_page, spec.last_page) == (1, None)
    assert spec.rules["keywords"] == MergeRule.CONCAT and spec.rules["title"] == MergeRule.FIRST
    recorded = DocumentSpec.of_config(cfg, fields).header()
    assert DocumentSpec.from_header(recorded, store.pages_schema(fields)).rules == \
        cfg.resolved.merge_rules
