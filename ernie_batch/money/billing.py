"""The `billing` table: the vendor's usage-log rows as `reconcile` matched them.

Append-only: the current row of each `inference_id` is the newest written
(`read_table(OUTPUT, "billing", current=True)`), so a later reconcile that attributes a
row to a run an earlier one missed writes it again, and that one counts. Partitioned by
the vendor's `created` date (`OUTPUT/billing`, a Delta table: `date=D`). Adding is guarded
by `OUTPUT/.billing.lock`, so two reconciles never add the same row twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch import store
from ernie_batch.store import BILLING_SCHEMA, TableWriter
from ernie_batch.store.lock import lock_dir
from ernie_batch.store.records import BILLING_KEY, BILLING_NEWEST

LOCK_WAIT_S = 60.0


@contextmanager
def _writing(root: store.OutputRoot) -> Iterator[None]:
    lock = store.FileLock(lock_dir(root) / ".billing.lock")
    if not lock.acquire(LOCK_WAIT_S):
        raise store.LockedError(f"output {root}: {lock.path.name} is held by "
                                "another process (a reconcile)")
    try:
        yield
    finally:
        lock.release()


# what a reconcile decides about a vendor row: a change is written as a new current row
ATTRIBUTION = ("run_id", "key", "attempt", "matched", "recorded_credits")


def current_rows(root: store.OutputRoot, columns: list[str],
                 where: pc.Expression | None = None) -> pa.Table | None:
    """The current row (the newest written) of each `inference_id` among the rows `where`
    selects, with `columns` (all the table's rows with None)."""
    wanted = list(dict.fromkeys([*columns, BILLING_KEY, *BILLING_NEWEST]))
    table = store.read_columns(root, "billing", wanted, where)
    if table is None or table.num_rows == 0:
        return None
    return store.newest_per_key(table, BILLING_KEY, BILLING_NEWEST).select(columns)


def add_rows(root: store.OutputRoot, rows: list[dict[str, Any]], reconcile_id: str) -> int:
    """Commit the rows the table does not hold yet, and those whose current row attributes
    them otherwise (a later reconcile knows the run an earlier one missed), in one commit,
    once per reconcile id; returns how many.

    A row that lost its attribution (a run only a journal not yet folded in names) is not
    written: a reconcile that knows less never undoes one that knew more."""
    if not rows:
        return 0
    root = store.OutputRoot.of(root)
    now = datetime.now(UTC)
    with _writing(root):
        ids = pa.array(sorted({row[BILLING_KEY] for row in rows}), pa.string())
        found = current_rows(root, [BILLING_KEY, *ATTRIBUTION], pc.field(BILLING_KEY).isin(ids))
        have = {r[BILLING_KEY]: r for r in (found.to_pylist() if found is not None else [])}
        writer = TableWriter(root, "billing", BILLING_SCHEMA,
                             app=store.app_id(reconcile_id, "billing"))
        for row in rows:
            old = have.get(row[BILLING_KEY])
            if old is not None and (row["run_id"] is None or all(
                    old[c] == row[c] for c in ATTRIBUTION)):
                continue
            have[row[BILLING_KEY]] = row
            writer.add({**row, "reconciled_at": now}, date=f"{row['created']:%Y-%m-%d}")
        added = len(writer.rows)
        writer.flush()
    return added


def vendor_credits_by_run(root: store.OutputRoot) -> dict[str, int]:
    """The vendor's credits of each run's requests, from the current billing rows."""
    table = current_rows(root, ["run_id", "cost_credits"])
    if table is None:
        return {}
    totals: dict[str, int] = defaultdict(int)
    for run_id, credits in zip(table["run_id"].to_pylist(), table["cost_credits"].to_pylist(),
                               strict=True):
        if run_id is not None:
            totals[run_id] += credits or 0
    return dict(totals)
