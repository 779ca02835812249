"""A run split over a Prefect work pool: discover, split, submit one shard run per shard, watch, sum up.

The coordinator runs in the calling process, never in the pool (a worker limited to one
flow run at a time could not run its own shards under it). It holds the output folder's run
lock for all its shards, owns the shared rate limit (`Granter`), submits the shard runs with
`run_deployment`, and reads each shard's result from `OUTPUT/runs`, not from Prefect's
results (those live on the worker's disk). A shard run that `Crashed` (its worker went
silent: no heartbeats) or failed is submitted again, at most `scale.retries` times, as a new
attempt under a new run id that takes the dead one's work over or fences a live one
(`ernie_batch.scale.shard`). Its own `runs` row (`kind = "coordinator"`) has no counts or
money (its shard runs have them) and lists the shard runs whose rows count
(`accepted_runs`). The same command run again after the coordinator died resumes its plan.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ernie_batch import interrupt, store
from ernie_batch.config import JobConfig, api_key
from ernie_batch.discover import discover
from ernie_batch.errors import ConfigError, LockedError
from ernie_batch.scale.channel import Channel, ShardReport, write_json
from ernie_batch.scale.granter import Granter
from ernie_batch.scale.limit_share import LimitShare
from ernie_batch.scale.outcome import ShardState, finish
from ernie_batch.scale.plan import (
    Attempt,
    Plan,
    absolute_overrides,
    find_unfinished,
    selection_digest,
    shard_overrides,
    split,
    write_manifest,
)
from ernie_batch.summary import RunSummary
from ernie_batch.vocab import RunOutcome

SHARD_FLOW = "ernie-shard"
POLL_S = 1.0
# a status line callback set by whoever starts the coordinator (the CLI), seen through Prefect
STATUS_OBSERVER: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "ernie_batch_coordinator_status", default=None)


def deployment_name(pool: str) -> str:
    """The shard flow's deployment on a pool (`ernie-batch deploy` creates it)."""
    return f"{SHARD_FLOW}/{pool}"


def pool_limit_problem(cfg: JobConfig) -> str | None:
    """Why the config's limits cannot be shared between shard runs; None when they can."""
    if cfg.limits.rpm <= 0 or cfg.limits.tpm > 0:
        return ("limits.rpm: a run on a pool shares the API's limit between its workers, so "
                "it must be set (> 0), and limits.tpm must be 0")
    return None


