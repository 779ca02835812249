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


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


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

    Flushing hands each line to the kernel (enough for a killed process); an fsync at most
    every `sync_every_s` also bounds what a power cut can take to that much time, without
    paying a disk sync per response.
    """

    def __init__(self, path: Path, header: dict[str, Any], sync_every_s: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        self._sync_every_s = sync_every_s
        self._synced = 0.0
        self.write({"t": "run", **header})

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(_jsonable(record), ensure_ascii=False, separators=(",", ":")))
        self._fh.write("\n")
        self._fh.flush()
        now = time.monotonic()
        if now - self._synced >= self._sync_every_s:
            os.fsync(self._fh.fileno())
            self._synced = now

    def close(self, delete: bool) -> None:
        self._fh.close()
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
