"""The walking skeleton end to end: samples -> simulator on loopback -> real flow -> Parquet."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pandas as pd
import pytest
from pypdf import PdfReader

from tests.conftest import PROJECT, SAMPLES


def sample_pages() -> int:
    total = 0
    for f in sorted(SAMPLES.iterdir()):
        if f.suffix == ".pdf":
            total += len(PdfReader(f).pages)
        elif f.suffix in (".png", ".jpg"):
            total += 1
    return total


def run_ingest(output: Path, sim_url: str, **kwargs) -> dict:
    from flows.ingest import ingest

    overrides = {"api.base_url": sim_url, "sources.paths": [str(SAMPLES)],
                 "output.path": str(output), "prepare.workers": -1}
    overrides.update(kwargs.pop("overrides", {}))
    return asyncio.run(ingest(config_path=str(PROJECT / "configs" / "demo.toml"),
                              overrides=overrides, **kwargs))


def test_ingest_flow_writes_one_row_per_page_and_reconciles_credits(
    prefect_harness, sim_factory, api_env, tmp_path
):
    sim = sim_factory(latency_s=0.05)
    summary = run_ingest(tmp_path, sim.url)

    assert summary["outcome"] == "completed"
    pages = pd.read_parquet(tmp_path / "pages")
    assert len(pages) == sample_pages()
    assert set(pages["status"]) == {"ok"}
    assert pages["key"].is_unique
    # every PDF page and every image is there once
    counts = pages.groupby("source_path")["page"].apply(sorted).to_dict()
    for path, got in counts.items():
        n = len(PdfReader(path).pages) if path.endswith(".pdf") else 1
        assert got == list(range(1, n + 1))

    book = sim.ledger()
    entries = {e["response_id"]: e for e in book["entries"]}
    for row in pages.itertuples():
        entry = entries[row.response_id]
        assert entry["content_sha256"] == row.content_sha256
        assert entry["delivered"]
        # the simulator's answer strings carry the digest of what it was sent
        assert row.content_sha256[:12] in row.answer_title
    delivered = math.fsum(e["credits"] for e in book["entries"] if e["delivered"])
    assert math.fsum(pages["credits"]) == delivered
    assert summary["credits"] == delivered
    attempts = pd.read_parquet(tmp_path / "attempts")
    assert math.fsum(attempts["credits"]) == delivered
    assert len(attempts) == len(book["entries"])

    runs = pd.read_parquet(tmp_path / "runs")
    assert len(runs) == 1
    assert runs.iloc[0]["units_ok"] == len(pages)
    assert runs.iloc[0]["credits"] == delivered
    assert not (tmp_path / "_journal" / f"{summary['run_id']}.jsonl").exists()
    assert not (tmp_path / ".lock").exists()


def test_answer_columns_are_typed_from_the_schema(prefect_harness, sim_factory, api_env,
                                                   tmp_path):
    sim = sim_factory()
    run_ingest(tmp_path, sim.url)
    pages = pd.read_parquet(tmp_path / "pages", dtype_backend="pyarrow")
    import pyarrow as pa

    types = {c: pages[c].dtype.pyarrow_dtype for c in pages.columns if c.startswith("answer_")}
    assert types["answer_title"] == pa.string()
    assert types["answer_total_amount"] == pa.float64()
    assert pa.types.is_list(types["answer_keywords"])
    assert types["answer_json"] == pa.string()
    assert pages["page"].dtype.pyarrow_dtype == pa.int32()
    assert str(pages["started_at"].dtype.pyarrow_dtype) == "timestamp[us, tz=UTC]"


def test_second_run_sends_nothing(prefect_harness, sim_factory, api_env, tmp_path):
    sim = sim_factory()
    first = run_ingest(tmp_path, sim.url)
    assert first["requests"] == sample_pages()
    second = run_ingest(tmp_path, sim.url)
    assert second["requests"] == 0
    assert second["units_already_done"] == sample_pages()
    assert second["outcome"] == "completed"
    assert len(sim.ledger()["entries"]) == sample_pages()


@pytest.mark.parametrize("code", [401, 403])
def test_fatal_api_errors_stop_the_run_and_keep_what_was_done(
    prefect_harness, sim_factory, api_env, tmp_path, code
):
    if code == 401:
        sim = sim_factory(api_key="another-key")
    else:
        # enough credits for a few pages, then 403 out of credits
        sim = sim_factory(balance_credits=3000.0)
    summary = run_ingest(tmp_path, sim.url, overrides={"limits.concurrency": 1})
    assert summary["outcome"] == "fatal_api_error"
    assert summary["exit_code"] == 3
    assert str(code) in summary["error"]
    pages = pd.read_parquet(tmp_path / "pages")
    ok = pages[pages["status"] == "ok"]
    book = sim.ledger()
    assert len(ok) == len([e for e in book["entries"] if e["delivered"]])
    if code == 403:
        assert len(ok) >= 1
    assert math.fsum(pages["credits"]) == math.fsum(e["credits"] for e in book["entries"])
    assert pages["status"].isin(["ok", "api_error"]).all()


def test_each_run_leaves_a_table_and_a_report_artifact(prefect_harness, sim_factory, api_env,
                                                        tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    sim = sim_factory()
    summary = run_ingest(tmp_path, sim.url)

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["ernie-batch-ingest-table",
                                            "ernie-batch-ingest-report"])))

    mine = [a for a in asyncio.run(read()) if summary["run_id"] in (a.description or "")]
    by_type = {a.type: a for a in mine}
    assert set(by_type) == {"table", "markdown"}
    assert f"units_ok**: {summary['units_ok']}" in by_type["markdown"].data
    assert "credits" in str(by_type["table"].data)


def test_the_key_can_come_from_a_prefect_secret_block(prefect_harness, sim_factory, tmp_path,
                                                       monkeypatch):
    from prefect.blocks.system import Secret

    from tests.conftest import TEST_KEY

    monkeypatch.delenv("AIMLAPI_API_KEY", raising=False)
    Secret(value=TEST_KEY).save("ernie-test-key", overwrite=True)
    sim = sim_factory()
    summary = run_ingest(tmp_path, sim.url, overrides={"api.secret_block": "ernie-test-key"})
    assert summary["outcome"] == "completed"
    assert summary["units_ok"] == sample_pages()
