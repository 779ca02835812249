"""Which files a reader reads while compacted files replace parts: each swap is one intent.

Compaction writes a replacement file under `OUTPUT/_compact/` (`<id>-<n>.pending`, which no
reader lists), then commits it with an **intent** (`_compact/<id>-<n>.json`: the pending
file, its final name, the parts it replaces), then renames it into its partition, deletes
the parts and drops the intent. Every reader of ours lists a table through `live_files`:
while an intent exists, its final file counts once it is in place (and the parts it
replaces do not), else the parts count. So at any instant, and after a kill -9 at any
point, a table's rows are the old parts' or the new file's, never both or neither; the next
holder of the data lock finishes what a killed compaction committed and drops what it had
not (`finish_interrupted`). A reader racing a live compaction may find a listed file gone:
`read_files` lists again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from ernie_batch.store.files import fsync_dir

COMPACT_DIR = "_compact"
READ_ATTEMPTS = 5  # listings retried when a live compaction deletes a listed part
T = TypeVar("T")


@dataclass(frozen=True)
class Intent:
    """One replacement: `final` takes the place of `replaces` (paths relative to OUTPUT)."""

    pending: str
    final: str
    replaces: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> Intent:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["pending"], data["final"], tuple(data["replaces"]))


def _intents(root: Path) -> list[tuple[Path, Intent]]:
    folder = root / COMPACT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(FileNotFoundError):  # finished meanwhile
            found.append((path, Intent.load(path)))
    return found


def live_files(root: Path, table: str) -> list[Path]:
    """The table's Parquet files a reader should read: each row exactly once."""
    folder = root / table
    if not folder.is_dir():
        return []
    files = {p for p in folder.rglob("*.parquet") if not p.name.startswith(".")}
    prefix = table + "/"
    for _, intent in _intents(root):
        if not intent.final.startswith(prefix):
            continue
        final = root / intent.final
        if final.exists():  # committed and in place: it holds the parts' rows
            files.difference_update(root / r for r in intent.replaces)
            files.add(final)
        else:
            files.discard(final)
    return sorted(files)


def read_files(root: Path, table: str, read: Callable[[list[Path]], T]) -> T:
    """`read(live_files(...))`, listed again if a compaction removed a listed file meanwhile."""
    for _ in range(READ_ATTEMPTS - 1):
        try:
            return read(live_files(root, table))
        except FileNotFoundError:
            continue
    return read(live_files(root, table))


def pending_path(root: Path, compaction_id: str, n: int) -> Path:
    return root / COMPACT_DIR / f"{compaction_id}-{n:04d}.pending"


def commit(root: Path, pending: Path, final: Path, replaces: list[Path]) -> None:
    """Put `pending` (written and fsynced) in place of `replaces`: the intent first, then the swap."""
    intent = Intent(str(pending.relative_to(root)), str(final.relative_to(root)),
                    tuple(str(p.relative_to(root)) for p in replaces))
    path = pending.with_suffix(".json")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(asdict(intent), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    _complete(root, path, intent)


def _complete(root: Path, path: Path, intent: Intent) -> None:
    """Finish a committed swap from wherever it stopped (each step can be done again)."""
    pending, final = root / intent.pending, root / intent.final
    if pending.exists() and not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(pending, final)
        fsync_dir(final.parent)
    if final.exists():  # else the pending file was lost before the rename: the parts stay
        for name in intent.replaces:
            (root / name).unlink(missing_ok=True)
        fsync_dir(final.parent)
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def finish_interrupted(root: Path) -> int:
    """Complete what killed compactions committed, drop what they had not; the count of swaps
    completed. Only for a holder of the data lock (then no compaction is live)."""
    intents = _intents(root)
    for path, intent in intents:
        _complete(root, path, intent)
    folder = root / COMPACT_DIR
    if folder.is_dir():
        for leftover in [*folder.glob("*.pending"), *folder.glob("*.tmp")]:
            leftover.unlink(missing_ok=True)  # never committed: the parts it copied stay
    return len(intents)
