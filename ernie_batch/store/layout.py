"""Telling Delta tables from the layout of the release before them, which `migrate` converts.

The earlier layout: `OUTPUT/<table>/date=D/*.parquet` parts with no `_delta_log`, and
compaction's intents under `OUTPUT/_compact/`. A migration in progress keeps its plan per
table under `OUTPUT/_migrate/` until the table is done. Any of these means the output is
not (wholly) Delta yet: every command but `migrate` refuses it with one line naming
`migrate` (`UnconvertedOutputError`). Object stores never held the earlier layout: only
local folders are looked at.
"""

from __future__ import annotations

from pathlib import Path

from ernie_batch.errors import UnconvertedOutputError
from ernie_batch.location import OutputRoot, StrPath

TABLES = ("pages", "attempts", "runs", "documents", "billing", "evals")
MIGRATE_DIR = "_migrate"
COMPACT_DIR = "_compact"  # the earlier release's compaction intents


def is_delta(folder: Path) -> bool:
    return (folder / "_delta_log").is_dir()


def old_parts(folder: Path) -> list[Path]:
    """The earlier layout's data files of one table folder, in date then name order."""
    if not folder.is_dir() or is_delta(folder):
        return []
    return sorted(p for d in folder.glob("date=*") if d.is_dir() for p in d.glob("*.parquet")
                  if not p.name.startswith("."))


def plan_path(root: Path, table: str) -> Path:
    return root / MIGRATE_DIR / f"{table}.json"


def _unconverted(root: Path) -> UnconvertedOutputError:
    return UnconvertedOutputError(
        f"output folder {root} holds tables of an earlier release (Parquet parts, not Delta "
        f"tables): convert it first with `ernie-batch migrate {root}`")


def check_table(root: StrPath | OutputRoot, table: str) -> None:
    """Raise `UnconvertedOutputError` when `table` is (still partly) in the earlier layout."""
    out = OutputRoot.of(root)
    if not (out.is_local and out.check_layout):
        return
    folder = out.local_path(table)
    if plan_path(out.local_path(), table).exists() or (
            not is_delta(folder) and _any_part(folder)):
        raise _unconverted(out.local_path())


def _any_part(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any(next(d.glob("*.parquet"), None) is not None
               for d in folder.glob("date=*") if d.is_dir())


def check_layout(root: StrPath | OutputRoot) -> None:
    """Raise `UnconvertedOutputError` unless every table is Delta (or not written yet)."""
    out = OutputRoot.of(root)
    if not out.is_local:
        return
    base = out.local_path()
    if any((base / name).is_dir() and any((base / name).iterdir())
           for name in (MIGRATE_DIR, COMPACT_DIR)):
        raise _unconverted(base)
    for table in TABLES:
        check_table(out, table)
