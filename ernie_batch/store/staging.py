"""Staging on object storage: what a run received, as data files under its tables before it is
committed, so a machine lost for good costs seconds of answers, not a round.

A run whose output is on object storage keeps its journal on its own machine; another
machine cannot read it. So every few seconds (`[output] stage_every_s`) the run writes the
rows that arrived since as Parquet files under the table (`<table>/date=D/staged-*.parquet`:
data files no Delta version names yet, invisible to every reader) and lists them in its
**staging manifest**, `OUTPUT/_staging/<run_id>.json`: per commit round, per table, each
file's add action. A round's commit is then one Delta transaction of the round's files (as
version n of the application transaction `<run_id>:<table>`, like every commit of the run),
and the round leaves the manifest.

A run that takes an output's run lease (its holder died: the lease lapsed) finds the dead
run's manifest and commits each round the table does not hold yet, after checking that every
file of it still exists (`commit_files(check=True)`): exactly once, by the same versions a
journal's recovery uses, so the two never add a row twice. Columns a staged file needs were
added to the table when it was staged (a column never changes type: `evolve`), so its files
stay valid whatever was committed meanwhile. Full vacuum (which deletes files no version
names) is held back while any manifest is pending (`pending`).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ernie_batch.errors import OutputError
from ernie_batch.location import OutputRoot, StrPath
from ernie_batch.store import delta, evolve
from ernie_batch.store.files import object_store

STAGING_DIR = "_staging"


class StagedFilesMissing(OutputError):
    """A staged round's files are gone (deleted by hand): the round cannot be committed."""


def _key(out: OutputRoot, *parts: str) -> str:
    return out.location.join(*parts).key


STATS_PREFIX = 64  # characters of a string's bounds kept in the log (delta-rs keeps as many)


