"""The coordinator and its shard runs talk through small JSON files under `OUTPUT/_scale/<id>/`.

One writer per file, replaced atomically (temporary name, rename), read by polling:

* `plan.json` (coordinator): the shards, their manifests, their attempts' run ids;
* `shard-<n>.json` (coordinator): one shard's documents and how to run them;
* `grants.json` (coordinator): per shard run (by run id: a shard given to a new attempt
  gets a new id), recent batches of grants with the time each was issued and the
  cumulative count after it;
* `run-<run_id>.report.json` (the shard run): requests waiting, grants used and expired,
  outcomes, status, and which earlier attempts it took over;
* `stop.json` (any shard run): a fatal error or a budget stop, found once and obeyed by all.

Times are wall-clock seconds (`time.time()`): the coordinator and its workers share one
host, or hosts whose clocks agree (NTP) and whose shared folder shows a renamed file at
once (a network file system with attribute caching does not: README "Running on several
machines").
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ernie_batch.store.files import write_text_atomic

SCALE_DIR = "_scale"


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` as JSON, atomically (readers see the old or the new file)."""
    write_text_atomic(path, json.dumps(value, separators=(",", ":")))


def read_json(path: Path) -> Any:
    """The JSON value of `path`, or None when it is missing (or caught mid-replace elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


@dataclass(frozen=True)
class Channel:
    """The files of one coordinator's run."""

    folder: Path

    @classmethod
    def of(cls, output: Path, coordinator_run_id: str) -> Channel:
        return cls(Path(output) / SCALE_DIR / coordinator_run_id)

    @property
    def plan(self) -> Path:
        return self.folder / "plan.json"

    @property
    def grants(self) -> Path:
        return self.folder / "grants.json"

    @property
    def stop(self) -> Path:
        return self.folder / "stop.json"

    def manifest(self, shard: int) -> Path:
        return self.folder / f"shard-{shard}.json"

    def report(self, run_id: str) -> Path:
        return self.folder / f"run-{run_id}.report.json"


@dataclass
class ShardReport:
    """A shard run's side of the limit, cumulative since it started (one file per shard run)."""

    shard: int
    run_id: str
    status: str = "running"  # running, finished
    waiting: int = 0  # requests waiting for a grant right now
    used: int = 0  # grants taken (each one request sent)
    expired: int = 0  # grants seen too late to use (or left when the shard stopped)
    ok: int = 0  # outcomes of the requests sent
    rate_limited: int = 0
    errors: int = 0
    retry_after: float | None = None  # the latest 429's, seconds
    host: str = ""
    pid: int = 0
    updated: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def settled(self) -> int:
        """Grants whose fate is known: an outcome came back, or they expired unused."""
        return self.ok + self.rate_limited + self.errors + self.expired

    @classmethod
    def read(cls, path: Path) -> ShardReport | None:
        value = read_json(path)
        if not isinstance(value, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))
