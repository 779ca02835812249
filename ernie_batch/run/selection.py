"""Which runs a command looks at: `--run ID` (repeatable), `--since D [--until D]`, or by default
the newest run that did something.

Shared by `report`, `reconcile`, `review` and `documents`. The default is the newest run that
selected at least one unit with a page row (or sent a request: a run stopped before any
answer came), of kind run, ingest, backfill, demo or coordinator:
never `eval` (it measures prompt versions on a labelled sample), nor the scheduled runs that
found nothing new (the most common run there is). It is found from the `runs` table's
counters, one row per run, never from the page rows of history; runs with no manifest yet
(still running, or killed and not folded in) are found in `pages`, read only for rows newer
than the run the counters found. A coordinator's run id selects it and its shard runs (those
it rejected only when asked: `report` lists them as orphaned, `reconcile` counts what the
vendor billed them); dates are UTC and compare with a run's start. `choose` also says, in one
line for stderr, which runs it chose and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.intake.discover import parse_bound
from ernie_batch.location import OutputRoot
from ernie_batch.store import read_columns
from ernie_batch.vocab import RunKind

# the kinds the default selection may choose (a run whose manifest names no kind is one too)
CHOSEN_KINDS = frozenset({RunKind.RUN, RunKind.INGEST, RunKind.BACKFILL, RunKind.DEMO,
                          RunKind.COORDINATOR})
ROW_COUNTS = ("units_ok", "units_failed", "units_skipped", "units_duplicate")  # page rows
NO_MANIFEST = "no manifest yet: running, or killed and not folded in"
_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True, slots=True)
class _Run:
    run_id: str
    kind: str | None
    started_at: datetime | None
    parent_run_id: str | None
    rows: int  # page rows it wrote
    requests: int = 0  # requests it sent (a run stopped early may have no page row)


@dataclass(frozen=True)
class Chosen:
    """The selected run ids (oldest first) and, unless they were named by id, why these."""

    run_ids: list[str]
    why: str | None = None


@dataclass(frozen=True)
class RunSelection:
    run_ids: tuple[str, ...] = ()
    since: str | None = None  # ISO date or datetime, UTC, inclusive
    until: str | None = None  # exclusive

    @property
    def describe(self) -> str:
        if self.run_ids:
            return "run " + ", ".join(self.run_ids)
        if self.since or self.until:
            return f"runs started in [{self.since or '…'}, {self.until or '…'})"
        return "the newest run with pages"

    def resolve(self, root: OutputRoot, *, include_rejected: bool = False) -> list[str]:
        """The selected run ids, shard runs of selected coordinators included (rejected ones
        with `include_rejected`, see `store.fencing`), oldest first."""
        return self.choose(root, include_rejected=include_rejected).run_ids

    def choose(self, root: OutputRoot, *, include_rejected: bool = False) -> Chosen:
        """`resolve`, and the one line that says which runs and why."""
        runs = _manifests(root, include_rejected)
        if self.run_ids:
            return Chosen(_with_shards(set(self.run_ids), runs))
        if self.since or self.until:
            lo = parse_bound(self.since, "--since")
            hi = parse_bound(self.until, "--until")
            window = _between(lo, hi)
            runs += _without_manifest(root, runs, window, include_rejected)
            chosen = {r.run_id for r in runs if r.parent_run_id is None and r.started_at
                      and (lo is None or r.started_at >= lo) and (hi is None or r.started_at < hi)}
            ids = _with_shards(chosen, runs)
            shards = _shard_totals(runs)
            with_rows = sum(1 for r in runs if r.run_id in chosen and _rows(r, shards)[0])
            return Chosen(ids, f"{self.describe}: {len(chosen)} run(s), {with_rows} with pages")
        return _newest_with_pages(root, runs, include_rejected)


def _manifests(root: OutputRoot, include_rejected: bool) -> list[_Run]:
    """Every run with a `runs` row: one row per run, its counters instead of its pages."""
    columns = ["run_id", "kind", "started_at", "parent_run_id", "requests", *ROW_COUNTS]
    table = read_columns(root, "runs", columns, include_rejected=include_rejected)
    if table is None:
        return []
    return [_Run(rid, kind, at, parent, sum(n or 0 for n in counts), requests or 0)
            for rid, kind, at, parent, requests, *counts in zip(
                *(table[c].to_pylist() for c in columns), strict=True)]


def _without_manifest(root: OutputRoot, known: list[_Run], where: pc.Expression | None,
                      include_rejected: bool) -> list[_Run]:
    """Runs with page rows among those `where` selects and no `runs` row (still running, or
    killed and not folded in): their first page's start stands for theirs."""

    def first_pages(cond: pc.Expression) -> pa.Table | None:
        pages = read_columns(root, "pages", ["run_id", "started_at"], cond,
                             include_rejected=include_rejected)
        if pages is None or pages.num_rows == 0:
            return None
        return pages.group_by("run_id").aggregate([("started_at", "min"), ("run_id", "count")])

    cond = ~pc.field("run_id").isin(pa.array([r.run_id for r in known], pa.string()))
    found = first_pages(cond if where is None else cond & where)
    if found is None:
        return []
    if where is not None:  # their whole rows: one may have begun before `where`'s bound
        found = first_pages(pc.field("run_id").isin(found["run_id"]))
        assert found is not None
    return [_Run(rid, None, at, None, n) for rid, at, n in zip(
        *(found[c].to_pylist() for c in ("run_id", "started_at_min", "run_id_count")),
        strict=True)]


