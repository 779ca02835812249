"""Every row a run produces, in the one order that survives a kill: journal first, then the buffers.

A row is durable the moment its journal line is written; the Parquet buffers follow and are
flushed as numbered parts (attempts before pages) every `flush_rows` rows or
`flush_seconds`. The recorder also keeps the run's progress counters and is the one place a
run's manifest (`runs` row) is built, for finished runs and for killed ones that recovery
replays from their journals.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from ernie_batch.store import (
    ATTEMPTS_SCHEMA,
    AttemptRow,
    Journal,
    PageRow,
    RunRow,
    TableWriter,
    sum_exact,
    write_run_row,
)
from ernie_batch.summary import Progress
from ernie_batch.vocab import FAILED, AttemptOutcome


class RunRecorder:
    """The rows, progress and manifest of one run."""

    def __init__(self, root: Path, run_id: str, date: str, pages_schema: pa.Schema, *,
                 journal: Journal | None = None, flush_rows: int = 500,
                 flush_seconds: float = 30.0,
                 on_progress: Callable[[Progress], None] | None = None,
                 prefix: str = "part") -> None:
        self.root, self.run_id, self.date = root, run_id, date
        self.journal = journal
        self.pages = TableWriter(root, "pages", pages_schema, run_id, date, prefix)
        self.attempts = TableWriter(root, "attempts", ATTEMPTS_SCHEMA, run_id, date, prefix)
        self.progress = Progress()
        self.errors: Counter[str] = Counter()  # failure messages, for the summary's top errors
        self.on_progress = on_progress
        self._flush_rows, self._flush_seconds = flush_rows, flush_seconds
        self._last_flush = time.monotonic()
        self._credits: list[float | None] = []
        self._usd: list[float | None] = []

    def open_journal(self, header: dict[str, Any]) -> None:
        """Start the run's journal (only once the output lock is held: recovery folds the rest)."""
        self.journal = Journal(self.root / "_journal" / f"{self.run_id}.jsonl", header)

    # ---- rows

    def attempt(self, row: AttemptRow) -> None:
        self.add_attempt(row.as_dict())

    def page(self, row: PageRow) -> None:
        self.add_page(row.as_dict())

    def add_attempt(self, row: dict[str, Any], *, write: bool = True) -> None:
        """Journal the row, buffer it (unless `write` is False: already in Parquet), count it."""
        if self.journal is not None:
            self.journal.write({"t": "attempt", **row})
        if write:
            self.attempts.add(row)
        self._credits.append(row["credits"])
        self._usd.append(row["usd"])
        p = self.progress
        p.requests += 1
        p.request_times.append(time.monotonic())
        p.rate_limited += row["outcome"] == AttemptOutcome.RATE_LIMITED
        p.credits += row["credits"] or 0.0
        p.usd += row["usd"] or 0.0

    def add_page(self, row: dict[str, Any], *, write: bool = True) -> None:
        if self.journal is not None:
            self.journal.write({"t": "page", **row})
        if write:
            self.pages.add(row)
        p = self.progress
        p.units_done += 1
        status = row["status"]
        p.units.add(status)
        if status in FAILED:
            self.errors[(row["error"] or status)[:120]] += 1
        if self.on_progress is not None:
            self.on_progress(p)
        self.maybe_flush()

    def maybe_flush(self, force: bool = False) -> None:
        due = time.monotonic() - self._last_flush >= self._flush_seconds
        if force or due or len(self.pages.rows) >= self._flush_rows:
            self.attempts.flush()
            self.pages.flush()
            self._last_flush = time.monotonic()

    # ---- totals and the manifest

    @property
    def credits(self) -> float:
        return sum_exact(self._credits)

    @property
    def usd(self) -> float:
        return sum_exact(self._usd)

    def manifest(self, *, kind: str | None, config_path: str | None, fingerprint: str | None,
                 started_at: datetime, finished_at: datetime | None, documents: int,
                 outcome: str, error: str | None) -> RunRow:
        units = self.progress.units
        return RunRow(
            run_id=self.run_id, kind=kind, config_path=config_path, fingerprint=fingerprint,
            started_at=started_at, finished_at=finished_at, documents=documents,
            units_ok=units.ok, units_failed=units.failed,
            units_skipped=units.skipped + units.duplicate, requests=self.progress.requests,
            credits=self.credits, usd=self.usd, outcome=outcome, error=error,
        )

    def close(self, manifest: RunRow | None) -> None:
        """Write the last parts, then the manifest (if given), then drop the journal."""
        self.maybe_flush(force=True)
        if manifest is not None:
            write_run_row(self.root, self.date, manifest)
        if self.journal is not None:
            self.journal.close(delete=True)
