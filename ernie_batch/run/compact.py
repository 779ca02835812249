"""`ernie-batch compact`: each table's small files rewritten by Delta's optimize, then vacuumed.

A year of hourly runs leaves tens of thousands of small files that every reader opens.
Compaction (`store.maintain`) optimizes each date partition holding two files or more into
files of about `[compact] target_file_mb`, then vacuums what no version younger than
`[compact] vacuum_retention_hours` needs, and writes a checkpoint of the result (readers
open the log from there). It runs beside runs (their appends and its
rewrites are separate Delta commits; one that loses a race is retried), never beside
another compaction (`store.compact_lock`), and folds dead runs' journals first. Rows of
shard runs their coordinator rejected (`store.fencing`) are deleted from the
`DROPS_REJECTED` tables.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import pyarrow as pa

from ernie_batch.config import CompactOptions
from ernie_batch.errors import LockedError
from ernie_batch.location import OutputRoot
from ernie_batch.run.recovery import recover_journals
from ernie_batch.store import check_layout, compact_lock, new_run_id
from ernie_batch.store.fencing import rejected_runs
from ernie_batch.store.maintain import (
    checkpoint_table,
    delete_runs,
    files_by_partition,
    optimize_partition,
    vacuum_table,
)

# the tables `compact` rewrites by default (a table not written yet is simply empty)
COMPACTED_TABLES = ("pages", "attempts", "runs", "documents", "billing")
# tables whose rows of rejected shard runs (`store.fencing`) are deleted: answers and what is
# derived from them. `attempts` and `runs` keep them: each attempt is a request the vendor
# billed, and a rejected run's `runs` row is what keeps its remaining rows rejected.
DROPS_REJECTED = ("pages", "documents")


@dataclass
class TableCompaction:
    """What compaction did to one table (files, rows and bytes of the partitions it rewrote)."""

    table: str
    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    rows_dropped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    files_vacuumed: int = 0


@dataclass
class CompactSummary:
    compaction_id: str
    tables: list[TableCompaction] = field(default_factory=list)
    recovered_runs: list[str] = field(default_factory=list)  # journals folded first
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def compact_output(root: OutputRoot, tables: Iterable[str], fallback_schema: pa.Schema, *,
                   before: date | None = None, wait_s: float = 0.0,
                   options: CompactOptions | None = None) -> CompactSummary:
    """Compact `tables` of the output folder (partitions dated before `before`, or all).

    Raises LockedError when another compaction holds the folder past `wait_s` seconds.
    """
    started = time.perf_counter()
    opts = options or CompactOptions()
    summary = CompactSummary(new_run_id())
    check_layout(root)
    lock = compact_lock(root)
    if not lock.acquire(wait_s):
        raise LockedError(f"output folder {root} is being compacted by another process; "
                          "use --wait to queue behind it")
    try:
        summary.recovered_runs = recover_journals(root, fallback_schema)
        rejected = rejected_runs(root)
        for name in tables:
            stats = _compact_table(root, name, before, opts.target_file_mb * 2**20,
                                   rejected if name in DROPS_REJECTED else None)
            stats.files_vacuumed = vacuum_table(root, name, opts.vacuum_retention_hours)
            checkpoint_table(root, name)
            summary.tables.append(stats)
    finally:
        lock.release()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _compact_table(root: OutputRoot, table: str, before: date | None, target_bytes: int,
                   drops: pa.Array | None) -> TableCompaction:
    stats = TableCompaction(table)
    if drops is not None:
        stats.rows_dropped = delete_runs(root, table, drops)
    was = files_by_partition(root, table)
    due = sorted(d for d, f in was.items()
                 if f.files > 1 and (before is None or d < before.isoformat()))
    for day in due:
        optimize_partition(root, table, day, target_bytes)
    now = files_by_partition(root, table)
    stats.partitions = len(due)
    stats.files_before = sum(was[d].files for d in due)
    stats.bytes_before = sum(was[d].bytes for d in due)
    stats.files_after = sum(now[d].files for d in due if d in now)
    stats.bytes_after = sum(now[d].bytes for d in due if d in now)
    stats.rows = sum(now[d].rows for d in due if d in now)
    return stats
