"""Reconciliation: the selected runs' attempts against the vendor's usage logs, to the credit.

A log row is ours when its `client_request_id` is one `request_ids` built: it names its run,
and the row is that run's whichever runs were selected (matched with the attempt row that
holds its id, or, failing that, its `inference_id`; a run named only by a journal not folded
in yet counts when selected). Only the runs the rows name are read, never every attempt of
history. A row is `foreign` when it is no request of this output (another program on the
key, the playground, another output's runs): never matched by guess. The figures are the
selected runs'; rows of this output's other runs in the window are attributed in `billing`
(`others`) and judged when those runs are selected. The selection includes shard runs their
coordinator rejected (`store.fencing`): the vendor billed their requests, and as their
attempts do not count, those credits are unrecorded.

    vendor_*            the selected runs' rows: how many, and their credits (whole credits)
    recorded_credits    what our attempts recorded for the rows whose cost they hold
    unrecorded_credits  the vendor's credits of our rows whose cost we do not hold: no attempt
                        row, or one without a known cost (`lost`, or timed out before headers)
    unbilled_recorded   attempts with credits that no row of the window bills
    mismatched          rows whose recorded credits, rounded, differ from the vendor's
    pending             attempts newer than the window's end (now less `reconcile.lag_s`): the
                        vendor may not have logged them yet; a later reconcile settles them
    exact               nothing mismatched, unbilled or pending, and recorded + unrecorded
                        credits equal the vendor's

The figures are computed from the logs as read now; the `billing` table (`money.billing`)
gets every row new to it or attributed otherwise than its current row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.api import request_ids
from ernie_batch.api.usage_logs import UsageLogsClient, UsageRow, logs_url
from ernie_batch.config import JobConfig, whole_credits
from ernie_batch.location import OutputRoot
from ernie_batch.money import billing
from ernie_batch.run.selection import RunSelection

CLOCK_MARGIN = timedelta(minutes=5)  # our clock against the vendor's, each side of the span
ATTEMPT_COLUMNS = ["run_id", "key", "attempt", "client_request_id", "inference_id", "credits",
                   "credits_source", "started_at"]


@dataclass(frozen=True, slots=True)
class AttemptCost:
    """What one attempt row says that matching needs."""

    run_id: str
    key: str
    attempt: int
    client_request_id: str | None
    inference_id: str | None
    credits: float | None
    credits_source: str | None  # None: no cost known (lost, or no headers came)
    started_at: datetime


@dataclass
class Figures:
    """The reconcile summary (CONTRACT: the `reconcile` JSON keys), for all runs or one."""

    vendor_requests: int = 0
    vendor_credits: int = 0
    recorded_credits: float = 0.0
    unrecorded_credits: int = 0
    unbilled_recorded: int = 0
    mismatched: int = 0
    pending: int = 0
    foreign_requests: int = 0
    foreign_credits: int = 0
    exact: bool = False
    _recorded: list[float] = field(default_factory=list, repr=False)

    def settle(self) -> Figures:
        self.recorded_credits = math.fsum(self._recorded)
        self.exact = (self.mismatched == 0 and self.unbilled_recorded == 0 and self.pending == 0
                      and self.recorded_credits + self.unrecorded_credits == self.vendor_credits)
        return self

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class Reconciliation:
    """The figures over all selected runs, per run, and the billing rows of the logs read."""

    figures: Figures
    per_run: dict[str, Figures]
    rows: list[dict[str, Any]]
    run_ids: list[str]
    start: datetime | None = None  # the window asked of the logs (None: nothing to ask)
    end: datetime | None = None
    added: int = 0  # billing rows written: new to the table, or attributed anew
    # rows of this output's runs outside the selection, by run: attributed, not judged
    others: dict[str, Figures] = field(default_factory=dict)
    why: str | None = None  # which runs were selected and why (the default selection)


def match(rows: Iterable[UsageRow], attempts: Iterable[AttemptCost], run_ids: Iterable[str],
          window_end: datetime | None, reconcile_id: str, *,
          others: Mapping[str, str] | None = None) -> Reconciliation:
    """Pure: the figures of `rows` (one window of the logs) against the selected runs'
    attempts. `others` (run part of an id -> run id) are this output's runs outside the
    selection that rows name; their attempts may be among `attempts`: their rows are
    attributed to them, not judged."""
    run_ids = list(run_ids)
    attempts = list(attempts)
    total, per_run = Figures(), {r: Figures() for r in run_ids}
    outside: dict[str, Figures] = {}
    by_request = {a.client_request_id: a for a in attempts if a.client_request_id}
    by_inference = {a.inference_id: a for a in attempts if a.inference_id}
    named = {**(others or {}), **{request_ids.run_part(r): r for r in run_ids}}
    seen: set[tuple[str, str, int]] = set()
    out: list[dict[str, Any]] = []
    for row in rows:
        hit = by_request.get(row.client_request_id or "") or by_inference.get(row.inference_id)
        ref = request_ids.parse(row.client_request_id)
        run_id = hit.run_id if hit else (named.get(ref.run_id) if ref else None)
        billed = _billing_row(row, reconcile_id)
        out.append(billed)
        if run_id is None:
            total.foreign_requests += 1
            total.foreign_credits += row.cost_credits
            continue
        whose = hit or ref
        assert whose is not None  # a run id came from one of them
        billed.update(run_id=run_id, key=whose.key, attempt=whose.attempt, matched=hit is not None)
        if hit is not None and hit.credits_source is not None and hit.credits is not None:
            billed["recorded_credits"] = hit.credits
        if run_id not in per_run:
            _count(outside.setdefault(run_id, Figures()), row, hit)
            continue
        if hit is not None:
            seen.add((hit.run_id, hit.key, hit.attempt))
        for f in (total, per_run[run_id]):
            _count(f, row, hit)
    for a in attempts:
        if a.run_id not in per_run or (a.run_id, a.key, a.attempt) in seen:
            continue
        for f in (total, per_run[a.run_id]):
            if window_end is None or a.started_at >= window_end:
                f.pending += 1
            elif (a.credits or 0) > 0:
                f.unbilled_recorded += 1
    return Reconciliation(total.settle(), {r: f.settle() for r, f in per_run.items()}, out,
                          run_ids, others={r: f.settle() for r, f in outside.items()})


def _count(f: Figures, row: UsageRow, hit: AttemptCost | None) -> None:
    """One of our rows into a run's (or the total's) figures."""
    f.vendor_requests += 1
    f.vendor_credits += row.cost_credits
    if hit is None or hit.credits_source is None or hit.credits is None:
        f.unrecorded_credits += row.cost_credits
        return
    f._recorded.append(hit.credits)
    f.mismatched += whole_credits(hit.credits) != row.cost_credits


def _billing_row(row: UsageRow, reconcile_id: str) -> dict[str, Any]:
    return {
        "inference_id": row.inference_id, "request_id": row.request_id,
        "client_request_id": row.client_request_id, "created": row.created,
        "status": row.status, "model": row.model, "origin": row.origin,
        "cost_credits": row.cost_credits, "cost_usd": row.cost_usd,
        "tokens_input": row.tokens_input, "tokens_output": row.tokens_output,
        "tokens_total": row.tokens_total, "run_id": None, "key": None, "attempt": None,
        "matched": False, "recorded_credits": None, "reconcile_id": reconcile_id,
    }


def window(attempts: list[AttemptCost], runs: list[dict[str, Any]], now: datetime, lag_s: float,
           timeout_s: float) -> tuple[datetime, datetime] | None:
    """[start, end] to ask of the logs: the runs' span widened by the clock margin, ending no
    later than now less the lag (None when that leaves nothing to ask)."""
    starts = [a.started_at for a in attempts] + [r["started_at"] for r in runs if r["started_at"]]
    if not starts:
        return None
    ends = ([a.started_at + timedelta(seconds=timeout_s) for a in attempts]
            + [r["finished_at"] for r in runs if r.get("finished_at")] + starts)
    start = min(starts) - CLOCK_MARGIN
    end = min(max(ends) + CLOCK_MARGIN, now - timedelta(seconds=lag_s))
    return (start, end) if end > start else None


def _of_runs(run_ids: list[str]) -> pc.Expression:
    """Only these runs' rows (pushed down: parts of other runs are not read)."""
    return pc.field("run_id").isin(pa.array(run_ids, pa.string()))


