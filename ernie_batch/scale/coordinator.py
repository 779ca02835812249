"""A run split over a Prefect work pool: discover, split, submit one shard run per shard, watch, sum up.

The coordinator runs in the calling process, never in the pool (a worker limited to one
flow run at a time could not run its own shards under it). It holds the output's run lock
for all its shards (an flock on a folder, the lease object in a bucket), writes each shard's
manifest to the output (`plan`: everything as data, no path of this machine), submits the
shard runs with `run_deployment`, watches their Prefect states, and reads each shard's
result from `OUTPUT/runs`, not from Prefect's results (those live on the worker's disk).
It sends no request and is no member of the key's limit: each
shard run is one, through the Prefect server (`limit_share`). A shard run that `Crashed`
(its worker went silent: no heartbeats) or failed by an exception is submitted again, at
most `scale.retries` times, as a new attempt under a new run id that takes the dead one's
work over or fences a live one (`ernie_batch.scale.shard`); one stopped by a stop
(`ernie_batch.scale.stop`) is not. Its own `runs` row (`kind = "coordinator"`) has no
counts or money (its shard runs have them) and lists the shard runs whose rows count
(`accepted_runs`). The same command run again after the coordinator died resumes its plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ernie_batch import store
from ernie_batch.config import JobConfig
from ernie_batch.errors import ConfigError, LockedError
from ernie_batch.intake.discover import discover
from ernie_batch.location import Location
from ernie_batch.run import interrupt
from ernie_batch.run.summary import RunSummary
from ernie_batch.scale.outcome import ShardState, finish
from ernie_batch.scale.plan import (
    Attempt,
    Folder,
    Plan,
    find_unfinished,
    job_data,
    provenance,
    selection_digest,
    split,
    write_manifest,
)
from ernie_batch.scale.stop import clear_stop, read_stop
from ernie_batch.vocab import RunOutcome

SHARD_FLOW = "ernie-shard"
POLL_S = 0.5  # how often the shard runs' states are read (one request for all of them)
# a status line callback set by whoever starts the coordinator (the CLI), seen through Prefect
STATUS_OBSERVER: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "ernie_batch_coordinator_status", default=None)


def deployment_name(pool: str) -> str:
    """The shard flow's deployment on a pool (`ernie-batch deploy` creates it)."""
    return f"{SHARD_FLOW}/{pool}"


def pool_problem(cfg: JobConfig, sources: list[str] | None = None) -> str | None:
    """Why the config cannot run on a pool; None when it can. Workers on other machines read
    no local path of the coordinator's (so the sources must be on object storage: `sources`
    as given, else the config's), carry no secret but their own (no PDF password), and the
    limit is shared by requests (not by tokens). A local output folder stays allowed: one
    host, or a folder mounted at the same path on every worker."""
    given = [Location.parse(s) for s in sources] if sources else list(cfg.sources.paths)
    local = next((s for s in given if not s.is_remote), None)
    if local is not None:
        where = "sources" if sources else "sources.paths"
        return (f"{where}: {local} is a local path, which the workers of a pool cannot read; "
                "put the documents on object storage (s3://...) to run them with --pool")
    if cfg.pdf.password is not None:
        return ("pdf.password: a run on a pool sends no secret to its workers; "
                "run encrypted PDFs without --pool")
    if cfg.limits.rpm <= 0 or cfg.limits.tpm > 0:
        return ("limits.rpm: a run on a pool shares the API's limit between its workers, so "
                "it must be set (> 0), and limits.tpm must be 0")
    return None


