"""The `billing` table: the vendor's usage-log rows as `reconcile` saw them, each `inference_id` once.

Partitioned by the vendor's `created` date (`OUTPUT/billing/date=D/part-<reconcile_id>-<n>`).
Adding is guarded by `OUTPUT/.billing.lock`, so two reconciles never add the same row twice;
the writer also holds the data lock shared (no compaction rewrites files meanwhile) and its
reconcile id's run-id lock (no run's start-up removes its temporary parts as a dead run's).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch import store
from ernie_batch.store import BILLING_SCHEMA, TableWriter

LOCK_WAIT_S = 60.0


@contextmanager
def _writing(root: Path, reconcile_id: str) -> Iterator[None]:
    locks = [store.FileLock(root / ".billing.lock"), store.data_lock(root, exclusive=False),
             store.run_id_lock(root, reconcile_id)]
    held = []
    try:
        for lock in locks:
            if not lock.acquire(LOCK_WAIT_S):
                raise store.LockedError(f"output folder {root}: {lock.path.name} is held by "
                                        f"another process (a reconcile, or compaction)")
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def known_inference_ids(root: Path, among: list[str]) -> set[str]:
    """Which of `among` the table holds (compaction sorts it by inference_id: few parts read)."""
    table = store.read_columns(root, "billing", ["inference_id"], pc.field("inference_id").isin(
        pa.array(among, pa.string())))
    return set(table["inference_id"].to_pylist()) if table is not None else set()


def add_rows(root: Path, rows: list[dict[str, Any]], reconcile_id: str) -> int:
    """Write the rows whose `inference_id` the table does not hold yet; returns how many."""
    if not rows:
        return 0
    root.mkdir(parents=True, exist_ok=True)
    with _writing(root, reconcile_id):
        have = known_inference_ids(root, [row["inference_id"] for row in rows])
        by_date: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if row["inference_id"] not in have:
                have.add(row["inference_id"])
                by_date[f"{row['created']:%Y-%m-%d}"].append(row)
        for date, group in sorted(by_date.items()):
            writer = TableWriter(root, "billing", BILLING_SCHEMA, reconcile_id, date)
            for row in group:
                writer.add(row)
            writer.flush()
    return sum(len(g) for g in by_date.values())


def vendor_credits_by_run(root: Path) -> dict[str, int]:
    """The vendor's credits of each run's requests, from every reconcile so far."""
    table = store.read_columns(root, "billing", ["inference_id", "run_id", "cost_credits"])
    if table is None:
        return {}
    totals: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for inference_id, run_id, credits in zip(*(table[c].to_pylist() for c in table.column_names),
                                             strict=True):
        if run_id is not None and inference_id not in seen:
            seen.add(inference_id)
            totals[run_id] += credits or 0
    return dict(totals)
