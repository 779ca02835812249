"""The tables' rows: buffered and committed (one Delta commit per flush); read with column
projection and filters.

Every read goes through `delta.dataset` (the table's newest version: each row once, also
while compaction rewrites files beside it) and leaves out the rows of shard runs their
coordinator rejected (`fencing`), unless asked to include them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ernie_batch.location import OutputRoot, StrPath
from ernie_batch.store import delta, duplicates, fencing
from ernie_batch.store.records import (
    ATTEMPTS_SCHEMA,
    BILLING_KEY,
    BILLING_NEWEST,
    BILLING_SCHEMA,
    EVALS_SCHEMA,
    RUNS_SCHEMA,
    RunRow,
    documents_schema,
    pages_schema,
)

if TYPE_CHECKING:
    from deltalake import DeltaTable


class TableWriter:
    """Rows of one table, buffered and committed together: one Delta commit per `flush`.

    With `app` (an application transaction id, `delta.app_id`), each flush names a
    version and commits at most once for it: flushing the same rows again (a retry, a
    recovery) adds nothing. `date` is the partition of rows added without one of their own.
    """

    def __init__(self, root: StrPath | OutputRoot, table: str, schema: pa.Schema,
                 date: str | None = None, *, app: str | None = None) -> None:
        self.root = OutputRoot.of(root)
        self.table = table
        self.schema = schema
        self.date = date
        self.app = app
        self.rows: list[dict[str, Any]] = []
        self.dates: list[str | None] = []
        self.commits = 0  # commits this writer made
        self._handle: DeltaTable | None = None

    def add(self, row: dict[str, Any], date: str | None = None) -> None:
        self.rows.append(row)
        self.dates.append(date or self.date)

    def discard(self) -> None:
        """Drop the buffered rows (committed already, by an earlier process)."""
        self.rows, self.dates = [], []

    def arrow(self, start: int = 0) -> pa.Table:
        """The buffered rows from `start` on, with their `date` column."""
        if any(d is None for d in self.dates[start:]):
            raise ValueError(f"{self.table}: a row without a date partition")
        return pa.Table.from_pylist(self.rows[start:], schema=self.schema).append_column(
            delta.PARTITION, pa.array(self.dates[start:], pa.string()))

    def flush(self, version: int | None = None) -> bool:
        """Commit the buffered rows (as `version` of the writer's transaction); True when a
        commit was made now, False when there was nothing to commit or it was made before."""
        if not self.rows:
            return False
        rows = self.arrow()
        done, self._handle = delta.append(self.root, self.table, rows, app=self.app,
                                          version=version or self.commits + 1,
                                          handle=self._handle)
        self.commits += done
        self.discard()
        return done


def append_rows(root: StrPath | OutputRoot, table: str, rows: pa.Table, date: str, *,
                app: str | None = None, version: int = 1) -> bool:
    """Commit Arrow rows (one partition) in one commit; with `app`, once for `version`."""
    rows = rows.append_column(delta.PARTITION, pa.array([date] * rows.num_rows, pa.string()))
    return delta.append(root, table, rows, app=app, version=version)[0]


# a dataset keeps every file's parsed footer until it is dropped: 10,000 parts scanned as
# one raised the peak RSS by 890 MB, in slices of 128 by 80 MB (bench `history --scale 10`)
FILES_PER_SCAN = 128
FIRST_FIND_FROM = 32  # files a filtered read first finds its matches in (see `_scan`)


# each table's fixed columns (answer columns vary with the schema): a column the table does
# not have yet (written before the column existed) reads as nulls of its type, filters too
_FIXED = {"pages": pages_schema([]), "attempts": ATTEMPTS_SCHEMA, "runs": RUNS_SCHEMA,
          "documents": documents_schema([]), "billing": BILLING_SCHEMA, "evals": EVALS_SCHEMA}


def _scan(root: StrPath | OutputRoot, table: str, columns: list[str] | None,
          where: pc.Expression | None) -> pa.Table | None:
    """The table's rows (those `where` selects), `columns` of them that the table has
    (None: all); files the filter rules out by their statistics are not opened. Over many
    files a filter is first run on its own columns, to find the files with a match: a
    look-up of new content in a long history then reads a column or two of each file,
    not every column asked for (0.5 s instead of 0.9-1.8 s over 1,000 files here)."""
    ds = delta.dataset(root, table, where, _FIXED.get(table))
    if ds is None:
        return None
    present = None if columns is None else [c for c in columns if c in ds.schema.names]
    fragments = list(ds.get_fragments(filter=where) if where is not None else ds.get_fragments())
    if where is not None and len(fragments) > FIRST_FIND_FROM:
        hits = set(_read(ds, fragments, ["__filename"], where)["__filename"].to_pylist())
        fragments = [f for f in fragments if f.path in hits]
    return _read(ds, fragments, present, where)


def _read(ds: pads.FileSystemDataset, fragments: list[pads.Fragment], columns: list[str] | None,
          where: pc.Expression | None) -> pa.Table:
    """`fragments` read in slices of `FILES_PER_SCAN` (fresh fragments: none keeps a footer)."""
    parts = []
    for i in range(0, max(len(fragments), 1), FILES_PER_SCAN):
        fresh = [ds.format.make_fragment(f.path, ds.filesystem, f.partition_expression)
                 for f in fragments[i:i + FILES_PER_SCAN]]
        parts.append(pads.FileSystemDataset(fresh, ds.schema, ds.format, ds.filesystem)
                     .to_table(columns=columns, filter=where))
    return pa.concat_tables(parts)


def _with_columns(rows: pa.Table, columns: list[str]) -> pa.Table:
    """`rows` with exactly `columns`, in that order; an answer column the table does not have
    reads as untyped nulls."""
    return pa.table({c: rows[c] if c in rows.column_names else pa.nulls(rows.num_rows)
                     for c in columns})


def read_columns(root: StrPath | OutputRoot, table: str, columns: list[str],
                 where: pc.Expression | None = None, *,
                 include_rejected: bool = False) -> pa.Table | None:
    """Only the named columns of a table; with `where`, only the rows it selects (files
    whose statistics rule it out are not read). None when the table was never written.
    Rows of rejected shard runs are left out unless `include_rejected`."""
    fence = not include_rejected and fencing.fenced(table)
    wanted = [*columns, "run_id"] if fence and "run_id" not in columns else columns
    rows = _scan(root, table, wanted, where)
    if rows is None:
        return None
    if fence:
        rows = fencing.drop_rejected(root, rows)
    return _with_columns(rows, columns)


# the column that orders a table's rows in time, for `current=True` (first one present)
NEWEST_BY = ("built_at", "finished_at", "started_at")
# tables whose current rows are keyed and ordered otherwise: (key column, newest by)
CURRENT_BY = {"billing": (BILLING_KEY, BILLING_NEWEST)}


def read_table(root: StrPath | OutputRoot, table: str, *, current: bool = False,
               resolve_duplicates: bool = False, include_rejected: bool = False) -> pa.Table | None:
    """A whole table: every column it has (answer columns of every prompt version, by the
    rule in `evolve`; `date`, its partition), None when it was never written.

    Rows of shard runs their coordinator rejected are left out (`fencing`; the `runs` rows of
    those runs too), unless `include_rejected`. With `current`, only the newest row per `key`
    (by the first of `NEWEST_BY` the table has, then run id) among the rows that count: e.g.
    the current generation of each document; in `billing`, the newest row written per
    `inference_id` (`CURRENT_BY`). With `resolve_duplicates` (pages), duplicate
    rows carry the answer of the row they point at.
    """
    rows = _scan(root, table, None, None)
    if rows is None:
        return None
    if not include_rejected and fencing.fenced(table):
        rows = fencing.drop_rejected(root, rows)
    if resolve_duplicates and table == "pages":
        rows = duplicates.resolve_duplicates(rows)
    return newest_per_key(rows, *CURRENT_BY.get(table, ())) if current else rows


def newest_per_key(table: pa.Table, key: str = "key",
                   newest_by: tuple[str, ...] | None = None) -> pa.Table:
    """The newest row of each `key`, ordered by key; newest by the `newest_by` columns
    (default: the first of `NEWEST_BY` the table has, then run id)."""
    if table.num_rows == 0:
        return table
    if newest_by is None:
        when = next(c for c in (*NEWEST_BY, "run_id") if c in table.column_names)
        newest_by = (when, "run_id") if "run_id" in table.column_names else (when,)
    order = [(key, "ascending"), *((c, "descending") for c in dict.fromkeys(newest_by))]
    ordered = table.take(pc.sort_indices(table, sort_keys=order))
    keys = ordered[key]
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return ordered.filter(pa.concat_arrays([pa.array([True]), *first.chunks]))


def rows_of_run(root: StrPath | OutputRoot, table: str, run_id: str, cols: list[str]) -> set[tuple]:
    """The `cols` of the rows a run already has in `table`, as a set of tuples (a rejected
    run's too: they are in the table). For journals of the earlier release, whose rows are
    told apart by content, not by commit versions."""
    t = read_columns(root, table, cols, pc.field("run_id") == run_id, include_rejected=True)
    if t is None:
        return set()
    return set(zip(*(t[c].to_pylist() for c in cols), strict=True))


def sum_exact(values: Iterable[float | None]) -> float:
    """Order-independent, correctly rounded sum: totals match the API's to the last bit."""
    return math.fsum(v for v in values if v is not None)


def write_run_row(root: StrPath | OutputRoot, date: str, row: RunRow, version: int = 1) -> bool:
    """A run's manifest, committed once (application transaction `<run_id>:runs`)."""
    writer = TableWriter(root, "runs", RUNS_SCHEMA, date, app=delta.app_id(row.run_id, "runs"))
    writer.add(row.as_dict())
    return writer.flush(version)