class Coordinator:
    """One coordinated run; `await run()` returns its summary."""

    def __init__(self, cfg: JobConfig, *, kind: str, pool: str,
                 shards: int, sources: list[str] | None = None, force: bool = False,
                 retry_failed: bool = False, wait_lock_s: float = 0.0,
                 on_status: Callable[[str], None] | None = None) -> None:
        problem = pool_problem(cfg, sources)
        if problem:
            raise ConfigError(problem)
        self.cfg, self.kind, self.pool, self.shards = cfg, kind, pool, shards
        self.root = cfg.output.root()
        self.started_at = datetime.now(UTC)
        self.run_id = store.new_run_id(self.started_at)
        self.force, self.retry_failed, self.wait_lock_s = force, retry_failed, wait_lock_s
        self.sources = sources  # object-store URLs, as given: never through pathlib
        self.on_status = on_status  # None: no status line is built
        self.states: list[ShardState] = []
        self.resumed = False
        self.stop: dict[str, Any] | None = None  # a stop a shard raised: no more retries
        self._graceful = interrupt.GRACEFUL.get()
        self._cancelling = False
        self.lease_lost: str | None = None  # the output's lease (in a bucket) was taken over
        self._woken: asyncio.Event | None = None  # a signal came: act now, not at the next poll
        self._lock = store.OutputLock(self.root, self.run_id)
        self._data_lock = store.data_lock(self.root, exclusive=False)

    @property
    def folder(self) -> Folder:
        return Folder.of(self.root, self.run_id)

    async def run(self) -> RunSummary:
        from prefect.client.orchestration import get_client

        store.check_writable(self.root)
        await asyncio.to_thread(self._lock.acquire, self.wait_lock_s)
        loop = asyncio.get_running_loop()
        self._lock.when_lost(lambda: loop.call_soon_threadsafe(self._on_lease_lost))
        own = None
        try:
            if not await asyncio.to_thread(self._data_lock.acquire, self.wait_lock_s):
                raise LockedError(f"output {self.root} is being rewritten; "
                                  "use --wait to queue behind it")
            docs, stats = self._discover()
            plan = self._plan(docs)
            own = store.run_id_lock(self.root, self.run_id)
            own.try_acquire()
            with self._signals():
                await self._watch(plan)
            summary = await asyncio.to_thread(finish, self, stats.skipped)
            async with get_client() as client:
                await clear_stop(client, self.run_id)
            return summary
        finally:
            if own is not None:
                own.release()
            self._data_lock.release()
            self._lock.release()

    # ---- planning

    def _discover(self) -> tuple[list[Any], Any]:
        opts = self.cfg.sources
        if self.sources:
            opts = opts.model_copy(update={"paths": list(self.sources)})
        # objects on object storage whose (URL, ETag) the output knows are not read again
        return discover(opts, known=functools.partial(store.known_objects, self.root))

    def _plan(self, docs: list[Any]) -> Plan:
        """A new plan, or the plan of a coordinator of the same selection that died."""
        how = {"job": job_data(self.cfg, self.sources, self.shards),
               "provenance": provenance(self.cfg),
               "kind": self.kind, "force": self.force, "retry_failed": self.retry_failed}
        digest = selection_digest(how, self.shards, [d.sha256 for d in docs])
        found = find_unfinished(self.root, digest)
        if found is not None:
            self.run_id, self.resumed = found.coordinator_run_id, True
            self._lock.run_id = self.run_id
            self.states = [ShardState(i, n, list(a)) for i, (n, a) in
                           enumerate(zip(found.documents, found.attempts, strict=True))]
            return found
        groups = split(docs, self.shards)
        plan = Plan(self.run_id, digest, self.shards, attempts=[[] for _ in groups],
                    documents=[len(g) for g in groups])
        for shard, group in enumerate(groups):
            write_manifest(self.folder, shard, group, how)
            self.states.append(ShardState(shard, len(group)))
        plan.write(self.folder)
        return plan

    # ---- submitting and watching

    async def _submit(self, plan: Plan, state: ShardState) -> None:
        from prefect.deployments import run_deployment

        earlier = [a.run_id for a in state.attempts]
        attempt = Attempt(store.new_run_id())
        flow_run = await run_deployment(
            deployment_name(self.pool), timeout=0, as_subflow=True,
            parameters={"output": self.root.url, "manifest": self.folder.manifest(state.shard),
                        "storage_options": dict(self.cfg.output.storage_options),
                        "run_id": attempt.run_id, "earlier": earlier},
            flow_run_name=f"{self.run_id}-shard-{state.shard}-{len(earlier) + 1}")
        attempt.flow_run_id = str(flow_run.id)
        state.attempts.append(attempt)
        state.state, state.name, state.message = "SCHEDULED", None, None
        plan.attempts[state.shard] = list(state.attempts)
        plan.write(self.folder)

    async def _watch(self, plan: Plan) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        retries = self.cfg.scale.retries
        self._woken = asyncio.Event()
        async with get_client() as client:
            for state in self.states:
                if state.documents and not state.attempts:
                    await self._submit(plan, state)
            while not all(s.done or not s.documents for s in self.states):
                watched = {s.attempts[-1].flow_run_id: s for s in self.states
                           if s.attempts and not s.done}
                found = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=list(watched))))
                for flow_run in found:
                    watched[str(flow_run.id)].observe(flow_run.state)
                self.stop = self.stop or await read_stop(client, self.run_id)
                for state in watched.values():
                    if (state.worth_retrying and not self._cancelling and self.stop is None
                            and len(state.attempts) <= retries):
                        await self._submit(plan, state)
                if self._cancelling:
                    await self._cancel(client)
                if self.on_status is not None:
                    self.on_status(self._status_line())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), POLL_S)
                self._woken.clear()

    def _status_line(self) -> str:
        from ernie_batch.scale.pool import worker_command

        states = ", ".join(f"{s.shard}: {s.state.lower()}" for s in self.states if s.documents)
        waiting = sum(1 for s in self.states if s.state in ("SCHEDULED", "PENDING"))
        hint = (f"; waiting for a worker of pool {self.pool!r} (`{worker_command(self.pool)}`)"
                if waiting else "")
        return f"coordinator {self.run_id}: shards {states}{hint}"

    # ---- Ctrl-C

    def _signals(self) -> Any:
        """Ctrl-C or SIGTERM: cancel the shard runs through Prefect and wait for them."""
        stack = contextlib.ExitStack()
        if self._graceful is not None:
            stack.enter_context(self._graceful.handling())
            stack.callback(self._graceful.subscribe(self._on_signal))
        return stack

    def _on_signal(self, hurry: bool) -> None:
        self._cancelling = True
        if self._woken is not None:
            self._woken.set()

    def _on_lease_lost(self) -> None:
        """Another run took the output's lease (ours lapsed unrenewed): stop as on Ctrl-C."""
        self.lease_lost = (f"the lease on output {self.root} was lost (not renewed in time, "
                           "then taken over): its shard runs were cancelled")
        self._on_signal(False)

    async def _cancel(self, client: Any) -> None:
        """A running shard run is cancelled through its worker (SIGTERM: a graceful stop);
        one no worker has started yet is cancelled at once."""
        from prefect.states import Cancelled, Cancelling

        for state in self.states:
            if state.attempts and not state.done and not state.cancel_sent:
                started = state.state in ("RUNNING", "CANCELLING")
                await client.set_flow_run_state(
                    state.attempts[-1].flow_run_id,
                    Cancelling() if started else Cancelled(message="its coordinator was "
                                                                   "interrupted"), force=True)
                state.cancel_sent = started
                if not started:
                    state.state = "CANCELLED"

    @property
    def interrupted(self) -> RunOutcome | None:
        return RunOutcome.INTERRUPTED if self._cancelling else None

    @property
    def exit_code_if_interrupted(self) -> int | None:
        signalled = self._graceful is not None and self._graceful.signum is not None
        return self._graceful.exit_code if signalled and self._cancelling else None
