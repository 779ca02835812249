"""Every row a run produces, in the one order that survives a kill: journal first, then the buffers.

A row is durable the moment its journal line is written; the Parquet buffers follow and are
flushed as numbered parts (attempts before pages) every `flush_rows` rows or
`flush_seconds`. Each request is journaled as `sent` before it goes out: one whose
response is never recorded (the process died, or gave up waiting) becomes a `lost`
attempt row, here (`lost`, `abandon_in_flight`) or when recovery folds the journal.
The recorder also keeps the run's progress counters and is the one place a run's manifest
(`runs` row) is built, for finished runs and for killed ones that recovery replays from
their journals.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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


@dataclass(frozen=True)
class RunInfo:
    """Who a run is: written as its journal's header, copied into its manifest.

    A killed run's manifest is rebuilt from the header alone, so everything the manifest
    says about the run's identity lives here.
    """

    run_id: str
    kind: str
    started_at: datetime
    fingerprint: str
    config_path: str | None = None
    template_path: str | None = None
    schema_path: str | None = None
    prompt_label: str | None = None
    parent_run_id: str | None = None
    shard: int | None = None
    hostname: str = dataclasses.field(default_factory=socket.gethostname)
    pid: int = dataclasses.field(default_factory=os.getpid)

    @property
    def date(self) -> str:
        return f"{self.started_at:%Y-%m-%d}"

    def header(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"date": self.date}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> RunInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in header.items() if k in known}
        values["started_at"] = datetime.fromisoformat(header["started_at"])
        values.setdefault("kind", None)
        values.setdefault("fingerprint", None)
        values.setdefault("hostname", None)
        values.setdefault("pid", None)
        return cls(**values)


def lost_attempt(sent: dict[str, Any], error: str) -> AttemptRow:
    """The `lost` row of a `sent` journal record (or the recorder's copy of one)."""
    started = sent["started_at"]
    if isinstance(started, str):
        started = datetime.fromisoformat(started)
    return AttemptRow.lost(sent["run_id"], sent["key"], int(sent["attempt"]), started,
                           sent.get("client_request_id"), sent.get("temperature"), error)


class RunRecorder:
    """The rows, progress and manifest of one run."""

    def __init__(self, root: Path, info: RunInfo, pages_schema: pa.Schema, *,
                 journal: Journal | None = None, flush_rows: int = 500,
                 flush_seconds: float = 30.0,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_page: Callable[[dict[str, Any]], None] | None = None,
                 prefix: str = "part") -> None:
        self.root, self.info = root, info
        self.run_id, self.date = info.run_id, info.date
        self.journal = journal
        self.pages = TableWriter(root, "pages", pages_schema, self.run_id, self.date, prefix)
        self.attempts = TableWriter(root, "attempts", ATTEMPTS_SCHEMA, self.run_id, self.date,
                                    prefix)
        self.progress = Progress()
        self.errors: Counter[str] = Counter()  # failure messages, for the summary's top errors
        self.on_progress = on_progress
        self.on_page = on_page  # sees every page row as it is recorded
        self._flush_rows, self._flush_seconds = flush_rows, flush_seconds
        self._last_flush = time.monotonic()
        self._credits: list[float | None] = []
        self._usd: list[float | None] = []
        self.touched: set[tuple[str, str]] = set()  # (source_sha256, fingerprint): documents
        self._in_flight: dict[tuple[str, int], dict[str, Any]] = {}  # sent, not yet answered

    def open_journal(self, extra: dict[str, Any]) -> None:
        """Start the run's journal (only once the output lock is held: recovery folds the rest)."""
        self.journal = Journal(self.root / "_journal" / f"{self.run_id}.jsonl",
                               self.info.header() | extra)

    # ---- rows

    def sent(self, key: str, attempt: int, client_request_id: str | None,
             temperature: float | None) -> None:
        """Journal a request about to go out: if no response is recorded, it ends as `lost`."""
        record = {"run_id": self.run_id, "key": key, "attempt": attempt,
                  "client_request_id": client_request_id, "temperature": temperature,
                  "started_at": datetime.now(UTC)}
        if self.journal is not None:
            self.journal.write({"t": "sent", **record})
        self._in_flight[(key, attempt)] = record

    def lost(self, key: str, attempt: int, error: str) -> None:
        """Record a sent request whose response will never be recorded (abandoned, cancelled)."""
        record = self._in_flight.get((key, attempt))
        if record is not None:
            self.attempt(lost_attempt(record, error))

    def awaiting(self, key: str, attempt: int) -> bool:
        """True while a sent request's response may still be recorded (not abandoned)."""
        return (key, attempt) in self._in_flight

    def abandon_in_flight(self, error: str) -> int:
        """Every request sent and not answered becomes a `lost` row (an interrupt gave up on them).

        A response that still arrives afterwards is not recorded (see `awaiting`): the
        `lost` row stands, so each request has one row.
        """
        pending = list(self._in_flight)
        for key, attempt in pending:
            self.lost(key, attempt, error)
        return len(pending)

    def attempt(self, row: AttemptRow) -> None:
        self.add_attempt(row.as_dict())

    def page(self, row: PageRow) -> None:
        self.add_page(row.as_dict())

    def add_attempt(self, row: dict[str, Any], *, write: bool = True) -> None:
        """Journal the row, buffer it (unless `write` is False: already in Parquet), count it."""
        if self.journal is not None:
            self.journal.write({"t": "attempt", **row})
        self._in_flight.pop((row["key"], row["attempt"]), None)
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
        self.touched.add((row["source_sha256"], row["fingerprint"]))
        p = self.progress
        p.units_done += 1
        status = row["status"]
        p.units.add(status)
        if status in FAILED:
            self.errors[(row["error"] or status)[:120]] += 1
        if self.on_page is not None:
            self.on_page(row)
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

    def manifest(self, *, finished_at: datetime | None, documents: int, outcome: str,
                 error: str | None, not_sent: int | None) -> RunRow:
        """The run's `runs` row from what was recorded (`not_sent`, `already_done`: None = unknown)."""
        p, i = self.progress, self.info
        return RunRow(
            run_id=i.run_id, kind=i.kind, config_path=i.config_path, fingerprint=i.fingerprint,
            started_at=i.started_at, finished_at=finished_at, documents=documents,
            units_ok=p.units.ok, units_failed=p.units.failed, units_skipped=p.units.skipped,
            units_duplicate=p.units.duplicate,
            units_already_done=p.already_done if not_sent is not None else None,
            units_not_sent=not_sent, requests=p.requests, credits=self.credits, usd=self.usd,
            outcome=outcome, error=error, parent_run_id=i.parent_run_id, shard=i.shard,
            hostname=i.hostname, pid=i.pid, template_path=i.template_path,
            schema_path=i.schema_path, prompt_label=i.prompt_label,
        )

    def close(self, manifest: RunRow | None) -> None:
        """Write the last parts, then the manifest (if given), then drop the journal.

        A request still unanswered here was abandoned: it gets its `lost` row first, so
        deleting the journal never drops a request that was sent.
        """
        self.abandon_in_flight("the run ended before this request's response was recorded")
        self.maybe_flush(force=True)
        if manifest is not None:
            write_run_row(self.root, self.date, manifest)
        if self.journal is not None:
            self.journal.close(delete=True)
