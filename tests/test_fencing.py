"""Fencing: rows of a shard run its coordinator did not accept count nowhere, and stay on disk.

The output is made by the real engine: two shard runs of one coordinator against the
simulator on loopback, an accepted one over folder X and a later one (a worker that came
back and wrote on, under its own run id) over X and Y; then the coordinator's `runs` row,
accepting the first. Readers, the done-index, `report`, documents, `reconcile` and
compaction are checked against that output, each test on its own copy when it writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from ernie_batch import store
from ernie_batch.cli import app
from ernie_batch.money.report import dataset_report
from ernie_batch.run import recovery
from ernie_batch.run.compact import COMPACTED_TABLES, compact_output
from ernie_batch.run.engine import Pipeline, RunOptions, run_job
from ernie_batch.run.recovery import recover_journals
from ernie_batch.run.selection import RunSelection
from ernie_batch.scale.shard import take_over
from ernie_batch.sim import SimServer, SimSettings
from ernie_batch.store import RunRow, fencing
from ernie_batch.store.maintain import files_by_partition
from ernie_batch.vocab import RunKind
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY, job_config
from tests.test_crash_safety import leave_locks_behind
from tests.test_reconcile import reconcile

FENCED = ["pages", "attempts", "documents", "runs"]


def shard_pipeline(cfg, coordinator: str, shard: int, force: bool = False) -> Pipeline:
    """A pipeline that runs as shard `shard` of `coordinator` (its journal header and manifest
    say so), as the shard flow starts one."""
    run = Pipeline(cfg, SecretStr(TEST_KEY), RunOptions(kind=RunKind.SHARD, force=force))
    run.info = run.recorder.info = dataclasses.replace(run.info, parent_run_id=coordinator,
                                                       shard=shard)
    return run


def shard_run(cfg, coordinator: str, shard: int, force: bool = False):
    async def go():
        async with shard_pipeline(cfg, coordinator, shard, force) as run:
            await run.process(run.discover())
            return await run.finish()

    return asyncio.run(go())


def run_row(run_id: str, kind: str, *, parent: str | None = None,
            accepted: list[str] | None = None, started: datetime | None = None) -> RunRow:
    """A `runs` row; a coordinator's has null counters and money (CONTRACT)."""
    return RunRow(run_id=run_id, kind=kind, config_path=None, fingerprint=None,
                  started_at=started or datetime.now(UTC), finished_at=datetime.now(UTC),
                  documents=None, units_ok=None, units_failed=None, units_skipped=None,
                  units_duplicate=None, units_already_done=None, units_not_sent=None,
                  requests=None, credits=None, usd=None, outcome="completed", error=None,
                  parent_run_id=parent, accepted_runs=accepted)


def delta_rows(root: Path, table: str) -> pd.DataFrame:
    """A table as a plain Delta reader sees it (the README's pandas line): every row."""
    from deltalake import DeltaTable

    return DeltaTable(str(root / table)).to_pandas()


def run_ids(root: Path, table: str, **kw) -> set[str]:
    found = store.read_table(root, table, **kw)
    return set(found["run_id"].to_pylist()) if found is not None else set()


