"""Counts that add up: `units_ok + units_failed + units_skipped + units_duplicate +
units_already_done + units_not_sent == units_selected`, in the summary and the `runs` row,
whatever ended the run. The engine runs in process against the simulator on loopback
(budget stop, a key revoked mid-run, runs that finish); Ctrl-C and SIGTERM on the CLI are in
tests/test_interrupt.py."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.config import ImageOptions, PdfOptions, SourceOptions
from ernie_batch.intake.count import count_within
from ernie_batch.intake.discover import discover
from ernie_batch.run.engine import Pipeline, run_job
from ernie_batch.run.summary import RunSummary
from tests import test_chaos as chaos
from tests.conftest import TEST_KEY, job_config, put_object

COUNTS = ("units_ok", "units_failed", "units_skipped", "units_duplicate", "units_already_done",
          "units_not_sent")


def assert_adds_up(summary: RunSummary, out, selected: int) -> None:
    counts = {c: getattr(summary, c) for c in COUNTS}
    assert summary.units_selected == selected, counts
    assert sum(counts.values()) == selected, counts
    assert min(counts.values()) >= 0, counts
    (row,) = [r for r in store.read_table(out, "runs").to_pylist()
              if r["run_id"] == summary.run_id]
    assert {c: row[c] for c in COUNTS} == counts and row["units_selected"] == selected


@pytest.fixture
def inbox(tmp_path):
    """24 images and a 2-page PDF: 26 units."""
    assert chaos.make_corpus(tmp_path / "in", images=24, pdf_pages=2, seed=81) == 26
    return tmp_path / "in"


def test_a_budget_stop_counts_every_unit_it_did_not_send(sim_factory, tmp_path, inbox):
    sim = sim_factory(latency_s=0.05)
    cfg = job_config(sim.url, tmp_path / "out", [inbox], **{"budget.max_credits": 4000.0,
                                                            "limits.concurrency": 2})
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.outcome == "budget_stopped" and 0 < summary.units_ok < 26
    assert_adds_up(summary, tmp_path / "out", 26)
    assert summary.units_not_sent == 26 - summary.units_ok - summary.units_failed


def test_a_key_revoked_mid_run_counts_every_unit_it_did_not_send(sim_factory, tmp_path, inbox):
    sim = sim_factory(latency_s=0.05)
    cfg = job_config(sim.url, tmp_path / "out", [inbox], **{"limits.concurrency": 2})

    async def go() -> RunSummary:
        async with Pipeline(cfg, SecretStr(TEST_KEY)) as run:
            task = asyncio.ensure_future(run.process(run.discover()))
            while len(sim.simulator.ledger) < 5:
                await asyncio.sleep(0.01)
            sim.simulator.settings.api_key = "revoked"  # every request from now on: a 401
            await task
            return await run.finish()

    summary = asyncio.run(go())
    assert summary.outcome == "fatal_api_error" and summary.exit_code == 3
    assert_adds_up(summary, tmp_path / "out", 26)
    assert summary.units_not_sent >= 26 - len(sim.simulator.ledger) - 2


def test_finished_runs_add_up_with_duplicates_earlier_work_and_skipped_files(
        sim_factory, tmp_path, inbox):
    sim = sim_factory()
    cfg = job_config(sim.url, tmp_path / "out", [inbox])
    first = run_job(cfg, SecretStr(TEST_KEY))
    assert first.outcome == "completed" and first.units_not_sent == 0
    assert_adds_up(first, tmp_path / "out", 26)
    # a copy of the PDF (2 units, answered under another path), a new image and its copy
    # (one sent, the other a duplicate), a text file (skipped)
    shutil.copy(inbox / "bundle.pdf", inbox / "bundle-copy.pdf")
    chaos.make_corpus(tmp_path / "more", images=1, pdf_pages=1, seed=82)
    shutil.copy(tmp_path / "more" / "scan-000.jpg", inbox / "new.jpg")
    shutil.copy(tmp_path / "more" / "scan-000.jpg", inbox / "new-copy.jpg")
    (inbox / "notes.txt").write_text("not a document\n")
    second = run_job(cfg, SecretStr(TEST_KEY))
    assert (second.units_ok, second.units_duplicate, second.units_skipped,
            second.units_already_done, second.units_not_sent) == (1, 3, 1, 26, 0)
    assert_adds_up(second, tmp_path / "out", 31)


def test_documents_on_object_storage_are_counted_by_their_pages_as_local_ones(s3, tmp_path):
    """A run that stops before it reaches a document counts its units from its structure: an
    object's pages as a file's (it was one unit each: the URL was opened as a path)."""
    _, bucket = s3
    chaos.make_corpus(tmp_path / "in", images=2, pdf_pages=5, seed=3)
    for path in sorted((tmp_path / "in").iterdir()):
        put_object(bucket, f"in/{path.name}", path.read_bytes())
    images, pdf = ImageOptions(), PdfOptions(pages_per_request=2)
    local = count_within(discover(SourceOptions(paths=[tmp_path / "in"]))[0], images, pdf, 30)
    remote = count_within(discover(SourceOptions(paths=[f"s3://{bucket}/in/"]))[0],
                          images, pdf, 30)
    assert sorted(v for v in local.values()) == sorted(v for v in remote.values())
    assert sorted(len(v) for v in remote.values()) == [1, 1, 3]  # 5 pages, 2 a request
