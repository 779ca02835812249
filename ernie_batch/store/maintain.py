"""Compaction of a Delta table: Delta's optimize per date partition, deletes, vacuum, a checkpoint.

Runs append small files; `optimize_table` rewrites each date partition holding two files or
more as files of about `target_bytes` (one commit per partition, the rows unchanged, the old
files only marked removed: a reader on an older version still finds them). `vacuum_table`
then deletes files no version younger than `retention_hours` needs, and files a killed
writer left uncommitted once they are that old. The retention never goes below
`VACUUM_FLOOR_HOURS` (a reader or writer in flight may still need a file that long). Every
commit that loses a race (a run's schema change) is retried on a fresh view of the table.

Only one compaction may run at a time (the caller holds `lock.compact_lock`): delta-rs lets a
rewrite that changes no data remove files another rewrite removed already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.config import VACUUM_FLOOR_HOURS
from ernie_batch.errors import OutputError
from ernie_batch.location import OutputRoot, StrPath
from ernie_batch.store import delta, staging


@dataclass
class Files:
    """A partition's (or table's) data files: how many, their rows and bytes."""

    files: int = 0
    rows: int = 0
    bytes: int = 0


def files_by_partition(root: StrPath | OutputRoot, table: str) -> dict[str, Files]:
    """The table's current data files, per date partition (empty: never written)."""
    handle = delta.open_table(root, table)
    if handle is None:
        return {}
    actions = pa.table(handle.get_add_actions(flatten=True))
    out: dict[str, Files] = {}
    for date, rows, size in zip(*(actions[c].to_pylist() for c in (
            f"partition.{delta.PARTITION}", "num_records", "size_bytes")), strict=True):
        part = out.setdefault(date, Files())
        part.files += 1
        part.rows += rows or 0
        part.bytes += size
    return out


def optimize_partition(root: StrPath | OutputRoot, table: str, date: str,
                       target_bytes: int) -> None:
    """Rewrite one date partition's small files as files of about `target_bytes`."""
    out = OutputRoot.of(root)

    def attempt() -> None:
        handle = delta.open_table(out, table)
        if handle is not None:
            handle.optimize.compact(partition_filters=[(delta.PARTITION, "=", date)],
                                    target_size=target_bytes)

    delta.retrying(f"{out.table_uri(table)}: optimize {date}", attempt)


def delete_runs(root: StrPath | OutputRoot, table: str, run_ids: pa.Array) -> int:
    """Delete the rows of `run_ids` (rewriting the files that hold them); rows deleted."""
    out = OutputRoot.of(root)
    if len(run_ids) == 0:
        return 0
    listed = ", ".join("'" + str(r).replace("'", "''") + "'" for r in run_ids.to_pylist())

    def attempt() -> int:
        handle = delta.open_table(out, table)
        if handle is None:
            return 0
        present = handle.to_pyarrow_dataset(filesystem=out.arrow_filesystem(table)).count_rows(
            filter=pc.field("run_id").isin(run_ids))
        if present == 0:
            return 0
        metrics = handle.delete(f"run_id IN ({listed})")
        return int(metrics.get("num_deleted_rows", present))

    return delta.retrying(f"{out.table_uri(table)}: delete", attempt)


def vacuum_table(root: StrPath | OutputRoot, table: str, retention_hours: float) -> int:
    """Delete files unused by every version younger than `retention_hours` (`full`: files
    no commit ever named, a killed writer's, too, unless a run's staged files wait to be
    committed on object storage: `staging.pending`, whatever their age); files deleted."""
    if retention_hours < VACUUM_FLOOR_HOURS:
        raise OutputError(f"vacuum retention {retention_hours:g} h is below the floor of "
                          f"{VACUUM_FLOOR_HOURS:g} h (readers and writers in flight)")
    handle = delta.open_table(root, table)
    if handle is None:
        return 0
    return len(handle.vacuum(retention_hours=math.ceil(retention_hours), dry_run=False,
                             enforce_retention_duration=False, full=not staging.pending(root)))


def checkpoint_table(root: StrPath | OutputRoot, table: str) -> None:
    """Write a checkpoint of the table's newest version: a reader then opens the log from the
    compacted state, not from the last checkpoint delta-rs wrote (every 100 commits) and the
    commits since (a compaction's dozens: 0.4 s an open of a compacted 1,000-commit history
    on a loopback S3, 0.1 s with the checkpoint)."""
    handle = delta.open_table(root, table)
    if handle is not None:
        handle.create_checkpoint()