def load_attempts(root: OutputRoot, run_ids: list[str]) -> list[AttemptCost]:
    table = store.read_columns(root, "attempts", ATTEMPT_COLUMNS, _of_runs(run_ids))
    if table is None:
        return []
    return [AttemptCost(*values) for values in zip(*(table[c].to_pylist()
                                                     for c in ATTEMPT_COLUMNS), strict=True)]


def _runs(root: OutputRoot, run_ids: list[str]) -> list[dict[str, Any]]:
    """Their starts and ends, rejected runs' too: the window covers every request billed."""
    table = store.read_columns(root, "runs", ["run_id", "started_at", "finished_at"],
                               _of_runs(run_ids), include_rejected=True)
    return table.to_pylist() if table is not None else []


def _models(root: OutputRoot, run_ids: list[str], default: str) -> list[str]:
    table = store.read_columns(root, "pages", ["run_id", "model"], _of_runs(run_ids))
    found = {m for m in (table["model"].to_pylist() if table is not None else []) if m}
    return sorted(found or {default})


def runs_named(root: OutputRoot, rows: Iterable[UsageRow], selected: Iterable[str]) -> dict[str, str]:
    """Run part -> run id of this output's runs outside `selected` that the rows' ids name:
    runs with a manifest (read one row per run), or with attempt rows (no manifest yet)."""
    mine = {request_ids.run_part(r) for r in selected}
    parts = {ref.run_id for row in rows
             if (ref := request_ids.parse(row.client_request_id)) and ref.run_id not in mine}
    if not parts:
        return {}
    runs = store.read_columns(root, "runs", ["run_id"], include_rejected=True)
    named = {part: rid for rid in (runs["run_id"].to_pylist() if runs is not None else [])
             if (part := request_ids.run_part(rid)) in parts}
    rest = sorted(parts - named.keys())  # ids `new_run_id` makes are their own run part
    found = store.read_columns(root, "attempts", ["run_id"], _of_runs(rest)) if rest else None
    named.update({rid: rid for rid in (found["run_id"].unique().to_pylist()
                                       if found is not None else [])})
    return named


