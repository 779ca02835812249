"""A run on a bucket whose lease is taken over stops sending and ends `interrupted`.

The run lock on object storage is a lease object the run renews every third of its ttl
(`store.lease.KeptLease`). Another machine that takes it over (after it lapsed unrenewed:
the run was paused, or cut off) writes it with If-Match on its ETag; the run learns it at
its next renewal and must stop dispatching, since the new holder may be writing already.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import obstore
from deltalake import DeltaTable
from pydantic import SecretStr

from ernie_batch.buckets import client, resolve_access
from ernie_batch.location import Location
from ernie_batch.run.engine import Pipeline
from ernie_batch.store.lease import ObjectLease
from ernie_batch.vocab import RunOutcome
from tests import test_chaos as chaos
from tests.conftest import TEST_KEY, job_config


def test_a_run_whose_lease_is_taken_over_stops_sending(s3, sim_factory, tmp_path: Path) -> None:
    _, bucket = s3
    sim = sim_factory(latency_s=0.25)
    units = chaos.make_corpus(tmp_path / "in", images=60, pdf_pages=1, seed=31)
    out = f"s3://{bucket}/out"
    cfg = job_config(sim.url, out, [tmp_path / "in"], **{
        "output.lease_ttl_s": 3, "output.state_dir": str(tmp_path / "state"),
        "limits.concurrency": 2})
    lock = Location.parse(out) / ".lock"
    usurper = {"run_id": "another-machine"}
    taken: dict[str, float] = {}

    def take_over() -> None:
        """Once the run is sending, write its lease as another holder, If-Match on the ETag
        the run last wrote (what `try_acquire` does once a lease has lapsed)."""
        deadline = time.monotonic() + 120
        while len(sim.ledger()["entries"]) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        lease = ObjectLease(lock, resolve_access(), usurper, ttl_s=3)
        etag = obstore.head(client(resolve_access(), "s3", bucket), lock.key)["e_tag"]
        lease._put({"e_tag": etag})
        taken["sent"] = len(sim.ledger()["entries"])

    async def go():
        async with Pipeline(cfg, SecretStr(TEST_KEY)) as run:
            threading.Thread(target=take_over, daemon=True).start()
            await run.process(run.discover())
            return await run.finish()

    summary = asyncio.run(go())

    assert summary.outcome == RunOutcome.INTERRUPTED
    assert "lease" in (summary.error or "")
    sent = len(sim.ledger()["entries"])
    assert taken and sent < units  # it stopped: most units were never sent
    runs = DeltaTable(f"{out}/runs").to_pyarrow_table().to_pylist()
    assert [(r["run_id"], r["outcome"]) for r in runs] == [(summary.run_id, "interrupted")]
    pages = DeltaTable(f"{out}/pages").to_pyarrow_table()
    assert pages.num_rows == summary.units_ok + summary.units_failed  # what it answered, kept
    # the new holder keeps the lease: the run's release did not overwrite it
    assert ObjectLease(lock, resolve_access(), {}, ttl_s=3).holder() == usurper
