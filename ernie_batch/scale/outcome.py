"""What a coordinated run came to: which shard runs count, the coordinator's row, one summary.

Everything comes from what is committed, the `runs` and `documents` tables, and from the
shard runs' Prefect states. A shard's accepted attempt is its last one that wrote
a `runs` row; the earlier attempts that one took over (dead: their journals folded, their
work kept; its row lists them in `accepted_runs`) are accepted with it; every other attempt
of the shard (fenced: alive when replaced) is rejected: its rows stay on disk but no reader
of ours counts them (`store.fencing`). The coordinator's outcome is the most severe of its
shards' (CONTRACT "Exit codes": 3, 4, 130/143, 1, 0), and so is its flow run's final state
(`flow_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.compute as pc

from ernie_batch import store
from ernie_batch.run.recorder import RunInfo
from ernie_batch.run.summary import RunSummary
from ernie_batch.scale.plan import Attempt
from ernie_batch.vocab import RUN_EXIT, ExitCode, RunKind, RunOutcome

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SEVERITY = (RunOutcome.FATAL_API_ERROR, RunOutcome.BUDGET_STOPPED, RunOutcome.INTERRUPTED,
            RunOutcome.PARTIAL, RunOutcome.COMPLETED)
FAILED_AS = {RunOutcome.FATAL_API_ERROR: "FatalApiError", RunOutcome.BUDGET_STOPPED:
             "BudgetStopped"}  # a run's final Prefect state, `Failed` by these names


@dataclass
class ShardState:
    shard: int
    documents: int
    attempts: list[Attempt] = field(default_factory=list)
    state: str = "SCHEDULED"
    name: str | None = None  # the state's name: `Failed` from an exception, else ours
    message: str | None = None
    cancel_sent: bool = False
    row: dict[str, Any] | None = None  # its accepted attempt's `runs` row

    @property
    def done(self) -> bool:
        return self.state in FINAL

    def observe(self, state: Any) -> None:
        self.state = state.type.value if state is not None else "SCHEDULED"
        self.name = state.name if state is not None else None
        self.message = state.message if state is not None else None

    @property
    def worth_retrying(self) -> bool:
        """Crashed (no heartbeats), or failed by an exception (not by a stop of ours)."""
        return self.state == "CRASHED" or (self.state == "FAILED" and self.name == "Failed")


def flow_state(summary: RunSummary) -> Any:
    """The final Prefect state of a shard run or a coordinator, carrying its summary:
    `Cancelled` when interrupted, `Failed` on a fatal error, a budget stop or a shard that
    failed for good, else `Completed` (units that failed are rows, as in a single run)."""
    from prefect.states import Cancelled, Completed, Failed

    data = summary.model_dump(mode="json")
    outcome = RunOutcome(summary.outcome)
    if outcome == RunOutcome.INTERRUPTED:
        return Cancelled(message=summary.error or "interrupted", data=data)
    if outcome in FAILED_AS:
        return Failed(name=FAILED_AS[outcome], message=summary.error, data=data)
    if summary.error:
        return Failed(message=summary.error, data=data)
    return Completed(data=data)


def accepted_runs(coordinator: Any, rows: dict[str, dict[str, Any]]) -> list[str]:
    """Per shard: its last attempt with a `runs` row, and the attempts that one took over."""
    accepted = []
    for state in coordinator.states:
        done = [a for a in state.attempts if a.run_id in rows]
        if not done:
            continue
        state.row = rows[done[-1].run_id]
        taken = state.row.get("accepted_runs") or []
        accepted += [state.row["run_id"], *(r for r in taken if r in rows)]
    return accepted


def documents_built(root: Any, run_ids: list[str]) -> tuple[int, int]:
    """(documents built by these runs, of them complete): each document's newest build."""
    built = store.read_columns(root, "documents", ["key", "complete", "built_at"],
                               pc.field("run_id").isin(run_ids), include_rejected=True)
    if built is None or built.num_rows == 0:
        return 0, 0
    newest = built.sort_by([("built_at", "descending")]).to_pylist()
    complete: dict[str, bool] = {}
    for row in newest:
        complete.setdefault(row["key"], bool(row["complete"]))
    return len(complete), sum(complete.values())


ROWS = ("units_ok", "units_failed", "units_skipped", "units_duplicate")  # a row per unit
SUMMED = ("requests", "rate_limited", "refused_sporadic")


