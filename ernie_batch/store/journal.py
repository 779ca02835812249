"""The run's journal: each record as a JSON line the moment it exists (a kill -9 loses none)."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from ernie_batch.store.records import TS


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# one encoder for every line: json.dumps with options builds a new one per call
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_iso).encode


def from_journal(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """A journal record back as a row of `schema` (timestamps parsed, unknown keys dropped)."""
    out: dict[str, Any] = {}
    for f in schema:
        v = row.get(f.name)
        if v is not None and f.type == TS:
            v = datetime.fromisoformat(v)
        out[f.name] = v
    return out


class Journal:
    """Append-only JSON lines, flushed per record: what reached us survives a kill -9.

    Each line goes to the kernel in one `write` on an unbuffered descriptor (enough for a
    killed process); an fsync at most every `sync_every_s` also bounds what a power cut can
    take to that much time, without paying a disk sync per response.
    """

    def __init__(self, path: Path, header: dict[str, Any], sync_every_s: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._sync_every_s = sync_every_s
        self._synced = 0.0
        self.write({"t": "run", **header})

    def write(self, record: dict[str, Any], sync: bool = False) -> None:
        """Append one record; with `sync`, on disk before this returns (a commit's line)."""
        data = memoryview((_encode(record) + "\n").encode("utf-8"))
        while data:  # a regular file takes it whole; a signal may cut a write short
            data = data[os.write(self._fd, data):]
        now = time.monotonic()
        if sync or now - self._synced >= self._sync_every_s:
            os.fsync(self._fd)
            self._synced = now

    def close(self, delete: bool) -> None:
        os.close(self._fd)
        if delete:
            self.path.unlink(missing_ok=True)


def read_journal(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line cut by the kill: everything before it is whole
    return records
