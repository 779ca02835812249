"""What a coordinated run came to: which shard runs count, the coordinator's row, one summary.

A shard's accepted attempt is its last one that wrote a `runs` row; the earlier attempts it
took over (dead: their journals folded, their work kept) are accepted with it; every other
attempt of the shard (fenced: alive when replaced) is rejected: its rows stay on disk but no
reader of ours counts them (`store.fencing`). The coordinator's outcome is the most severe of
its shards' (CONTRACT "Exit codes": 3, 4, 130/143, 1, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ernie_batch import store
from ernie_batch.recorder import RunInfo
from ernie_batch.scale.channel import ShardReport
from ernie_batch.scale.plan import Attempt
from ernie_batch.summary import RunSummary
from ernie_batch.vocab import RUN_EXIT, ExitCode, RunKind, RunOutcome

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SEVERITY = (RunOutcome.FATAL_API_ERROR, RunOutcome.BUDGET_STOPPED, RunOutcome.INTERRUPTED,
            RunOutcome.PARTIAL, RunOutcome.COMPLETED)


@dataclass
class ShardState:
    shard: int
    documents: int
    attempts: list[Attempt] = field(default_factory=list)
    state: str = "SCHEDULED"
    message: str | None = None
    cancel_sent: bool = False
    row: dict[str, Any] | None = None  # its accepted attempt's `runs` row

    @property
    def done(self) -> bool:
        return self.state in FINAL

    def observe(self, state: Any) -> None:
        self.state = state.type.value if state is not None else "SCHEDULED"
        self.message = state.message if state is not None else None


def accepted_runs(coordinator: Any, rows: dict[str, dict[str, Any]]) -> list[str]:
    """Per shard: its last attempt with a `runs` row, and the attempts that one took over."""
    accepted = []
    for state in coordinator.states:
        done = [a for a in state.attempts if a.run_id in rows]
        if not done:
            continue
        last = done[-1].run_id
        state.row = rows[last]
        report = ShardReport.read(coordinator.channel.report(last))
        taken = (report.extra.get("taken_over", []) if report else [])
        accepted += [last, *(r for r in taken if r in rows)]
    return accepted


def finish(coordinator: Any, passed_over: dict[str, int], rate_limited: int) -> RunSummary:
    """Write the coordinator's `runs` row and return the summary over its shard runs."""
    ids = {a.run_id for s in coordinator.states for a in s.attempts}
    runs = store.read_table(coordinator.root, "runs", include_rejected=True)
    rows = {r["run_id"]: r for r in runs.to_pylist() if r["run_id"] in ids} if runs else {}
    accepted = accepted_runs(coordinator, rows)
    errors = [f"shard {s.shard}: {s.message or s.state.lower()}" for s in coordinator.states
              if s.row is None and s.attempts]
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

    def total(name: str) -> int:
        return sum(int(r[name] or 0) for r in counted)

    exit_code = coordinator.exit_code_if_interrupted if outcome == RunOutcome.INTERRUPTED \
        else None
    return RunSummary(
        run_id=coordinator.run_id, kind=RunKind.COORDINATOR, outcome=outcome,
        exit_code=exit_code or RUN_EXIT.get(outcome, ExitCode.FAILED),
        error="; ".join(errors) or None, documents=total("documents"),
        units_ok=total("units_ok"), units_failed=total("units_failed"),
        units_skipped=total("units_skipped"), units_duplicate=total("units_duplicate"),
        units_already_done=total("units_already_done"), units_not_sent=total("units_not_sent"),
        requests=total("requests"), rate_limited=rate_limited,
        credits=math.fsum(r["credits"] or 0.0 for r in counted),
        usd=math.fsum(r["usd"] or 0.0 for r in counted),
        duration_s=(finished - coordinator.started_at).total_seconds(),
        output=str(coordinator.root), files_passed_over=passed_over,
        shard_runs=[{"shard": s.shard, "run_id": s.row["run_id"], "hostname": s.row["hostname"],
                     "outcome": s.row["outcome"], "units_ok": s.row["units_ok"],
                     "attempts": len(s.attempts)}
                    for s in coordinator.states if s.row is not None])
