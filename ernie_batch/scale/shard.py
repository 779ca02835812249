"""One shard run, as a worker runs it: the manifest's documents through an ordinary `Pipeline`.

The differences from a run of the CLI: its run id and its documents come from the
coordinator; it takes no folder run lock (the coordinator holds it for all its shards; each
shard holds the shared data lock and its own run-id lock, as every writer does); it is a
member of its key's limit through the Prefect server (`limit_share`), pacing its own
budget at its share, whatever its coordinator does; a fatal error or a budget stop here
stops every shard of the coordinator, and one raised elsewhere stops this one (`stop`).

A shard run that replaces an earlier attempt (its worker went silent) takes the earlier
one's work over when that one is dead: start-up recovery folds its journal (its run-id lock
is free), its rows count, its units are not sent again; its `runs` row lists the attempts
it took over (`accepted_runs`), so its coordinator accepts them with it. An earlier attempt
still alive (a worker that lost its server but lives on) is *fenced*: its rows never count
as done here, its units are sent again, and the coordinator will not accept it; its flow
run is `Crashed`, which stops it the moment it can talk to the server again. With the output
in a bucket, attempts may run on different machines, so each holds a run lease there
(`store.run_lease`): a later attempt that can take it knows the earlier one is dead (and a
paused one, woken, fails its renewal and stops); one it cannot take is alive, and fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from ernie_batch import store
from ernie_batch.buckets import resolve_access
from ernie_batch.config import api_key
from ernie_batch.errors import ConfigError, LeaseLost, LockedError
from ernie_batch.location import Location, OutputRoot, StrPath
from ernie_batch.run.engine import Pipeline, RunOptions
from ernie_batch.run.recovery import fold_dead_run
from ernie_batch.run.staged import recover_staged_run
from ernie_batch.run.summary import RunSummary
from ernie_batch.scale.limit_share import membership
from ernie_batch.scale.plan import document_of, job_config, read_json
from ernie_batch.scale.stop import ShardWatch
from ernie_batch.store.files import why
from ernie_batch.vocab import RunKind, RunOutcome


def output_root(output: str, storage_options: dict[str, Any] | None = None) -> OutputRoot:
    """The output a shard's manifest is in, reached from this worker: a folder as named (one
    host, or the same mount everywhere), a bucket with the config's storage options resolved
    here (their `env:` references read from this worker's environment)."""
    if not Location.parse(output).is_remote:
        return OutputRoot.of(output)
    return OutputRoot(OutputRoot.of(output).url, resolve_access(storage_options or {}))


def read_manifest(root: OutputRoot, key: str) -> dict[str, Any]:
    """The manifest at `key` below the output; one line when this worker cannot read it."""
    from obstore.exceptions import BaseError

    try:
        manifest = read_json(root, key)
    except (OSError, BaseError) as exc:  # a folder it does not see, a bucket it cannot reach
        raise ConfigError(f"shard manifest {root}/{key} cannot be read here: {why(exc)}") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"shard manifest {root}/{key} cannot be read here: a worker of a pool "
                          "must reach the run's output (on object storage, or the same folder)")
    return manifest


# how long an earlier attempt's run-id lock may stay held before it counts as alive: a sibling
# shard's start-up may be folding that dead attempt's journal (seconds, even for a big one)
FOLD_WAIT_S = 20.0
LEASE_DATE_SLACK_S = 2.0  # a lease lapses a second after its ttl, by whole-second dates


def take_over(root: StrPath | OutputRoot, recovered: list[str], earlier: list[str],
              schema: pa.Schema, wait_s: float = FOLD_WAIT_S) -> tuple[list[str], list[str]]:
    """The earlier attempts this run takes over (dead: folded now, by its start-up, or by a
    sibling's) and those it fences (alive: their run-id lock still held after `wait_s`).

    Waiting matters: a sibling folding the dead attempt holds its lock, and taking that for
    a live owner would fence the attempt, send its answered pages again and pay them twice.
    With the output in a bucket the earlier attempt may have run on another machine (its
    journal and lock are there, not here): its run lease says (`lapsed`). Dead, its staged
    rounds are committed and its `runs` row written (`run.staged`), so its answers count once.
    """
    root = OutputRoot.of(root)
    taken, fenced = [], []
    for run_id in earlier:
        if not root.is_local and not lapsed(root, run_id):
            fenced.append(run_id)
            continue
        dead = run_id in recovered or fold_dead_run(root, run_id, schema, wait_s) is not False
        if dead and not root.is_local:  # it may have died on another machine: what it staged
            recover_staged_run(root, run_id, schema)
        (taken if dead else fenced).append(run_id)
    return taken, fenced


