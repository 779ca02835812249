"""Every row a run produces, in the one order that survives a kill: journal first, then the buffers.

A row is durable the moment its journal line is written; the table buffers follow and are
committed in **rounds**, every `commit_every_s` seconds (or sooner, `flush_rows` page rows)
and at the end: round n is a `commit` line in the journal (everything journaled before it
and after round n-1's line), then one Delta commit per table in the fixed order attempts,
pages, each as version n of the application transaction `<run_id>:<table>`. At the end
the last round, then the run's manifest line, then documents and the `runs` row, both as
the last round's version. So a kill anywhere, also between two tables' commits, leaves a
journal from which recovery commits exactly what is missing (`ernie_batch.run.recovery`).
Each request is journaled as `sent` before it goes out: one whose response is never
recorded (the process died, or gave up waiting) becomes a `lost` attempt row, here (`lost`,
`abandon_in_flight`) or when recovery folds the journal. On an output in a bucket the journal stays
on this machine, so the rows are also staged every `stage_every_s` as uncommitted data files
(`store.staging`), and a round's commit is one transaction of its staged files: another
machine's next run commits what a lost one staged (`run.staged`). The recorder also keeps
the run's progress counters and is the one place a run's manifest (`runs` row) is built,
for finished runs and for killed ones that recovery replays from their journals.
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
from typing import Any

import pyarrow as pa

from ernie_batch.location import OutputRoot
from ernie_batch.run.summary import Progress
from ernie_batch.store import (
    ATTEMPTS_SCHEMA,
    AttemptRow,
    Journal,
    PageRow,
    RunRow,
    TableWriter,
    app_id,
    sum_exact,
    write_run_row,
)
from ernie_batch.store.staging import StagingManifest, commit_files, stage_rows
from ernie_batch.vocab import FAILED, AttemptOutcome

# the journal's format: 2 has `commit` lines (rounds); an earlier release's journals do not
JOURNAL_FORMAT = 2


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
        return dataclasses.asdict(self) | {"date": self.date, "journal": JOURNAL_FORMAT}

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

    def __init__(self, root: OutputRoot, info: RunInfo, pages_schema: pa.Schema, *,
                 journal: Journal | None = None, flush_rows: int = 5000,
                 commit_every_s: float = 10.0, stage_every_s: float = 5.0,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_page: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.root, self.info = OutputRoot.of(root), info
        self.run_id, self.date = info.run_id, info.date
        self.journal = journal
        self.attempts = self._writer("attempts", ATTEMPTS_SCHEMA)
        self.pages = self._writer("pages", pages_schema)
        self.round = 0  # rounds committed (each: attempts, then pages)
        self.commit_s = 0.0  # time spent committing rows to the tables (bench `overhead`)
        self.progress = Progress()
        self.errors: Counter[str] = Counter()  # failure messages, for the summary's top errors
        self.on_progress = on_progress
        self.on_page = on_page  # sees every page row as it is recorded
        self._flush_rows, self._commit_every_s = flush_rows, commit_every_s
        self._last_commit = self._last_stage = time.monotonic()
        self._stage_every_s = stage_every_s
        self.staging: StagingManifest | None = None  # an output on object storage (`stage`)
        self._staged = {"attempts": 0, "pages": 0}  # buffered rows staged so far, per table
        self._credits: list[float | None] = []
        self._usd: list[float | None] = []
        self.touched: set[tuple[str, str]] = set()  # (source_sha256, fingerprint): documents
        self.accepted_runs: list[str] | None = None  # a shard run: the attempts it took over
        # raises when this run may no longer write (a shard attempt whose run lease was lost)
        self.check_writable: Callable[[], None] | None = None
        self._in_flight: dict[tuple[str, int], dict[str, Any]] = {}  # sent, not yet answered

    def _writer(self, table: str, schema: pa.Schema) -> TableWriter:
        return TableWriter(self.root, table, schema, self.date, app=app_id(self.run_id, table))

    def open_journal(self, extra: dict[str, Any]) -> None:
        """Start the run's journal (only once the output lock is held: recovery folds the rest)."""
        self.journal = Journal(self.root.journal_dir / f"{self.run_id}.jsonl",
                               self.info.header() | extra)
        if not self.root.is_local:  # its journal stays on this machine: stage for the others
            self.staging = StagingManifest(self.root, self.run_id, self.info.header() | extra)

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
        self.maybe_commit()

    def maybe_commit(self) -> None:
        """Commit a round when one is due: `commit_every_s` passed, or `flush_rows` pages wait."""
        now = time.monotonic()
        if now - self._last_commit >= self._commit_every_s or (
                len(self.pages.rows) >= self._flush_rows):
            self.commit()
        elif self.staging is not None and now - self._last_stage >= self._stage_every_s:
            self.stage()

    def stage(self) -> None:
        """Write the rows that arrived since the last staging as data files of the round in
        progress, and list them in the run's staging manifest (`store.staging`)."""
        assert self.staging is not None
        if self.check_writable is not None:
            self.check_writable()
        started = self._last_stage = time.monotonic()
        new = False
        for writer in (self.attempts, self.pages):
            start = self._staged[writer.table]
            if len(writer.rows) > start:
                self.staging.add(self.round + 1, writer.table,
                                 stage_rows(self.root, writer.table, writer.arrow(start)))
                self._staged[writer.table] = len(writer.rows)
                new = True
        if new:
            self.staging.save()
        self.commit_s += time.monotonic() - started

    def commit(self) -> int:
        """Commit what is buffered as the next round (nothing buffered: no round); the rounds
        so far. The round's line reaches the journal (and the disk) before any commit."""
        self._last_commit = started = time.monotonic()
        if not (self.attempts.rows or self.pages.rows):
            return self.round
        if self.check_writable is not None:
            self.check_writable()
        if self.staging is not None:
            self.stage()  # the round's last rows: then the round is its staged files
        self.round += 1
        if self.journal is not None:
            self.journal.write({"t": "commit", "round": self.round}, sync=True)
        for writer in (self.attempts, self.pages):
            if self.staging is None:
                writer.flush(self.round)
                continue
            commit_files(self.root, writer.table, self.staging.files(self.round, writer.table),
                         writer.app or "", self.round)
            writer.discard()
            self._staged[writer.table] = 0
        if self.staging is not None:
            self.staging.rounds.pop(self.round, None)
            self.staging.save()
        self._last_commit = time.monotonic()
        self.commit_s += self._last_commit - started
        return self.round

    @property
    def final_version(self) -> int:
        """The version documents and the `runs` row are committed as: the last round's."""
        return max(self.round, 1)

    # ---- totals and the manifest

    @property
    def credits(self) -> float:
        return sum_exact(self._credits)

    @property
    def usd(self) -> float:
        return sum_exact(self._usd)

    def manifest(self, *, finished_at: datetime | None, documents: int, outcome: str,
                 error: str | None, not_sent: int | None, selected: int | None = None,
                 refused_sporadic: int | None = None) -> RunRow:
        """The run's `runs` row from what was recorded (`not_sent`, `already_done`,
        `selected`, `refused_sporadic`: None = unknown, as for a killed run's; the 429s not
        sporadic count as the limit's)."""
        p, i = self.progress, self.info
        return RunRow(
            run_id=i.run_id, kind=i.kind, config_path=i.config_path, fingerprint=i.fingerprint,
            started_at=i.started_at, finished_at=finished_at, documents=documents,
            units_ok=p.units.ok, units_failed=p.units.failed, units_skipped=p.units.skipped,
            units_duplicate=p.units.duplicate + p.followers_unanswered,
            units_already_done=p.already_done if not_sent is not None else None,
            units_not_sent=not_sent, units_selected=selected,
            requests=p.requests, credits=self.credits, usd=self.usd,
            outcome=outcome, error=error, parent_run_id=i.parent_run_id, shard=i.shard,
            hostname=i.hostname, pid=i.pid, template_path=i.template_path,
            schema_path=i.schema_path, prompt_label=i.prompt_label,
            accepted_runs=self.accepted_runs,
            rate_limited=p.rate_limited - (refused_sporadic or 0),
            refused_sporadic=refused_sporadic,
        )

    def end_rows(self) -> int:
        """The last round: a request still unanswered here was abandoned and gets its `lost`
        row first (deleting the journal never drops a request that was sent); returns
        `final_version`."""
        self.abandon_in_flight("the run ended before this request's response was recorded")
        self.commit()
        return self.final_version

    def note_manifest(self, manifest: RunRow) -> None:
        """Journal the manifest before documents and `runs` are committed: killed between
        them, recovery commits this row, not an `interrupted` one."""
        if self.journal is not None:
            self.journal.write({"t": "manifest", **manifest.as_dict()}, sync=True)

    def close(self, manifest: RunRow | None) -> None:
        """Commit the manifest (if given) as the last round's version, then drop the journal."""
        if manifest is not None:
            if self.check_writable is not None:
                self.check_writable()
            started = time.monotonic()
            write_run_row(self.root, self.date, manifest, self.final_version)
            if self.staging is not None:
                self.staging.delete()
            self.commit_s += time.monotonic() - started
        if self.journal is not None:
            self.journal.close(delete=True)
