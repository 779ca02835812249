"""Files that appear whole or not at all: temp name, fsync, rename; and a probe of the folder.

A reader never sees half a file, and a kill leaves at worst a dot-named temporary part
that the next holder of the lock removes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ernie_batch.errors import OutputError

TABLES = ("pages", "attempts", "runs", "documents", "billing", "evals")
_RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Whole or not at all (a temporary file beside it, then a rename); no fsync: for files
    rewritten often whose loss in a power cut costs nothing (grants, reports, review pages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_temp_files(root: Path, may_remove: Callable[[str], bool]) -> int:
    """Delete half-written parts that killed runs left: those whose run id `may_remove` allows.

    A temporary part's name carries the run id it belongs to (`.part-<run_id>-0000.parquet.
    <pid>.tmp`); the caller decides by run id, so a live sibling's temporary files stay.
    """
    removed = 0
    for table in TABLES:
        folder = root / table
        if folder.is_dir():
            for tmp in folder.rglob(".*.tmp"):
                run_id = _RUN_ID.search(tmp.name)
                if run_id and may_remove(run_id.group(0)):
                    tmp.unlink(missing_ok=True)
                    removed += 1
    return removed


def _file_in_the_way(root: Path) -> Path | None:
    """The folder itself, or the nearest existing folder above it, when that is not a folder."""
    for path in (root, *root.parents):
        try:
            if path.exists():
                return None if path.is_dir() else path
        except OSError:  # unreadable: the write probe says why
            return None
    return None


def check_writable(root: Path) -> None:
    """Create the folder and prove a file can be written and synced there."""
    blocker = _file_in_the_way(root)
    if blocker == root:
        raise OutputError(f"output folder {root} is a file")
    if blocker is not None:
        raise OutputError(f"output folder {root} is not writable: {blocker} is a file")
    probe = root / f".write-probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError(f"output folder {root} is not writable: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # also when the disk was full: leave nothing behind
