"""`ernie-batch compact`: each date partition's small parts rewritten as a few large sorted files.

A year of hourly runs leaves tens of thousands of small parts that every reader opens.
Compaction rewrites each partition's parts, per group sharing one schema (a file cannot
hold a column under two types), as files of at most `CHUNK_BYTES` (uncompressed), sorted by
the table's key (`TABLE_ORDER`) so readers that filter on it (the done-index) skip row
groups by their statistics. It holds the run lock and the exclusive data lock, folds dead
runs' journals first, and swaps files through `store.snapshot` intents: a kill at any point
leaves a table that readers of ours see whole, and that the next lock holder finishes.
Rows of shard runs their coordinator rejected (`store.fencing`) are dropped from the
`DROPS_REJECTED` tables, also from a partition's lone file when it holds any.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ernie_batch.errors import LockedError
from ernie_batch.recovery import recover_journals, remove_dead_temp_files
from ernie_batch.store import OutputLock, data_lock, finish_interrupted, new_run_id
from ernie_batch.store.fencing import rejected_runs
from ernie_batch.store.files import fsync_dir
from ernie_batch.store.snapshot import commit, pending_path

# every table and the order its compacted files are sorted in (absent columns are left out:
# a table not written yet is simply empty)
TABLE_ORDER: dict[str, tuple[str, ...]] = {
    "pages": ("fingerprint", "source_sha256", "page"),
    "attempts": ("run_id", "key", "attempt"),
    "runs": ("run_id",),
    "documents": ("key", "built_at"),
    "billing": ("inference_id",),
}
# tables whose rows of rejected shard runs (`store.fencing`) are dropped: answers and what is
# derived from them. `attempts` and `runs` keep them: each attempt is a request the vendor
# billed, and a rejected run's `runs` row is what keeps its remaining rows rejected.
DROPS_REJECTED = ("pages", "documents")
CHUNK_BYTES = 128 * 2**20  # uncompressed bytes rewritten at once, into one file
ROW_GROUP_BYTES = 32 * 2**20  # uncompressed bytes per row group: a reader's unit of work


@dataclass
class TableCompaction:
    """What compaction did to one table."""

    table: str
    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    rows_dropped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class CompactSummary:
    compaction_id: str
    tables: list[TableCompaction] = field(default_factory=list)
    recovered_runs: list[str] = field(default_factory=list)  # journals folded first
    interrupted_finished: int = 0  # swaps of a killed compaction completed first
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def compact_output(root: Path, tables: Iterable[str], fallback_schema: pa.Schema, *,
                   before: date | None = None, wait_s: float = 0.0) -> CompactSummary:
    """Compact `tables` of the output folder (partitions dated before `before`, or all).

    Raises LockedError when a run holds the folder past `wait_s` seconds.
    """
    started = time.perf_counter()
    summary = CompactSummary(new_run_id())
    run_lock = OutputLock(root, summary.compaction_id)  # runs queue behind us as behind a run
    run_lock.acquire(wait_s)
    exclusive = data_lock(root, exclusive=True)
    try:
        if not exclusive.acquire(wait_s):
            raise LockedError(f"output folder {root} is being written by shard runs; "
                              "use --wait to queue behind them")
        summary.interrupted_finished = finish_interrupted(root)
        remove_dead_temp_files(root)
        summary.recovered_runs = recover_journals(root, fallback_schema)
        rejected = rejected_runs(root)
        for name in tables:
            summary.tables.append(_compact_table(root, name, summary.compaction_id, before,
                                                 rejected))
    finally:
        exclusive.release()
        run_lock.release()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _compact_table(root: Path, table: str, cid: str, before: date | None,
                   rejected: pa.Array) -> TableCompaction:
    stats = TableCompaction(table)
    folder = root / table
    if not folder.is_dir():
        return stats
    drops = rejected if table in DROPS_REJECTED else pa.array([], pa.string())
    n = 0
    for partition in sorted(p for p in folder.glob("date=*") if p.is_dir()):
        if before is not None and partition.name.removeprefix("date=") >= before.isoformat():
            continue
        files = sorted(p for p in partition.glob("*.parquet") if not p.name.startswith("."))
        if not files or (len(files) == 1 and len(drops) == 0):
            continue  # nothing to merge or drop (a lone file with drops: judged per chunk)
        touched = False
        for group in _by_schema(files):
            for chunk in _chunks(group):
                if not _worth_rewriting(chunk, drops):
                    continue
                n += 1
                _rewrite(root, table, chunk, pending_path(root, cid, n),
                         partition / f"compact-{cid}-{n:04d}.parquet", drops, stats)
                touched = True
        stats.partitions += touched
    return stats


def _worth_rewriting(files: list[Path], drops: pa.Array) -> bool:
    """Two files or more; or one that holds rows to drop."""
    if len(files) != 1:
        return len(files) > 1
    if len(drops) == 0:
        return False
    run_ids = pq.read_table(files[0], columns=["run_id"])["run_id"]
    return pc.any(pc.is_in(run_ids, value_set=drops)).as_py() or False


def _by_schema(files: list[Path]) -> list[list[tuple[Path, int]]]:
    """The files grouped by schema, each with its uncompressed size, in name order."""
    groups: list[tuple[pa.Schema, list[tuple[Path, int]]]] = []
    for path in files:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema().remove_metadata()
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        for known, members in groups:
            if known.equals(schema):
                members.append((path, size))
                break
        else:
            groups.append((schema, [(path, size)]))
    return [members for _, members in groups]


def _chunks(group: list[tuple[Path, int]]) -> list[list[Path]]:
    """Consecutive files of at most CHUNK_BYTES together (a larger file alone)."""
    chunks: list[list[Path]] = []
    size = CHUNK_BYTES
    for path, n in group:
        if size + n > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(path)
        size += n
    return chunks


def _rewrite(root: Path, table: str, chunk: list[Path], pending: Path, final: Path,
             drops: pa.Array, stats: TableCompaction) -> None:
    """One sorted file from `chunk`'s rows less those of `drops`' runs, written aside, then
    swapped in for the chunk."""
    rows = pa.concat_tables([pq.ParquetFile(p).read() for p in chunk])
    read = rows.num_rows
    if len(drops) and "run_id" in rows.column_names:
        rows = rows.filter(pc.invert(pc.is_in(rows["run_id"], value_set=drops)))
    stats.files_before += len(chunk)
    stats.rows_dropped += read - rows.num_rows
    stats.bytes_before += sum(p.stat().st_size for p in chunk)
    if rows.num_rows == 0:
        # every row a rejected run's: no reader of ours sees them, whether or not the file is
        # still there, so each file goes at once (no intent needed; a kill between is harmless)
        for path in chunk:
            path.unlink()
        fsync_dir(final.parent)
        return
    order = [(c, "ascending") for c in TABLE_ORDER.get(table, ()) if c in rows.column_names]
    if order:
        rows = rows.take(pc.sort_indices(rows, sort_keys=order))  # stable: ties keep their order
    per_row = max(1, rows.nbytes // max(1, rows.num_rows))
    pending.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows, pending, compression="zstd",
                   row_group_size=min(max(ROW_GROUP_BYTES // per_row, 1024), 1 << 20),
                   sorting_columns=pq.SortingColumn.from_ordering(rows.schema, order) if order
                   else None)
    with open(pending, "rb+") as fh:
        os.fsync(fh.fileno())
    stats.files_after += 1
    stats.rows += rows.num_rows
    stats.bytes_after += pending.stat().st_size
    commit(root, pending, final, chunk)