def shard_counts(final: dict[str, Any], taken: list[dict[str, Any]]) -> dict[str, int]:
    """A shard's counts from its accepted attempt's `runs` row and those of the dead attempts
    it took over (`accepted_runs`): their rows are this shard's work, and the last attempt
    counted the units they wrote as already done, so those move from `already_done` back to
    where the dead attempts recorded them. The six counts add up to `units_selected`, the
    last attempt's (it selected the whole shard)."""
    def count(row: dict[str, Any], name: str) -> int:
        return int(row[name] or 0)

    counts = {name: sum(count(r, name) for r in (final, *taken)) for name in (*ROWS, *SUMMED)}
    written = sum(count(r, name) for r in taken for name in ROWS)
    counts |= {"units_already_done": max(0, count(final, "units_already_done") - written),
               "units_not_sent": count(final, "units_not_sent"),
               "units_selected": count(final, "units_selected"),
               "documents": count(final, "documents")}
    return counts


def finish(coordinator: Any, passed_over: dict[str, int]) -> RunSummary:
    """Write the coordinator's `runs` row and return the summary over its shard runs."""
    ids = [a.run_id for s in coordinator.states for a in s.attempts]
    runs = store.read_columns(coordinator.root, "runs", store.RUNS_SCHEMA.names,
                              pc.field("run_id").isin(ids), include_rejected=True) if ids else None
    rows = {r["run_id"]: r for r in runs.to_pylist()} if runs is not None else {}
    accepted = accepted_runs(coordinator, rows)
    errors = [f"shard {s.shard}: {s.message or s.state.lower()}" for s in coordinator.states
              if s.row is None and s.attempts]
    if coordinator.lease_lost:
        errors.insert(0, coordinator.lease_lost)
    found = {RunOutcome(s.row["outcome"]) for s in coordinator.states if s.row is not None}
    if errors:
        found.add(RunOutcome.PARTIAL)  # a shard run that failed or crashed for good
    if coordinator.interrupted:
        found.add(coordinator.interrupted)
    outcome = next((o for o in SEVERITY if o in found), RunOutcome.COMPLETED)
    finished = datetime.now(UTC)
    cfg = coordinator.cfg
    info = RunInfo(run_id=coordinator.run_id, kind=RunKind.COORDINATOR,
                   started_at=coordinator.started_at, fingerprint=None,
                   config_path=str(cfg.config_path) if cfg.config_path else None,
                   prompt_label=cfg.prompt.label)
    store.write_run_row(coordinator.root, info.date, store.RunRow(
        run_id=info.run_id, kind=RunKind.COORDINATOR, config_path=info.config_path,
        fingerprint=None, started_at=info.started_at, finished_at=finished, documents=None,
        units_ok=None, units_failed=None, units_skipped=None, units_duplicate=None,
        units_already_done=None, units_not_sent=None, requests=None, credits=None, usd=None,
        outcome=outcome, error="; ".join(errors) or None, hostname=info.hostname, pid=info.pid,
        prompt_label=info.prompt_label, accepted_runs=accepted))
    counted = [rows[r] for r in accepted]
    shards = [shard_counts(s.row, [rows[r] for r in s.row.get("accepted_runs") or []
                                   if r in rows])
              for s in coordinator.states if s.row is not None]

    def total(name: str) -> int:
        return sum(shard[name] for shard in shards)

    exit_code = coordinator.exit_code_if_interrupted if outcome == RunOutcome.INTERRUPTED \
        else None
    built, complete = documents_built(coordinator.root, accepted) if accepted else (0, 0)
    stops = [s.row["error"] for s in coordinator.states
             if s.row is not None and s.row["outcome"] == outcome and s.row["error"]]
    return RunSummary(
        run_id=coordinator.run_id, kind=RunKind.COORDINATOR, outcome=outcome,
        exit_code=exit_code or RUN_EXIT.get(outcome, ExitCode.FAILED),
        error="; ".join(errors) or (stops[0] if stops else None), documents=total("documents"),
        units_ok=total("units_ok"), units_failed=total("units_failed"),
        units_skipped=total("units_skipped"), units_duplicate=total("units_duplicate"),
        units_already_done=total("units_already_done"), units_not_sent=total("units_not_sent"),
        units_selected=total("units_selected"), requests=total("requests"),
        rate_limited=total("rate_limited"), refused_sporadic=total("refused_sporadic"),
        credits=math.fsum(r["credits"] or 0.0 for r in counted),
        usd=math.fsum(r["usd"] or 0.0 for r in counted),
        duration_s=(finished - coordinator.started_at).total_seconds(),
        output=str(coordinator.root), files_passed_over=passed_over,
        documents_built=built, documents_complete=complete,
        shard_runs=[{"shard": s.shard, "run_id": s.row["run_id"], "hostname": s.row["hostname"],
                     "outcome": s.row["outcome"], "units_ok": s.row["units_ok"],
                     "attempts": len(s.attempts)}
                    for s in coordinator.states if s.row is not None])