def _stats(part: pa.Table) -> str:
    """Delta's per-file statistics as delta-rs writes them: the row count, and each flat
    column's null count and bounds. Every column needs its bounds: a reader that builds a
    filter from them (delta-rs's `to_pyarrow_dataset`) rules a file out on a missing one."""
    n = part.num_rows
    stats: dict[str, Any] = {"numRecords": n, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for f in part.schema:
        if pa.types.is_nested(f.type):
            continue
        column = part[f.name]
        stats["nullCount"][f.name] = column.null_count
        bounds = _bounds(column, f.type) if column.null_count < n else None
        if bounds is not None:
            stats["minValues"][f.name], stats["maxValues"][f.name] = bounds
    return json.dumps(stats)


def _bounds(column: pa.ChunkedArray, t: pa.DataType) -> tuple[Any, Any] | None:
    """(min, max) of a column with values, as Delta's JSON statistics spell them."""
    if pa.types.is_floating(t):
        column = column.filter(pc.invert(pc.is_nan(column)))
        if len(column) == column.null_count:
            return None
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_timestamp(t)
            or pa.types.is_date(t)):
        return None
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if isinstance(low, str):
        if len(high) > STATS_PREFIX and ord(high[STATS_PREFIX - 1]) < 0x10FFFF:
            high = high[:STATS_PREFIX - 1] + chr(ord(high[STATS_PREFIX - 1]) + 1)
        return low[:STATS_PREFIX], high
    if pa.types.is_timestamp(t):  # milliseconds, the low bound down and the high one up
        zone = "Z" if t.tz else ""
        ms = pc.cast(column, pa.timestamp("us", t.tz)).cast(pa.int64())
        low_us, high_us = pc.min_max(ms)["min"].as_py(), pc.min_max(ms)["max"].as_py()
        return (_iso_ms(low_us // 1000) + zone, _iso_ms(-(-high_us // 1000)) + zone)
    if pa.types.is_date(t):
        return low.isoformat(), high.isoformat()
    return low, high


def _iso_ms(ms: int) -> str:
    from datetime import UTC, timedelta

    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def _fitted(out: OutputRoot, table: str, rows: pa.Table) -> pa.Table:
    """`rows` fitted to the table's schema, the table created or its new columns added first
    (commits of their own: metadata only)."""
    from deltalake import DeltaTable, Schema

    uri = out.table_uri(table)

    def attempt() -> pa.Table:
        handle = delta.open_table(out, table)
        if handle is None:
            first = evolve.fit(rows, None, uri)
            DeltaTable.create(uri, Schema.from_arrow(first.schema), partition_by=[delta.PARTITION],
                              storage_options=out.storage_options, mode="ignore")
            raise delta.Raced("created")  # read it again, as any other writer's table
        have = delta.schema_of(handle)
        data = evolve.fit(rows, have, uri)
        if delta._add_columns(handle, have, data.schema):
            raise delta.Raced("columns added")
        return data

    return delta.retrying(f"{uri}: stage", attempt)


def stage_rows(root: StrPath | OutputRoot, table: str, rows: pa.Table) -> list[dict[str, Any]]:
    """Write `rows` (with their `date` column) as data files under `table`, committed by no
    version; their add actions, one per date partition."""
    out = OutputRoot.of(root)
    data = _fitted(out, table, rows)
    store = object_store(out)
    import obstore

    files = []
    dates = data[delta.PARTITION]
    for date in sorted(set(dates.to_pylist())):
        part = data.filter(pc.equal(dates, date)).drop_columns([delta.PARTITION])
        buffer = io.BytesIO()
        pq.write_table(part, buffer, compression="zstd")
        body = buffer.getvalue()
        path = f"{delta.PARTITION}={date}/staged-{uuid.uuid4().hex}.parquet"
        obstore.put(store, _key(out, table, path), body)
        files.append({"path": path, "size": len(body), "date": date,
                      "modification_time": int(time.time() * 1000), "stats": _stats(part)})
    return files


def commit_files(root: StrPath | OutputRoot, table: str, files: list[dict[str, Any]], app: str,
                 version: int, *, check: bool = False) -> bool:
    """Commit staged `files` in one transaction, as `version` of application transaction `app`
    unless the table holds it (False). With `check`, every file must still exist first."""
    from deltalake import CommitProperties, Transaction
    from deltalake.transaction import AddAction

    out = OutputRoot.of(root)
    if not files:
        return False
    if check:
        _check_exist(out, table, files)
    adds = [AddAction(f["path"], f["size"], {delta.PARTITION: f["date"]},
                      f["modification_time"], True, f["stats"]) for f in files]

    def attempt() -> bool:
        handle = delta.open_table(out, table)
        if handle is None:
            raise StagedFilesMissing(f"{out.table_uri(table)}: the table is gone")
        if (handle.transaction_version(app) or 0) >= version:
            return False
        handle.create_write_transaction(
            adds, "append", handle.schema(), partition_by=[delta.PARTITION],
            commit_properties=CommitProperties(app_transactions=[Transaction(app, version)]))
        return True

    return delta.retrying(f"{out.table_uri(table)}: commit staged files", attempt)


def _check_exist(out: OutputRoot, table: str, files: list[dict[str, Any]]) -> None:
    import obstore

    store = object_store(out)
    for f in files:
        try:
            obstore.head(store, _key(out, table, f["path"]))
        except FileNotFoundError:
            raise StagedFilesMissing(f"{out.table_uri(table)}/{f['path']}: a staged file is "
                                     "gone; its round cannot be committed") from None


@dataclass
class StagingManifest:
    """One run's staged rounds: round -> table -> add actions; its header says who the run is
    (as its journal's does), for the run's manifest row if another run must write it."""

    root: OutputRoot
    run_id: str
    header: dict[str, Any]
    rounds: dict[int, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return _key(self.root, STAGING_DIR, f"{self.run_id}.json")

    def add(self, round_: int, table: str, files: list[dict[str, Any]]) -> None:
        self.rounds.setdefault(round_, {}).setdefault(table, []).extend(files)

    def files(self, round_: int, table: str) -> list[dict[str, Any]]:
        return self.rounds.get(round_, {}).get(table, [])

    def save(self) -> None:
        import obstore

        body = json.dumps({"run_id": self.run_id, "header": self.header,
                           "rounds": {str(n): t for n, t in self.rounds.items()}},
                          default=datetime.isoformat)  # the header's start
        obstore.put(object_store(self.root), self.key, body.encode())

    def delete(self) -> None:
        import obstore

        obstore.delete(object_store(self.root), self.key)


def pending(root: StrPath | OutputRoot) -> list[StagingManifest]:
    """The staging manifests in the output (runs that have not ended, or died), oldest first."""
    import obstore

    out = OutputRoot.of(root)
    if out.is_local:
        return []
    store = object_store(out)
    found = []
    for batch in obstore.list(store, _key(out, STAGING_DIR) + "/"):
        for meta in batch:
            try:
                data = json.loads(bytes(obstore.get(store, meta["path"]).bytes()))
            except FileNotFoundError:  # deleted by its run meanwhile
                continue
            found.append(StagingManifest(out, data["run_id"], data["header"], {
                int(n): t for n, t in data["rounds"].items()}))
    return sorted(found, key=lambda m: m.run_id)
