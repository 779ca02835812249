"""`ernie-batch migrate`: an output of the release before Delta tables, converted in place.

That release wrote each table as Hive-partitioned Parquet parts (`layout`), swapping in
compacted files through intents under `_compact/`. Converting, per table:

1. Compactions cut short are completed (intent written: its file replaces its parts) or
   dropped (no intent), as that release's next run would have done; its temporary files go.
2. A **plan** (`_migrate/<table>.json`, written whole before anything else) lists the
   table's parts in date and name order, in chunks of about `CHUNK_BYTES`.
3. Chunk k is read, its answer columns fitted to the table by `evolve`'s rule (the first
   part to hold a field names its type; the parts are in date order), and committed as
   version k of the application transaction `migrate:<table>`: at most once, whatever
   happens. Then its parts are deleted.
4. The plan goes, and the table is Delta only.

Killed anywhere and run again, it continues from the table's committed version: chunks
committed before are not committed again (their parts, if still there, are deleted), the
others are; a data file the killed run wrote but never committed is deleted at the end.
Rows of rejected shard runs stay where they were, so they stay fenced (the
`runs` rows that reject them are converted too). A killed run's journal stays in
`_journal/`: the next run folds it, telling its rows apart by content (`run.recovery`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ernie_batch.location import OutputRoot
from ernie_batch.store import delta, evolve
from ernie_batch.store.files import fsync_dir
from ernie_batch.store.layout import (
    COMPACT_DIR,
    MIGRATE_DIR,
    TABLES,
    is_delta,
    old_parts,
    plan_path,
)

CHUNK_BYTES = 32 * 2**20  # compressed bytes of parts committed together (one commit)


@dataclass
class TableMigration:
    table: str
    parts: int = 0  # the earlier release's files converted
    rows: int = 0
    commits: int = 0  # made now (a run cut short made the others)
    orphans: int = 0  # data files a killed run wrote but never committed, deleted now


@dataclass
class Migrated:
    tables: list[TableMigration] = field(default_factory=list)
    compactions_finished: int = 0  # swaps of a compaction the earlier release left cut short

    @property
    def converted(self) -> bool:
        return any(t.parts for t in self.tables)

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"converted": self.converted}


def migrate_output(root: Path) -> Migrated:
    """Convert every table of `root` still in the earlier layout (see the module docstring).
    The caller holds the output's locks."""
    done = Migrated(compactions_finished=_finish_compactions(root))
    out = dataclasses.replace(OutputRoot.of(root), check_layout=False)
    for table in TABLES:
        done.tables.append(_migrate_table(out, table))
    for name in (MIGRATE_DIR, COMPACT_DIR):
        folder = root / name
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return done


def _migrate_table(out: OutputRoot, table: str) -> TableMigration:
    stats = TableMigration(table)
    root = out.local_path()
    folder = root / table
    plan = plan_path(root, table)
    resumed = plan.exists()
    if not resumed:
        if is_delta(folder):
            return stats
        _remove_temporary(folder)
        parts = old_parts(folder)
        if not parts:
            return stats
        _write_plan(plan, [[str(p.relative_to(folder)) for p in chunk] for chunk in _chunks(parts)])
    chunks: list[list[str]] = json.loads(plan.read_text(encoding="utf-8"))["chunks"]
    app = delta.app_id("migrate", table)
    committed = delta.committed_version(out, table, app)
    handle = None
    for k, chunk in enumerate(chunks, 1):
        paths = [folder / name for name in chunk]
        if k > committed:
            handle = delta.refreshed(out, table, handle)
            rows = _chunk_rows(folder, paths, delta.schema_of(handle))
            made, handle = delta.append(out, table, rows, app=app, version=k, handle=handle)
            stats.commits += made
            stats.rows += rows.num_rows
            stats.parts += len(paths)
        for path in paths:
            path.unlink(missing_ok=True)
        fsync_dir(folder)
    if resumed:
        stats.orphans = _remove_orphans(out, table)
    plan.unlink()
    fsync_dir(plan.parent)
    return stats


def _remove_orphans(out: OutputRoot, table: str) -> int:
    """A run killed inside an append leaves the data file it wrote and no commit naming it.
    Safe to delete at once: the caller holds the output's locks and the table has only
    ever been appended to, so every file no commit names is such a leftover."""
    handle = delta.open_table(out, table)
    if handle is None:
        return 0
    return len(handle.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False,
                             full=True))


def _chunks(parts: list[Path]) -> list[list[Path]]:
    chunks: list[list[Path]] = []
    size = CHUNK_BYTES
    for path in parts:
        n = path.stat().st_size
        if size + n > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(path)
        size += n
    return chunks


def _write_plan(plan: Path, chunks: list[list[str]]) -> None:
    """Whole and on disk before the first commit: every later step depends on it."""
    plan.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.with_name(plan.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"chunks": chunks}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, plan)
    fsync_dir(plan.parent)


def _chunk_rows(folder: Path, paths: list[Path], table: pa.Schema | None) -> pa.Table:
    """The parts' rows with their `date`, each part's answer columns fitted in turn."""
    known = table
    fitted = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in the migration plan, but gone before its "
                                    "rows were committed")
        with pq.ParquetFile(path) as handle:
            rows = handle.read()
        day = path.parent.name.removeprefix(f"{delta.PARTITION}=")
        rows = evolve.fit(rows.append_column(delta.PARTITION, pa.array([day] * rows.num_rows,
                                                                          pa.string())),
                          known, str(folder))
        known = evolve.merged(known, rows.schema)
        fitted.append(rows)
    return pa.concat_tables(fitted, promote_options="default")


def _remove_temporary(folder: Path) -> None:
    """Half-written parts of killed runs (dot-named `.tmp` files): never rows of the table."""
    if folder.is_dir():
        for tmp in folder.glob("date=*/.*.tmp"):
            tmp.unlink(missing_ok=True)


def _finish_compactions(root: Path) -> int:
    """Complete what the earlier release's killed compactions committed (an intent names a
    pending file, its final name and the parts it replaces), drop what they had not; the
    count of swaps completed. Each step can be done again."""
    folder = root / COMPACT_DIR
    if not folder.is_dir():
        return 0
    intents = sorted(folder.glob("*.json"))
    for path in intents:
        intent = json.loads(path.read_text(encoding="utf-8"))
        pending, final = root / intent["pending"], root / intent["final"]
        if pending.exists() and not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(pending, final)
            fsync_dir(final.parent)
        if final.exists():  # else the pending file was lost before the rename: the parts stay
            for name in intent["replaces"]:
                (root / name).unlink(missing_ok=True)
            fsync_dir(final.parent)
        path.unlink()
    for leftover in [*folder.glob("*.pending"), *folder.glob("*.tmp")]:
        leftover.unlink()  # never committed: the parts it copied stay
    fsync_dir(folder)
    return len(intents)
