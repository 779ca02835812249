"""The tables as Delta Lake tables (delta-rs): opened, appended to once per transaction, scanned.

Every table lives at `ROOT/<table>`, partitioned by `date` (a string column, `YYYY-MM-DD`).
An append is one Delta commit. With an application transaction (`app_id`, `version`) it
happens at most once: the table's recorded version for the app id is checked before each
try, because delta-rs commits a repeated version again without complaint. A commit that
loses a race (another writer's metadata or protocol change, two writers creating the table)
is retried after a backoff with jitter, re-reading the table and its schema each time, for
up to `RETRY_FOR_S`: a run never fails on a conflict. Answer columns are fitted to the
table's schema by `evolve`'s rule before every try.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.errors import OutputError
from ernie_batch.location import OutputRoot, StrPath
from ernie_batch.store import evolve
from ernie_batch.store.layout import check_table

if TYPE_CHECKING:
    import pyarrow.dataset as pads
    from deltalake import DeltaTable

PARTITION = "date"
# columns whose values each commit holds few of (one run's), so a file's statistics tell
# which files hold a value: a run's rows, a shard run's parent; in `runs` (a row a commit)
# also how each run ended
CLUSTERED = ("run_id", "parent_run_id")
CLUSTERED_RUNS = (*CLUSTERED, "outcome", "kind")
RETRY_FOR_S = 600.0  # conflicts are retried this long; then the last one is raised
BACKOFF_S = (0.05, 2.0)  # first and largest wait between tries (full jitter)
T = TypeVar("T")
_OPENED = threading.local()  # per thread: table URI -> its DeltaTable (see `open_table`)


def app_id(writer_id: str, table: str) -> str:
    """The application transaction id of one writer's commits to one table."""
    return f"{writer_id}:{table}"


def open_table(root: StrPath | OutputRoot, table: str) -> DeltaTable | None:
    """The table at its newest version; None when it was never written (a table of an earlier
    release's layout, or one `migrate` is converting, raises `UnconvertedOutputError`).

    A thread's handles are kept and brought up to date (the log's new commits) rather than
    opened again (the last checkpoint and every commit since: 0.1 s over a history of 1,000
    commits in a folder, 0.4 s on a loopback S3; a run reads its tables a dozen times), as
    long as the commit file a handle last read is still the same file, by inode and mtime
    in a folder, by ETag on object storage (a table deleted and written again at the same
    place is opened afresh)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    out = OutputRoot.of(root)
    check_table(out, table)
    uri = out.table_uri(table)
    kept: dict[str, tuple[DeltaTable, int, object]] = _OPENED.__dict__.setdefault(
        "kept", {})
    if uri in kept:
        handle, version, seen = kept.pop(uri)
        if _identity(out, table, version) == seen:
            handle.update_incremental()
            _keep(kept, out, table, handle)
            return handle
    try:
        handle = DeltaTable(uri, storage_options=out.storage_options)
    except TableNotFoundError:
        return None
    _keep(kept, out, table, handle)
    return handle


def _identity(out: OutputRoot, table: str, version: int) -> object | None:
    """Which file the table's commit `version` is (None: there is none)."""
    name = f"{table}/_delta_log/{version:020d}.json"
    if out.is_local:
        try:
            st = os.stat(out.local_path(name))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns
    import obstore
    from obstore.exceptions import NotFoundError

    from ernie_batch.buckets import client

    where = out.location.join(name)
    try:
        return obstore.head(client(out.object_access(), where.scheme, where.bucket),
                            where.key)["e_tag"]
    except (FileNotFoundError, NotFoundError):  # obstore raises the former for a 404
        return None


def _keep(kept: dict[str, tuple[DeltaTable, int, object]], out: OutputRoot, table: str,
          handle: DeltaTable) -> None:
    version = handle.version()
    seen = _identity(out, table, version)
    if seen is not None:
        kept[out.table_uri(table)] = (handle, version, seen)


def refreshed(root: OutputRoot, table: str, handle: DeltaTable | None) -> DeltaTable | None:
    """`handle` brought to the newest version (cheaper than opening again), or the table opened."""
    if handle is None:
        return open_table(root, table)
    handle.update_incremental()
    return handle


def schema_of(handle: DeltaTable | None) -> pa.Schema | None:
    return pa.schema(handle.schema().to_arrow()) if handle is not None else None


def committed_version(root: StrPath | OutputRoot, table: str, app: str) -> int:
    """The newest version committed under application transaction `app` (0: none)."""
    handle = open_table(root, table)
    return (handle.transaction_version(app) or 0) if handle is not None else 0


class Raced(Exception):
    """Another writer changed the table between our read of it and our commit."""


def retrying(what: str, attempt: Callable[[], T]) -> T:
    """`attempt()` again after a commit conflict, with backoff and full jitter."""
    from deltalake.exceptions import CommitFailedError

    deadline = time.monotonic() + RETRY_FOR_S
    wait = BACKOFF_S[0]
    while True:
        try:
            return attempt()
        except (CommitFailedError, Raced):
            if time.monotonic() + wait > deadline:
                raise OutputError(f"{what}: commit conflicts for {RETRY_FOR_S:g} s") from None
            time.sleep(random.uniform(0, wait))
            wait = min(wait * 2, BACKOFF_S[1])