def _between(lo: datetime | None, hi: datetime | None) -> pc.Expression | None:
    """Page rows started in [lo, hi) (either bound may be open)."""
    bounds = ([pc.field("started_at") >= pa.scalar(lo, _TS)] if lo else []) + (
        [pc.field("started_at") < pa.scalar(hi, _TS)] if hi else [])
    return bounds[0] & bounds[1] if len(bounds) == 2 else (bounds[0] if bounds else None)


def _shard_totals(runs: list[_Run]) -> dict[str, tuple[int, int]]:
    """Coordinator id -> the page rows and requests of its shard runs."""
    totals: dict[str, tuple[int, int]] = {}
    for r in runs:
        if r.parent_run_id is not None:
            rows, requests = totals.get(r.parent_run_id, (0, 0))
            totals[r.parent_run_id] = (rows + r.rows, requests + r.requests)
    return totals


def _rows(run: _Run, shards: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The page rows and requests of a run (of its shard runs, for a coordinator)."""
    if run.kind != RunKind.COORDINATOR:
        return run.rows, run.requests
    return shards.get(run.run_id, (0, 0))


def _with_shards(chosen: set[str], runs: list[_Run]) -> list[str]:
    """`chosen` and the shard runs of the coordinators among them, oldest first."""
    chosen = chosen | {r.run_id for r in runs if r.parent_run_id in chosen}
    order = {r.run_id: r.started_at for r in runs}
    return sorted(chosen, key=lambda rid: (order.get(rid) is None, order.get(rid), rid))


def _newest_with_pages(root: OutputRoot, runs: list[_Run], include_rejected: bool) -> Chosen:
    """The newest top-level run of a chosen kind with page rows, and the newer ones passed by."""
    top = sorted((r for r in runs if r.parent_run_id is None and r.started_at is not None),
                 key=lambda r: (r.started_at, r.run_id), reverse=True)
    shards = _shard_totals(runs)
    found = next((r for r in top if _eligible(r) and any(_rows(r, shards))), None)
    after = None if found is None else pc.field("started_at") > pa.scalar(found.started_at, _TS)
    newer = sorted(_without_manifest(root, runs, after, include_rejected),
                   key=lambda r: (r.started_at, r.run_id))
    if newer:
        found = newer[-1]
    passed = [r for r in top if found is None or (r.started_at, r.run_id) > (
        found.started_at, found.run_id)]
    empty = sum(1 for r in passed if _eligible(r))
    left_out = Counter(r.kind for r in passed if not _eligible(r))
    later = "later " if found else ""
    notes = [f"{empty} {later}run{'s' if empty != 1 else ''} selected nothing"] if empty else []
    notes += [f"{n} {later}{kind} run{'s' if n != 1 else ''} left out"
              for kind, n in sorted(left_out.items())]
    if found is None:
        return Chosen([], "no run with pages" + (f" ({'; '.join(notes)})" if notes else ""))
    units, requests = _rows(found, shards)
    what = f"{found.kind or NO_MANIFEST}, {units} unit{'s' if units != 1 else ''}" + (
        "" if units else f", {requests} request{'s' if requests != 1 else ''}")
    why = (f"newest run with pages{'' if units else ' or requests'}: {found.run_id} ({what})"
           + "".join(f"; {n}" for n in notes))
    return Chosen(_with_shards({found.run_id}, runs), why)


def _eligible(run: _Run) -> bool:
    return run.kind is None or run.kind in CHOSEN_KINDS
