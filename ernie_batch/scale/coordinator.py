"""A run split over a Prefect work pool: discover, split, submit one shard run per shard, watch, sum up.

The coordinator runs in the calling process, never in the pool (a worker limited to one
flow run at a time could not run its own shards under it). It holds the output folder's run
lock for all its shards, owns the shared rate limit (`Granter`), submits the shard runs with
`run_deployment`, and reads each shard's result from `OUTPUT/runs`, not from Prefect's
results (those live on the worker's disk). Its own `runs` row (`kind = "coordinator"`) has
no counts or money (its shard runs have them) and lists the shard runs it accepted.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ernie_batch import store
from ernie_batch.config import JobConfig
from ernie_batch.discover import discover
from ernie_batch.errors import ConfigError, LockedError
from ernie_batch.recorder import RunInfo
from ernie_batch.scale.channel import Channel, ShardReport
from ernie_batch.scale.granter import Granter
from ernie_batch.scale.plan import Attempt, Plan, split, write_manifest
from ernie_batch.summary import RunSummary
from ernie_batch.vocab import RUN_EXIT, ExitCode, RunKind, RunOutcome

SHARD_FLOW = "ernie-shard"
# a status line callback set by whoever starts the coordinator (the CLI), seen through Prefect
STATUS_OBSERVER: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "ernie_batch_coordinator_status", default=None)
POLL_S = 1.0
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# the most severe outcome of the shards is the coordinator's (CONTRACT "Exit codes")
SEVERITY = (RunOutcome.FATAL_API_ERROR, RunOutcome.BUDGET_STOPPED, RunOutcome.INTERRUPTED,
            RunOutcome.PARTIAL, RunOutcome.COMPLETED)


def deployment_name(pool: str) -> str:
    """The shard flow's deployment on a pool (`ernie-batch deploy` creates it)."""
    return f"{SHARD_FLOW}/{pool}"


@dataclass
class ShardState:
    shard: int
    documents: int
    attempts: list[Attempt] = field(default_factory=list)
    state: str = "SCHEDULED"
    message: str | None = None
    row: dict[str, Any] | None = None  # its accepted attempt's `runs` row

    @property
    def done(self) -> bool:
        return self.state in FINAL


def absolute_overrides(cfg: JobConfig, overrides: dict[str, Any],
                       sources: list[Path] | None) -> dict[str, Any]:
    """The overrides a worker needs to see what the coordinator sees: every path absolute."""
    out = dict(overrides)
    out["output.path"] = str(Path(cfg.output.path).absolute())
    out["sources.paths"] = [str(Path(p).expanduser().absolute())
                            for p in (sources or cfg.sources.paths)]
    for key in ("prompt.template_file", "prompt.schema_file"):
        if out.get(key):
            out[key] = str(Path(out[key]).expanduser().absolute())
    if cfg.budget.max_credits is not None:
        out.setdefault("budget.max_credits", cfg.budget.max_credits)
    return out


def shard_overrides(overrides: dict[str, Any], cfg: JobConfig, shards: int) -> dict[str, Any]:
    """Each shard's share of `budget.max_credits` (README "Running on several machines")."""
    if cfg.budget.max_credits is None:
        return overrides
    return {**overrides, "budget.max_credits": cfg.budget.max_credits / shards}


def selection_digest(how: dict[str, Any], shas: list[str]) -> str:
    return hashlib.sha256(json.dumps([how, sorted(shas)], sort_keys=True).encode()).hexdigest()