def append(root: StrPath | OutputRoot, table: str, rows: pa.Table, *, app: str | None = None,
           version: int = 1, handle: DeltaTable | None = None) -> tuple[bool, DeltaTable | None]:
    """Append `rows` (with the `date` column) in one commit; with `app`, at most once for
    `version`. Returns (committed now, the table's handle for the next append).

    Columns the table lacks are added first, by a commit of their own, and the rows fitted
    again: delta-rs writes against the table's newest schema, so a column another writer
    added meanwhile under another type would have its values cast (an error, or "12" as
    12.0); a column that exists never changes type, so rows whose every column exists
    with its type are written as they are. Losing that race is a conflict like any other."""
    from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake

    out = OutputRoot.of(root)
    where = out.table_uri(table)
    current = handle

    def attempt() -> bool:
        nonlocal current
        current = refreshed(out, table, current)
        if app is not None and current is not None and (
                current.transaction_version(app) or 0) >= version:
            return False  # committed before (a retry after an unclear failure, a recovery)
        have = schema_of(current)
        data = evolve.fit(rows, have, where)
        if have is not None and _add_columns(current, have, data.schema):
            return attempt()  # the columns first, in a commit of their own (see `append`)
        txn = [Transaction(app_id=app, version=version)] if app is not None else None
        options = dict(out.storage_options) if out.storage_options and current is None else None
        write_deltalake(
            current if current is not None else where, data, mode="append", schema_mode="merge",
            partition_by=[PARTITION] if current is None else None, storage_options=options,
            writer_properties=WriterProperties(compression="ZSTD"),
            commit_properties=CommitProperties(app_transactions=txn) if txn else None)
        return True

    done = retrying(f"{where}: append", attempt)
    return done, current


def _add_columns(handle: DeltaTable, have: pa.Schema, rows: pa.Schema) -> bool:
    """Add `rows`' columns that `have` lacks to the table (one commit); False when none.
    Raced when another writer added one of them meanwhile (delta-rs checks the newest
    schema: "cannot merge types")."""
    from deltalake import Schema
    from deltalake.exceptions import SchemaMismatchError

    new = [f for f in rows if f.name not in have.names]
    if not new:
        return False
    try:
        handle.alter.add_columns(Schema.from_arrow(pa.schema(new)).fields)
    except SchemaMismatchError as exc:
        raise Raced(str(exc)) from None
    return True


def dataset(root: StrPath | OutputRoot, table: str, where: pc.Expression | None = None,
            fixed: pa.Schema | None = None) -> pads.Dataset | None:
    """The table's newest version as a pyarrow dataset (None: never written), with the
    columns of `fixed` the table does not have yet (they read as nulls). Each file's
    fragment carries its partition value and, for the `CLUSTERED` columns `where` names,
    the bounds its statistics in the Delta log give: a filter skips the files they rule
    out without opening them. A thread keeps the dataset of a table's last version.
    (delta-rs's own `to_pyarrow_dataset` builds bounds for every column of every file:
    4 ms a file, 4 s for a history of 1,000 commits; and bounds of a
    column whose values spread over every file, such as a sha256, rule nothing out while
    pyarrow weighs them against the filter for each file: a scan of 1,000 files took twice
    as long with them.)"""
    import pyarrow.dataset as pads

    out = OutputRoot.of(root)
    handle = open_table(out, table)
    if handle is None:
        return None
    if not out.is_local:  # delta-rs's own dataset, through its storage handler
        ds = handle.to_pyarrow_dataset()
        return pads.FileSystemDataset(list(ds.get_fragments()), _with(ds.schema, fixed),
                                      ds.format, ds.filesystem)
    named = tuple(c for c in (CLUSTERED_RUNS if table == "runs" else CLUSTERED)
                  if where is not None and re.search(rf"\b{c}\b", str(where)))
    uri, version = out.table_uri(table), handle.version()
    built: dict[str, tuple[object, pads.Dataset]] = _OPENED.__dict__.setdefault("datasets", {})
    key = (handle, version, named)
    if uri in built and built[uri][0] == key:
        return built[uri][1]
    schema = _with(schema_of(handle), fixed)
    actions = pa.table(handle.get_add_actions(flatten=True))
    fmt = pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=True))
    fs = out.arrow_filesystem(table)
    fragments = [fmt.make_fragment(unquote(path), fs, partition_expression=bound)
                 for path, bound in zip(actions["path"].to_pylist(),
                                        _bounds(actions, [c for c in named if c in schema.names]),
                                        strict=True)]
    built[uri] = (key, pads.FileSystemDataset(fragments, schema, fmt, fs))
    return built[uri][1]


def _with(schema: pa.Schema, fixed: pa.Schema | None) -> pa.Schema:
    if fixed is None:
        return schema
    return pa.schema([*schema, *(f for f in fixed if f.name not in schema.names)])


def _bounds(actions: pa.Table, columns: list[str]) -> list[pc.Expression]:
    """Per data file: its partition, and what its statistics say of `columns`."""
    n = actions.num_rows
    dates = {d: pc.field(PARTITION) == d for d in set(actions[f"partition.{PARTITION}"].to_pylist())}
    out = [dates[d] for d in actions[f"partition.{PARTITION}"].to_pylist()]
    records = actions["num_records"].to_pylist()
    for c in columns:
        stats = [actions[f"{k}.{c}"].to_pylist() if f"{k}.{c}" in actions.column_names
                 else [None] * n for k in ("null_count", "min", "max")]
        field = pc.field(c)
        for i, (nulls, low, high) in enumerate(zip(*stats, strict=True)):
            if nulls is not None and nulls == records[i]:
                out[i] = out[i] & field.is_null()
            elif low is not None and high is not None:
                bound = (field >= low) & (field <= high)
                out[i] = out[i] & (bound if nulls == 0 else bound | field.is_null())
    return out