REPLACED = "taken_over_by"  # a run lease's holder once a later attempt took it: a tombstone


def lapsed(root: OutputRoot, run_id: str) -> bool:
    """Whether an attempt's run lease is free (it died, or never started), taking it if so and
    leaving it taken (never released): an attempt that was only paused (SIGSTOP, a frozen VM)
    then fails its next renewal, learns it was replaced and stops, and one that had not
    started yet never starts (`holding_run_lease`). A lease still held is waited for, once,
    as long as it lives unrenewed: a live holder renews it meanwhile."""
    lease = store.run_lease(root, run_id, {REPLACED: "a later attempt of its shard"})
    return lease.lease.acquire(root.lease_ttl_s + LEASE_DATE_SLACK_S, poll_s=1.0)


@contextlib.contextmanager
def holding_run_lease(root: OutputRoot, run_id: str,
                      on_lost: Callable[[], None]) -> Iterator[Callable[[], None] | None]:
    """Hold this attempt's run lease while it runs (an output on object storage only): how a
    later attempt, on any machine, tells whether it lives. Yields the check its writes make
    first (LeaseLost once the lease is no longer trusted: lost, or not renewed within its
    ttl, as after a pause); None on a local folder."""
    if root.is_local:
        yield None
        return
    lease = store.run_lease(root, run_id, {"run_id": run_id, "pid": os.getpid(),
                                           "host": socket.gethostname()})
    if REPLACED in lease.holder() or not lease.try_acquire():
        raise LockedError(f"run lease of {run_id} in {root} is taken: a later attempt took the "
                          "shard over already")
    lease.on_lost = on_lost

    def check() -> None:
        if not lease.held:
            raise LeaseLost(f"run lease of {run_id} in {root} lost: a later attempt took the "
                            "shard over; nothing more is written")

    try:
        yield check
    finally:
        lease.release()


async def run_shard(root: OutputRoot, manifest_key: str, run_id: str,
                    earlier: list[str] | None = None,
                    flow_run_id: str | None = None) -> RunSummary:
    """Run the documents of the manifest at `manifest_key` (below the output `root`) under run
    id `run_id`, replacing the `earlier` attempts; `flow_run_id` (its own, in Prefect) is
    watched: not running any more, it stops. Everything comes from the manifest, nothing from
    the coordinator's disk."""
    manifest = read_manifest(root, manifest_key)
    cfg = job_config(manifest["job"], manifest.get("provenance"))
    key = api_key(cfg)  # from this worker's environment or a Secret block, never the manifest
    shard = int(manifest["shard"])
    coordinator = manifest["coordinator_run_id"]
    opts = RunOptions(kind=RunKind.SHARD, force=bool(manifest.get("force")),
                      retry_failed=bool(manifest.get("retry_failed")), run_id=run_id,
                      parent_run_id=coordinator, shard=shard,
                      wait_lock_s=float(manifest.get("wait_lock_s") or 600))
    docs = [document_of(d) for d in manifest["documents"]]
    lost = f"replaced: the run lease of {run_id} lapsed and a later attempt took the shard over"
    loop = asyncio.get_running_loop()
    runs: list[Pipeline] = []  # the run, once it exists: a lost lease stops it

    def on_lost() -> None:
        for run in runs:
            loop.call_soon_threadsafe(run.stop.set, RunOutcome.INTERRUPTED, lost)

    with holding_run_lease(cfg.output.root(), run_id, on_lost) as check:  # the config's ttl
        async with Pipeline(cfg, key, opts) as run:
            runs.append(run)
            run.recorder.check_writable = check
            watch = ShardWatch(coordinator, shard, flow_run_id, run.stop.set)
            run.stop.listeners.append(watch.raised)
            try:
                taken, fenced = await asyncio.to_thread(take_over, run.root, run.recovered,
                                                        earlier or [], run.pages_schema)
                run.recorder.accepted_runs = taken
                run.done.ignored_runs.update(fenced)
                run.progress.documents_total = len(docs)
                async with membership(cfg, key, run.run_id, run.budget, checks=[watch.check]):
                    await run.process(docs)
                return await run.finish()
            finally:
                await watch.aclose()