class Coordinator:
    """One coordinated run; `await run()` returns its summary."""

    def __init__(self, cfg: JobConfig, *, overrides: dict[str, Any], kind: str, pool: str,
                 shards: int, sources: list[Path] | None = None, force: bool = False,
                 retry_failed: bool = False, wait_lock_s: float = 0.0,
                 on_status: Callable[[str], None] | None = None) -> None:
        problem = pool_limit_problem(cfg)
        if problem:
            raise ConfigError(problem)
        self.cfg, self.kind, self.pool, self.shards = cfg, kind, pool, shards
        self.root = Path(cfg.output.path).absolute()
        self.started_at = datetime.now(UTC)
        self.run_id = store.new_run_id(self.started_at)
        self.force, self.retry_failed, self.wait_lock_s = force, retry_failed, wait_lock_s
        self.sources = sources
        self.overrides = absolute_overrides(cfg, overrides, sources)
        self.on_status = on_status  # None: no status line is built (it reads every report)
        self.states: list[ShardState] = []
        self.granter: Granter | None = None
        self.resumed = False
        self._graceful = interrupt.GRACEFUL.get()
        self._cancelling = False
        self._lock = store.OutputLock(self.root, self.run_id)
        self._data_lock = store.data_lock(self.root, exclusive=False)

    @property
    def channel(self) -> Channel:
        return Channel.of(self.root, self.run_id)

    async def run(self) -> RunSummary:
        store.check_writable(self.root)
        await asyncio.to_thread(self._lock.acquire, self.wait_lock_s)
        own = None
        try:
            if not await asyncio.to_thread(self._data_lock.acquire, self.wait_lock_s):
                raise LockedError(f"output folder {self.root} is being rewritten; "
                                  "use --wait to queue behind it")
            docs, stats = self._discover()
            plan = self._plan(docs)
            own = store.run_id_lock(self.root, self.run_id)
            own.try_acquire()
            granter = Granter(self.channel, per_window=plan.per_window, window_s=plan.window_s,
                              adaptive=self.cfg.limits.adaptive)
            self.granter = granter
            if self.resumed:
                granter.resume(self.channel)
            async with LimitShare(self.cfg.api.base_url, api_key(self.cfg), self.run_id,
                                  granter.window_s, granter):  # other runs of the key
                granting = asyncio.create_task(granter.run())
                try:
                    with self._signals():
                        await self._watch(plan)
                finally:
                    granter.stop()
                    await granting
            summary = finish(self, stats.skipped, granter.rate_limited)
            # a replaced shard run that lives on waits for grants that never come: stop it
            write_json(self.channel.stop, {"reason": "interrupted", "shard": None,
                                           "error": "its coordinator finished without it"})
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
        return discover(opts)

    def _plan(self, docs: list[Any]) -> Plan:
        """A new plan, or the plan of a coordinator of the same selection that died."""
        how = {"config_path": str(self.cfg.config_path) if self.cfg.config_path else None,
               "overrides": shard_overrides(self.overrides, self.cfg, self.shards),
               "kind": self.kind, "force": self.force, "retry_failed": self.retry_failed}
        digest = selection_digest(how, self.shards, [d.sha256 for d in docs])
        found = find_unfinished(self.root, digest)
        if found is not None:
            self.run_id, self.resumed = found.coordinator_run_id, True
            self._lock.run_id = self.run_id
            self.states = [ShardState(i, n, list(a)) for i, (n, a) in
                           enumerate(zip(found.documents, found.attempts, strict=True))]
            return found
        limits = self.cfg.limits
        groups = split(docs, self.shards)
        plan = Plan(self.run_id, digest, self.shards,
                    per_window=limits.rpm * limits.window_s / 60.0, window_s=limits.window_s,
                    attempts=[[] for _ in groups], documents=[len(g) for g in groups])
        for shard, group in enumerate(groups):
            write_manifest(self.channel, shard, group, how)
            self.states.append(ShardState(shard, len(group)))
        plan.write(self.channel)
        return plan

    # ---- submitting and watching

    async def _submit(self, plan: Plan, state: ShardState) -> None:
        from prefect.deployments import run_deployment

        earlier = [a.run_id for a in state.attempts]
        for run_id in earlier:
            self.granter.retire(run_id)  # type: ignore[union-attr]
        attempt = Attempt(store.new_run_id())
        self.granter.admit(attempt.run_id)  # type: ignore[union-attr]
        flow_run = await run_deployment(
            deployment_name(self.pool), timeout=0, as_subflow=True,
            parameters={"manifest": str(self.channel.manifest(state.shard)),
                        "run_id": attempt.run_id, "earlier": earlier},
            flow_run_name=f"{self.run_id}-shard-{state.shard}-{len(earlier) + 1}")
        attempt.flow_run_id = str(flow_run.id)
        state.attempts.append(attempt)
        state.state, state.message = "SCHEDULED", None
        plan.attempts[state.shard] = list(state.attempts)
        plan.write(self.channel)

    async def _watch(self, plan: Plan) -> None:
        from prefect.client.orchestration import get_client

        retries = self.cfg.scale.retries
        async with get_client() as client:
            for state in self.states:
                if state.documents and not state.attempts:
                    await self._submit(plan, state)
                elif state.attempts:
                    self.granter.admit(state.attempts[-1].run_id)  # type: ignore[union-attr]
            while not all(s.done or not s.documents for s in self.states):
                for state in self.states:
                    if state.done or not state.attempts:
                        continue
                    flow_run = await client.read_flow_run(state.attempts[-1].flow_run_id)
                    state.observe(flow_run.state)
                    if (state.state in ("CRASHED", "FAILED") and not self._cancelling
                            and len(state.attempts) <= retries):
                        await self._submit(plan, state)
                if self._cancelling:
                    await self._cancel(client)
                if self.on_status is not None:
                    self.on_status(self._status_line())
                await asyncio.sleep(POLL_S)

    def _status_line(self) -> str:
        reports = [ShardReport.read(self.channel.report(s.attempts[-1].run_id))
                   for s in self.states if s.attempts]
        sent = sum(r.used for r in reports if r is not None)
        states = ", ".join(f"{s.shard}: {s.state.lower()}" for s in self.states if s.documents)
        waiting = sum(1 for s in self.states if s.state in ("SCHEDULED", "PENDING"))
        hint = (f"; waiting for a worker of pool {self.pool!r} (`prefect worker start --pool "
                f"{self.pool}`)" if waiting else "")
        return f"coordinator {self.run_id}: shards {states}; {sent} requests sent{hint}"

    # ---- Ctrl-C

    def _signals(self) -> Any:
        """Ctrl-C or SIGTERM: cancel the shard runs through Prefect and wait for them."""
        import contextlib

        stack = contextlib.ExitStack()
        if self._graceful is not None:
            stack.enter_context(self._graceful.handling())
            stack.callback(self._graceful.subscribe(self._on_signal))
        return stack

    def _on_signal(self, hurry: bool) -> None:
        self._cancelling = True

    async def _cancel(self, client: Any) -> None:
        from prefect.states import Cancelling

        for state in self.states:
            if state.attempts and not state.done and not state.cancel_sent:
                await client.set_flow_run_state(state.attempts[-1].flow_run_id, Cancelling(),
                                                force=True)
                state.cancel_sent = True

    @property
    def interrupted(self) -> RunOutcome | None:
        return RunOutcome.INTERRUPTED if self._cancelling else None

    @property
    def exit_code_if_interrupted(self) -> int | None:
        return self._graceful.exit_code if self._graceful and self._cancelling else None