@dataclasses.dataclass
class World:
    sim: SimServer
    x: Path
    y: Path
    open_out: Path  # both shard runs written, the coordinator still running (no row)
    out: Path  # the same, then the coordinator's row accepting `accepted` only
    coordinator: str
    accepted: object  # RunSummary of the accepted shard run (X)
    rejected: object  # RunSummary of the later attempt (X and Y)
    units_x: int
    units_y: int

    def cfg(self, out: Path, sources: list[Path] | None = None):
        return job_config(self.sim.url, out, sources or [self.x], **{"reconcile.lag_s": 0})

    def copy(self, tmp_path: Path, of: Path | None = None) -> Path:
        return Path(shutil.copytree(of or self.out, tmp_path / "copy"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fencing")
    sim = SimServer(SimSettings(api_key=TEST_KEY)).start()
    try:
        x, y, out = tmp / "x", tmp / "y", tmp / "out"
        units_x = chaos.make_corpus(x, images=3, pdf_pages=2, seed=61)
        units_y = chaos.make_corpus(y, images=2, pdf_pages=1, seed=62)
        started = datetime.now(UTC)
        coordinator = store.new_run_id(started - timedelta(seconds=1))
        cfg = job_config(sim.url, out, [x])
        accepted = shard_run(cfg, coordinator, 0)
        rejected = shard_run(job_config(sim.url, out, [x, y]), coordinator, 0, force=True)
        assert (accepted.units_ok, rejected.units_ok) == (units_x, units_x + units_y)
        open_out = Path(shutil.copytree(out, tmp / "open"))
        store.write_run_row(out, f"{started:%Y-%m-%d}", run_row(
            coordinator, RunKind.COORDINATOR, accepted=[accepted.run_id],
            started=started - timedelta(seconds=1)))
        yield World(sim, x, y, open_out, out, coordinator, accepted, rejected, units_x, units_y)
    finally:
        sim.stop()


def test_shard_runs_count_while_their_coordinator_has_no_row(world):
    both = {world.accepted.run_id, world.rejected.run_id}
    for table in ("pages", "attempts", "documents"):
        assert run_ids(world.open_out, table) == both
    cfg = world.cfg(world.open_out)
    pages = store.read_table(world.open_out, "pages").to_pandas()
    done = store.load_done(world.open_out, pages["fingerprint"].iloc[0])
    assert all(done.status(r.source_sha256, r.fingerprint, r.page, r.page_last) == "ok"
               for r in pages.itertuples())
    assert RunSelection((world.coordinator,)).resolve(world.open_out) == [
        world.accepted.run_id, world.rejected.run_id, world.coordinator]  # no row: no start
    assert not dataset_report(Path(cfg.output.path), None).get("orphaned")


def test_readers_leave_out_a_rejected_runs_rows_that_plain_delta_readers_still_see(world):
    a, r = world.accepted.run_id, world.rejected.run_id
    for table in FENCED:
        assert r not in run_ids(world.out, table)
        assert r in run_ids(world.out, table, include_rejected=True)
    assert run_ids(world.out, "runs") == {world.coordinator, a}
    assert set(store.read_columns(world.out, "attempts", ["key"]).column_names) == {"key"}
    assert set(delta_rows(world.out, "pages")["run_id"]) == {a, r}  # what the README says
    assert fencing.rejected_runs(world.out).to_pylist() == [r]
    assert fencing.rejected_among(world.out, [a, r, "no-such-run"]).to_pylist() == [r]
    chosen = RunSelection((world.coordinator,))
    assert chosen.resolve(world.out) == [world.coordinator, a]
    assert chosen.resolve(world.out, include_rejected=True) == [world.coordinator, a, r]
    assert RunSelection().resolve(world.out) == [world.coordinator, a]  # the newest run


def test_the_readmes_duckdb_query_reads_the_rows_read_table_reads(world):
    duckdb = pytest.importorskip("duckdb")
    from deltalake import DeltaTable

    section = (PROJECT / "README.md").read_text().split("### Fencing", 1)[1]
    query = section.split("```sql\n", 1)[1].split("```", 1)[0]
    for out in (world.open_out, world.out):
        con = duckdb.connect()
        for name in ("pages", "runs"):  # as the README registers them
            con.register(name, DeltaTable(str(out / name)).to_pyarrow_dataset())
        got = con.sql(query).df()
        want = store.read_table(out, "pages").to_pandas()
        assert sorted(got["run_id"] + got["key"]) == sorted(want["run_id"] + want["key"])
    assert world.rejected.run_id not in set(got["run_id"])


def test_the_done_index_sends_again_what_only_a_rejected_run_answered(world, tmp_path):
    out = world.copy(tmp_path)
    mine = store.read_table(out, "pages", include_rejected=True).to_pandas()
    mine = mine[mine["run_id"] == world.rejected.run_id]
    done = store.load_done(out, mine["fingerprint"].iloc[0], mine["source_sha256"])
    in_y = mine["source_path"].str.startswith(str(world.y))
    status = [done.status(r.source_sha256, r.fingerprint, r.page, r.page_last)
              for r in mine.itertuples()]
    assert [s for s, y in zip(status, in_y, strict=True) if y] == [None] * world.units_y
    assert [s for s, y in zip(status, in_y, strict=True) if not y] == ["ok"] * world.units_x

    billed = len(world.sim.ledger()["entries"])
    summary = run_job(world.cfg(out, [world.x, world.y]), SecretStr(TEST_KEY))
    assert (summary.units_ok, summary.units_already_done) == (world.units_y, world.units_x)
    assert len(world.sim.ledger()["entries"]) == billed + world.units_y


def test_report_lists_a_rejected_run_as_orphaned_and_leaves_it_out_of_the_totals(world):
    chosen = RunSelection((world.coordinator,)).resolve(world.out, include_rejected=True)
    report = dataset_report(world.out, chosen)
    a, r = world.accepted, world.rejected
    assert [row["run_id"] for row in report["runs"]] == [a.run_id]
    assert math.fsum(row["credits"] for row in report["statuses"]) == a.credits
    assert [row["run_id"] for row in report["documents"]] == [a.run_id]
    (orphan,) = report["orphaned"]
    assert orphan == {"run_id": r.run_id, "coordinator": world.coordinator, "shard": 0,
                      "outcome": "completed", "pages": world.units_x + world.units_y,
                      "attempts": r.requests, "documents": 4 + 3, "credits": r.credits,
                      "usd": orphan["usd"]}
    assert orphan["usd"] == r.usd
    assert dataset_report(world.out, None)["orphaned"] == [orphan]

    config = world.out.parent / "report.toml"
    config.write_text(f'[output]\npath = "{world.out}"\n')
    result = CliRunner().invoke(app, ["report", "-c", str(config), "--run", world.coordinator,
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["orphaned"] == [orphan]


def test_current_documents_come_from_accepted_pages_only(world):
    current = store.read_table(world.out, "documents", current=True).to_pandas()
    assert set(current["run_id"]) == {world.accepted.run_id}
    assert all(p.startswith(str(world.x)) for paths in current["source_paths"] for p in paths)
    assert current["complete"].all() and len(current) == 3 + 1  # 3 images and a PDF
    # unfenced, the later attempt's rows would be the newest generation of each document
    every = store.read_table(world.out, "documents", include_rejected=True)
    assert set(store.newest_per_key(every)["run_id"].to_pylist()) == {world.rejected.run_id}


def test_reconcile_counts_a_rejected_runs_billed_credits_as_unrecorded_and_is_exact(world,
                                                                                    tmp_path):
    out = world.copy(tmp_path)
    figures = reconcile(world.cfg(out), world.coordinator)
    book = world.sim.ledger()["entries"]
    ours = [e for e in book if (e["client_request_id"] or "").split(":")[1] in
            {world.accepted.run_id, world.rejected.run_id}]
    assert len(ours) == world.accepted.requests + world.rejected.requests
    assert figures.vendor_credits == sum(e["credits"] for e in ours)
    assert figures.recorded_credits == world.accepted.credits
    assert figures.unrecorded_credits == world.rejected.credits > 0
    assert figures.recorded_credits + figures.unrecorded_credits == figures.vendor_credits
    assert (figures.mismatched, figures.unbilled_recorded, figures.pending) == (0, 0, 0)
    assert figures.exact
    billing = store.read_table(out, "billing").to_pandas()
    theirs = billing[billing["run_id"] == world.rejected.run_id]
    assert len(theirs) == world.rejected.requests and not theirs["matched"].any()


def test_compaction_drops_rejected_pages_and_documents_and_keeps_attempts_and_runs(world,
                                                                                  tmp_path):
    out = world.copy(tmp_path)
    r = world.rejected.run_id
    counted = {t: store.read_table(out, t).num_rows for t in FENCED}
    on_disk = {t: store.read_table(out, t, include_rejected=True).num_rows for t in FENCED}
    summary = compact_output(out, list(COMPACTED_TABLES), store.pages_schema([]))
    dropped = {t.table: t.rows_dropped for t in summary.tables}
    assert dropped == {"pages": world.units_x + world.units_y, "attempts": 0, "runs": 0,
                       "documents": 4 + 3, "billing": 0}
    assert {t: store.read_table(out, t).num_rows for t in FENCED} == counted
    after = {t: store.read_table(out, t, include_rejected=True).num_rows for t in FENCED}
    assert after == {t: on_disk[t] - dropped[t] for t in FENCED}
    assert r not in set(delta_rows(out, "pages")["run_id"])
    assert r in set(delta_rows(out, "attempts")["run_id"])
    (orphan,) = dataset_report(out, None)["orphaned"]
    assert (orphan["pages"], orphan["documents"]) == (0, 0)
    assert (orphan["attempts"], orphan["credits"]) == (world.rejected.requests,
                                                      world.rejected.credits)


def test_compaction_deletes_rejected_rows_from_every_file_that_holds_them(tmp_path):
    schema = store.pages_schema([])
    day = "2026-03-01"
    store.write_run_row(tmp_path, day, run_row("c", RunKind.COORDINATOR, accepted=["s1"]))
    for rid in ("s1", "s2"):
        store.write_run_row(tmp_path, day, run_row(rid, RunKind.SHARD, parent="c"))
    alone = store.TableWriter(tmp_path, "pages", schema, "2026-03-02")
    alone.add({"run_id": "s2", "key": "k0", "status": "ok"})
    alone.flush()
    mixed = store.TableWriter(tmp_path, "pages", schema, "2026-03-03")
    for i, rid in enumerate(["s1", "s2", "s1", "plain"]):
        mixed.add({"run_id": rid, "key": f"k{i}", "status": "ok"})
    mixed.flush()
    summary = compact_output(tmp_path, ["pages"], schema)
    assert summary.tables[0].rows_dropped == 2
    pages = delta_rows(tmp_path, "pages")
    assert sorted(pages["run_id"]) == ["plain", "s1", "s1"]
    assert set(files_by_partition(tmp_path, "pages")) == {"2026-03-03"}  # s2's file: gone


def killed_shard_run(world: World, out: Path, coordinator: str, shard: int) -> Pipeline:
    """A shard run killed after its answers were committed and journaled, before its
    manifest: its locks left as a kill leaves them."""

    async def killed() -> Pipeline:
        run = shard_pipeline(world.cfg(out), coordinator, shard)
        await run.__aenter__()
        await run.process(run.discover())
        run.recorder.commit()  # its rows in the tables
        await run.pool.aclose()
        await run.client.aclose()
        run.recorder.journal.close(delete=False)  # killed before its manifest
        return run

    run = asyncio.run(killed())
    leave_locks_behind(run)
    return run


def test_a_killed_shard_run_counts_until_its_journal_is_folded_then_is_rejected(world, tmp_path):
    out = tmp_path / "out"
    coordinator = store.new_run_id()
    store.write_run_row(out, f"{datetime.now(UTC):%Y-%m-%d}",
                        run_row(coordinator, RunKind.COORDINATOR, accepted=[]))
    run = killed_shard_run(world, out, coordinator, 3)
    assert run_ids(out, "pages") == {run.run_id}  # no row yet: its rows count
    assert recover_journals(out, run.pages_schema) == [run.run_id]
    (manifest,) = [m for m in store.read_table(out, "runs", include_rejected=True).to_pylist()
                   if m["kind"] == RunKind.SHARD]
    assert (manifest["parent_run_id"], manifest["shard"]) == (coordinator, 3)
    assert run_ids(out, "pages") == set() and run_ids(out, "attempts") == set()


def test_the_rule_over_runs_rows_of_every_kind(tmp_path):
    day = "2026-02-01"
    old = pa.table({"run_id": ["0-old"], "kind": ["ingest"]})  # a manifest from before shards
    store.append_rows(tmp_path, "runs", old, day)
    rows = [
        run_row("c1", RunKind.COORDINATOR, accepted=["s1"]),
        run_row("s1", RunKind.SHARD, parent="c1"),  # accepted
        run_row("s2", RunKind.SHARD, parent="c1"),  # rejected
        run_row("s3", RunKind.SHARD, parent="c-running"),  # its coordinator has no row yet
        run_row("c2", RunKind.COORDINATOR),  # a null list accepts none
        run_row("s4", RunKind.SHARD, parent="c2"),
        run_row("p", "ingest"),
        run_row("s5", RunKind.SHARD, parent="p"),  # its parent is no coordinator
    ]
    for row in rows:
        store.write_run_row(tmp_path, day, row)
    assert fencing.rejected_runs(tmp_path).to_pylist() == ["s2", "s4"]
    assert fencing.rejected_among(tmp_path, ["s1", "s2", "s3", "s5", "unknown"]).to_pylist() == [
        "s2"]
    compact_output(tmp_path, ["runs"], store.pages_schema([]))  # one file holds every run
    assert files_by_partition(tmp_path, "runs")[day].files == 1
    assert fencing.rejected_among(tmp_path, ["s2", "s4", "s1"]).to_pylist() == ["s2", "s4"]
    assert run_ids(tmp_path, "runs") == {"0-old", "c1", "s1", "s3", "c2", "p", "s5"}


def test_a_replacement_waits_for_a_sibling_folding_the_dead_attempt_and_takes_it_over(
        world, tmp_path, monkeypatch):
    """Two shards' replacements start together; one folds both dead attempts' journals. The
    other, finding its own dead attempt's lock held by that fold, must wait for the fold,
    not fence the attempt (which would send its answered pages again and pay them twice)."""
    out = tmp_path / "out"
    dead = killed_shard_run(world, out, store.new_run_id(), 2)
    folding = threading.Event()
    fold = recovery._fold_run

    def slow_fold(*args, **kwargs):
        folding.set()
        time.sleep(1.0)
        fold(*args, **kwargs)

    monkeypatch.setattr(recovery, "_fold_run", slow_fold)
    sibling = threading.Thread(target=recovery.recover_journals, args=(out, dead.pages_schema))
    sibling.start()
    assert folding.wait(10)
    taken, fenced = take_over(out, [], [dead.run_id], dead.pages_schema, wait_s=30)
    sibling.join()
    assert (taken, fenced) == ([dead.run_id], [])
    assert dead.run_id in run_ids(out, "runs")  # folded: its manifest written by the sibling

    alive = store.run_id_lock(out, "alive-run")  # an attempt whose worker lives on
    assert alive.try_acquire()
    try:
        assert take_over(out, [], ["alive-run"], dead.pages_schema, wait_s=0.5) == (
            [], ["alive-run"])
    finally:
        alive.release()