async def reconcile_runs(cfg: JobConfig, key: SecretStr, chosen: RunSelection, *,
                         now: datetime | None = None,
                         transport: httpx.AsyncBaseTransport | None = None) -> Reconciliation:
    """Read the logs for the selected runs' span, match them, add to `billing` what is new
    or attributed anew."""
    root = cfg.output.root()
    reconcile_id = store.new_run_id()
    picked = chosen.choose(root, include_rejected=True)
    run_ids = picked.run_ids
    attempts = load_attempts(root, run_ids)
    now = now or datetime.now(UTC)
    span = window(attempts, _runs(root, run_ids), now, cfg.reconcile.lag_s, cfg.api.timeout_s)
    rows: list[UsageRow] = []
    if span is not None:
        async with UsageLogsClient(logs_url(cfg.api), key, timeout_s=cfg.api.timeout_s,
                                   allow_insecure_http=cfg.api.allow_insecure_http,
                                   transport=transport) as logs:
            rows = await logs.rows(*span, _models(root, run_ids, cfg.api.model))
    others = runs_named(root, rows, run_ids)
    if others:
        attempts += load_attempts(root, sorted(set(others.values())))
    result = match(rows, attempts, run_ids, span[1] if span else None, reconcile_id,
                   others=others)
    result.start, result.end = span or (None, None)
    result.why = picked.why
    result.added = billing.add_rows(root, result.rows, reconcile_id)
    return result
