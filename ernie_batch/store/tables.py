"""Parquet tables: rows buffered and written as numbered parts; tables read across parts and schemas.

Every read lists a table through `snapshot.read_files`, so a compaction in progress (or cut
short) never shows a row twice or hides one; and leaves out the rows of shard runs their
coordinator rejected (`fencing`), unless asked to include them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ernie_batch.store import duplicates, fencing
from ernie_batch.store.files import write_parquet_atomic
from ernie_batch.store.records import (
    ATTEMPTS_SCHEMA,
    BILLING_SCHEMA,
    EVALS_SCHEMA,
    RUNS_SCHEMA,
    RunRow,
    documents_schema,
    pages_schema,
)
from ernie_batch.store.snapshot import read_files

StrPath = str | os.PathLike[str]  # what the reading API takes: "data/output" as the README shows


class TableWriter:
    """Buffers rows of one table and writes them as numbered, atomically renamed parts."""

    def __init__(self, root: Path, table: str, schema: pa.Schema, run_id: str, date: str,
                 prefix: str = "part") -> None:
        self.folder = root / table / f"date={date}"
        self.schema = schema
        self.run_id = run_id
        self.prefix = prefix
        self.rows: list[dict[str, Any]] = []
        self.parts: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        path = self.folder / f"{self.prefix}-{self.run_id}-{len(self.parts):04d}.parquet"
        while path.exists():  # a recovered run may already have parts
            path = path.with_name(path.stem + "r.parquet")
        write_parquet_atomic(table, path)
        self.parts.append(path)
        self.rows = []


# a dataset keeps every file's parsed footer until it is dropped: 10,000 parts scanned as
# one raised the peak RSS by 890 MB, in slices of 128 by 80 MB (bench `history --scale 10`)
FILES_PER_SCAN = 128


def _dataset(root: Path, table: str, files: list[Path],
             schema: pa.Schema | None = None) -> pads.Dataset:
    return pads.dataset([str(p) for p in files], schema=schema, format="parquet",
                        partitioning="hive", partition_base_dir=str(root / table))


# each table's fixed columns (answer columns vary with the schema): a column that no part has
# yet, because every part predates it, reads as nulls of its type
_FIXED = {name: {f.name: f.type for f in schema} for name, schema in (
    ("pages", pages_schema([])), ("attempts", ATTEMPTS_SCHEMA), ("runs", RUNS_SCHEMA),
    ("documents", documents_schema([])), ("billing", BILLING_SCHEMA), ("evals", EVALS_SCHEMA))}


def _with_columns(rows: pa.Table, table: str, columns: list[str]) -> pa.Table:
    """`rows` with exactly `columns`, in that order; those no part had are typed nulls."""
    types = _FIXED.get(table, {})
    return pa.table({c: rows[c] if c in rows.column_names
                     else pa.nulls(rows.num_rows, types.get(c, pa.null())) for c in columns})


def read_columns(root: StrPath, table: str, columns: list[str],
                 where: pc.Expression | None = None, *,
                 include_rejected: bool = False) -> pa.Table | None:
    """Only the named columns of a table, across all its parts (files may differ in answer
    columns); with `where`, only the rows it selects (parts it rules out by their statistics
    are not read). Rows of rejected shard runs are left out unless `include_rejected`."""
    root = Path(root)
    fence = not include_rejected and fencing.fenced(table)
    wanted = [*columns, "run_id"] if fence and "run_id" not in columns else columns

    def read(files: list[Path]) -> pa.Table | None:
        if not files:
            return None
        parts = []
        for i in range(0, len(files), FILES_PER_SCAN):
            ds = _dataset(root, table, files[i:i + FILES_PER_SCAN])
            present = [c for c in wanted if c in ds.schema.names]
            parts.append(ds.to_table(columns=present, filter=where))
        return pa.concat_tables(parts, promote_options="default")

    rows = read_files(root, table, read)
    if rows is None:
        return None
    if fence:
        rows = fencing.drop_rejected(root, rows)
    return _with_columns(rows, table, columns)


# the column that orders a table's rows in time, for `current=True` (first one present)
NEWEST_BY = ("built_at", "finished_at", "started_at")


def read_table(root: StrPath, table: str, *, current: bool = False,
               resolve_duplicates: bool = False, include_rejected: bool = False) -> pa.Table | None:
    """A whole table with the union of all parts' schemas (new answer columns read as null).

    Rows of shard runs their coordinator rejected are left out (`fencing`; the `runs` rows of
    those runs too), unless `include_rejected`. With `current`, only the newest row per `key`
    (by the first of `NEWEST_BY` the table has, then run id) among the rows that count: e.g.
    the current generation of each document. With `resolve_duplicates` (pages), duplicate
    rows carry the answer of the row they point at.
    """
    root = Path(root)

    def read(files: list[Path]) -> pa.Table | None:
        if not files:
            return None
        schema = pa.unify_schemas([pq.read_schema(p) for p in files])
        return _dataset(root, table, files, schema).to_table()

    rows = read_files(root, table, read)
    if rows is None:
        return None
    if not include_rejected and fencing.fenced(table):
        rows = fencing.drop_rejected(root, rows)
    if resolve_duplicates and table == "pages":
        rows = duplicates.resolve_duplicates(rows)
    return newest_per_key(rows) if current else rows


def newest_per_key(table: pa.Table) -> pa.Table:
    """The newest row of each `key`, ordered by key."""
    if table.num_rows == 0:
        return table
    when = next(c for c in (*NEWEST_BY, "run_id") if c in table.column_names)
    order = [("key", "ascending"), (when, "descending")]
    if "run_id" in table.column_names:
        order.append(("run_id", "descending"))
    ordered = table.take(pc.sort_indices(table, sort_keys=order))
    keys = ordered["key"]
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return ordered.filter(pa.concat_arrays([pa.array([True]), *first.chunks]))


def rows_of_run(root: StrPath, table: str, run_id: str, cols: list[str]) -> set[tuple]:
    """The `cols` of the rows a run already wrote to `table`, as a set of tuples.

    Found by the `run_id` column, never by file names: compacted files hold many runs. A
    rejected run's rows too: they are on disk (recovery must not write them twice).
    """
    t = read_columns(root, table, cols, pc.field("run_id") == run_id, include_rejected=True)
    if t is None:
        return set()
    return set(zip(*(t[c].to_pylist() for c in cols), strict=True))


def sum_exact(values: Iterable[float | None]) -> float:
    """Order-independent, correctly rounded sum: totals match the API's to the last bit."""
    return math.fsum(v for v in values if v is not None)


def run_row_path(root: Path, date: str, run_id: str) -> Path:
    return root / "runs" / f"date={date}" / f"run-{run_id}.parquet"


def write_run_row(root: Path, date: str, row: RunRow) -> Path:
    """The run's manifest, alone in `run-<run_id>.parquet` (`fencing` finds it by that name)."""
    path = run_row_path(root, date, row.run_id)
    write_parquet_atomic(pa.Table.from_pylist([row.as_dict()], schema=RUNS_SCHEMA), path)
    return path