class Coordinator:
    """One coordinated run; `await run()` returns its summary."""

    def __init__(self, cfg: JobConfig, *, overrides: dict[str, Any], kind: str, pool: str,
                 shards: int, sources: list[Path] | None = None, force: bool = False,
                 retry_failed: bool = False, wait_lock_s: float = 0.0,
                 on_status: Callable[[str], None] | None = None) -> None:
        if cfg.limits.rpm <= 0:
            raise ConfigError("limits.rpm: a run on a pool shares the API's limit between its "
                              "workers, so it must be known: set limits.rpm (> 0)")
        if cfg.limits.tpm > 0:
            raise ConfigError("limits.tpm: not shared between workers yet; set it to 0 with --pool")
        self.cfg, self.kind, self.pool, self.shards = cfg, kind, pool, shards
        self.root = Path(cfg.output.path).absolute()
        self.started_at = datetime.now(UTC)
        self.run_id = store.new_run_id(self.started_at)
        self.force, self.retry_failed, self.wait_lock_s = force, retry_failed, wait_lock_s
        self.sources = sources
        self.overrides = absolute_overrides(cfg, overrides, sources)
        self.on_status = on_status or (lambda _text: None)
        self.channel = Channel.of(self.root, self.run_id)
        self._lock = store.OutputLock(self.root, self.run_id)
        self._data_lock = store.data_lock(self.root, exclusive=False)
        self._own_lock = store.run_id_lock(self.root, self.run_id)
        self.states: list[ShardState] = []

    async def run(self) -> RunSummary:
        store.check_writable(self.root)
        await asyncio.to_thread(self._lock.acquire, self.wait_lock_s)
        try:
            if not await asyncio.to_thread(self._data_lock.acquire, self.wait_lock_s):
                raise LockedError(f"output folder {self.root} is being rewritten; "
                                  "use --wait to queue behind it")
            self._own_lock.try_acquire()
            return await self._coordinate()
        finally:
            self._own_lock.release()
            self._data_lock.release()
            self._lock.release()

    async def _coordinate(self) -> RunSummary:
        opts = self.cfg.sources
        if self.sources:
            opts = opts.model_copy(update={"paths": list(self.sources)})
        docs, stats = discover(opts)
        groups = split(docs, self.shards)
        how = {"config_path": str(self.cfg.config_path) if self.cfg.config_path else None,
               "overrides": shard_overrides(self.overrides, self.cfg, self.shards),
               "kind": self.kind, "force": self.force, "retry_failed": self.retry_failed}
        limits = self.cfg.limits
        plan = Plan(self.run_id, selection_digest(how, [d.sha256 for d in docs]), self.shards,
                    per_window=limits.rpm * limits.window_s / 60.0, window_s=limits.window_s,
                    attempts=[[] for _ in groups])
        for shard, group in enumerate(groups):
            write_manifest(self.channel, shard, group, how)
            self.states.append(ShardState(shard, len(group)))
        granter = Granter(self.channel, self.shards, per_window=plan.per_window,
                          window_s=plan.window_s, adaptive=limits.adaptive)
        granting = asyncio.create_task(granter.run())
        try:
            await self._submit(plan)
            await self._watch()
        finally:
            granter.stop()
            await granting
        return self._finish(stats.skipped, granter.rate_limited)

    async def _submit(self, plan: Plan) -> None:
        from prefect.deployments import run_deployment

        for state in self.states:
            if state.documents == 0:
                state.state = "COMPLETED"  # nothing to do: no run
                continue
            attempt = Attempt(store.new_run_id())
            flow_run = await run_deployment(
                deployment_name(self.pool), timeout=0, as_subflow=True,
                parameters={"manifest": str(self.channel.manifest(state.shard)),
                            "run_id": attempt.run_id},
                flow_run_name=f"{self.run_id}-shard-{state.shard}")
            attempt.flow_run_id = str(flow_run.id)
            state.attempts.append(attempt)
            plan.attempts[state.shard].append(attempt)
            plan.write(self.channel)

    async def _watch(self) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            while not all(s.done for s in self.states):
                for state in self.states:
                    if state.done or not state.attempts:
                        continue
                    flow_run = await client.read_flow_run(state.attempts[-1].flow_run_id)
                    state.state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
                    if flow_run.state is not None:
                        state.message = flow_run.state.message
                self.on_status(self._status_line())
                await asyncio.sleep(POLL_S)

    def _status_line(self) -> str:
        reports = [ShardReport.read(self.channel.report(s.shard)) for s in self.states]
        sent = sum(r.used for r in reports if r is not None)
        states = ", ".join(f"{s.shard}: {s.state.lower()}" for s in self.states)
        waiting = sum(1 for s in self.states if s.state in ("SCHEDULED", "PENDING"))
        hint = (f"; waiting for a worker of pool {self.pool!r} (`prefect worker start --pool "
                f"{self.pool}`)" if waiting else "")
        return f"coordinator {self.run_id}: shards {states}; {sent} requests sent{hint}"

    def _finish(self, passed_over: dict[str, int], rate_limited: int) -> RunSummary:
        """Read the shards' `runs` rows, write the coordinator's, and sum the shards up."""
        ids = {a.run_id for s in self.states for a in s.attempts}
        rows = {}
        runs = store.read_table(self.root, "runs")
        if runs is not None:
            rows = {r["run_id"]: r for r in runs.to_pylist() if r["run_id"] in ids}
        accepted = []
        for state in self.states:
            done = [a for a in state.attempts if a.run_id in rows]
            if done:
                state.row = rows[done[-1].run_id]
                accepted.append(done[-1].run_id)
        outcome = self._outcome()
        finished = datetime.now(UTC)
        errors = [f"shard {s.shard}: {s.message or s.state.lower()}" for s in self.states
                  if s.row is None and s.attempts]
        info = RunInfo(run_id=self.run_id, kind=RunKind.COORDINATOR, started_at=self.started_at,
                       fingerprint=None, config_path=str(self.cfg.config_path)
                       if self.cfg.config_path else None, prompt_label=self.cfg.prompt.label)
        store.write_run_row(self.root, info.date, store.RunRow(
            run_id=self.run_id, kind=RunKind.COORDINATOR, config_path=info.config_path,
            fingerprint=None, started_at=self.started_at, finished_at=finished, documents=None,
            units_ok=None, units_failed=None, units_skipped=None, units_duplicate=None,
            units_already_done=None, units_not_sent=None, requests=None, credits=None,
            usd=None, outcome=outcome, error="; ".join(errors) or None, hostname=info.hostname,
            pid=info.pid, prompt_label=info.prompt_label, accepted_runs=accepted))
        return self._summary(outcome, finished, passed_over, rate_limited, errors)

    def _outcome(self) -> RunOutcome:
        found = {RunOutcome(s.row["outcome"]) for s in self.states if s.row is not None}
        if any(s.row is None and s.attempts for s in self.states):
            found.add(RunOutcome.PARTIAL)  # a shard run that failed or crashed
        return next((o for o in SEVERITY if o in found), RunOutcome.COMPLETED)

    def _summary(self, outcome: RunOutcome, finished: datetime, passed_over: dict[str, int],
                 rate_limited: int, errors: list[str]) -> RunSummary:
        rows = [s.row for s in self.states if s.row is not None]

        def total(name: str) -> int:
            return sum(int(r[name] or 0) for r in rows)

        return RunSummary(
            run_id=self.run_id, kind=RunKind.COORDINATOR, outcome=outcome,
            exit_code=RUN_EXIT.get(outcome, ExitCode.FAILED), error="; ".join(errors) or None,
            documents=total("documents"), units_ok=total("units_ok"),
            units_failed=total("units_failed"), units_skipped=total("units_skipped"),
            units_duplicate=total("units_duplicate"),
            units_already_done=total("units_already_done"),
            units_not_sent=total("units_not_sent"), requests=total("requests"),
            rate_limited=rate_limited,
            credits=math.fsum(r["credits"] or 0.0 for r in rows),
            usd=math.fsum(r["usd"] or 0.0 for r in rows),
            duration_s=(finished - self.started_at).total_seconds(), output=str(self.root),
            files_passed_over=passed_over, shard_runs=[
                {"shard": s.shard, "run_id": s.row["run_id"], "hostname": s.row["hostname"],
                 "outcome": s.row["outcome"], "units_ok": s.row["units_ok"]} for s in self.states
                if s.row is not None])

