"""Folding what killed runs left in `_journal/` into the tables, exactly once, by the next run.

A killed run's journal holds every row that reached it, in rounds (`recorder`): the rows
before round n's `commit` line are round n, the rows after the last such line were never
committed. Replaying the journal, round n of a table is committed as version n of the run's
application transaction (`<run_id>:<table>`) unless the table already holds that version:
the kill may have fallen between two tables' commits, or a recovery was cut short. The
rows after the last line, with a `lost` attempt for each request journaled as `sent` that
has no `attempt` record (in flight when the process died: null credits), are one round
more. Then the documents and the `runs` row, each unless committed: the manifest the run
journaled at its end (it was killed between its last commits), else one built by the same
`RunRecorder` as a finished run's, with outcome `interrupted`; documents built with the
merge rules the header recorded. The journal is deleted only after all of that, so a
recovery killed half-way is simply done again.

A journal whose run has its `runs` row already is discarded, not folded: that run was
closed, by itself (killed between its last commit and deleting the journal) or, on an
output in a bucket, by a run on another machine from what it had staged (its machine was
lost, or paused past its lease), which sent its later units again. Folding the rows it
journaled after its last staging would add them a second time.

Journals of the release before Delta tables have no `commit` lines: their rows may sit in
parts that `migrate` converted, so they are told apart by content (`store.rows_of_run`).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import pyarrow as pa

from ernie_batch.answers.documents import DocumentSpec, build_documents
from ernie_batch.location import OutputRoot, StrPath
from ernie_batch.run.recorder import JOURNAL_FORMAT, RunInfo, RunRecorder, lost_attempt
from ernie_batch.store import (
    ATTEMPTS_SCHEMA,
    RUNS_SCHEMA,
    RunRow,
    TableWriter,
    app_id,
    committed_version,
    decode_schema,
    from_journal,
    holding_dead_run,
    read_journal,
    rows_of_run,
)
from ernie_batch.vocab import RunOutcome

log = logging.getLogger(__name__)
LOST_IN_FLIGHT = "sent; the process died before its response was recorded"


def recover_journals(root: StrPath | OutputRoot, fallback_schema: pa.Schema,
                     skip_run: str | None = None) -> list[str]:
    """Fold the journals of dead runs (all but `skip_run`'s) into the tables; their run ids.

    A live run's journal is left alone: its run-id lock is held. A journal's header carries
    its run's pages schema (the answer columns may have changed since the kill);
    `fallback_schema` serves journals written before headers carried it.
    """
    root = OutputRoot.of(root)
    folder = root.journal_dir
    if not folder.is_dir():
        return []
    return [path.stem for path in sorted(folder.glob("*.jsonl"))
            if path.stem != skip_run and fold_dead_run(root, path.stem, fallback_schema)]


def fold_dead_run(root: StrPath | OutputRoot, run_id: str, fallback_schema: pa.Schema,
                  wait_s: float = 0.0) -> bool | None:
    """Fold one dead run's journal: True when folded now, None when the run is dead and
    there is nothing (left) to fold, False when its owner lives (still, after `wait_s`)."""
    root = OutputRoot.of(root)
    path = root.journal_dir / f"{run_id}.jsonl"
    with holding_dead_run(root, run_id, wait_s) as held:
        if not held:
            return False
        if not path.exists():  # folded by another run meanwhile, or never journaled
            return None
        records = read_journal(path)
        header = next((r for r in records if r.get("t") == "run"), None)
        if header is not None and _closed(root, run_id, header):
            log.warning("journal of run %s discarded: its runs row is written already (by "
                        "itself, or by a run that committed what it staged)", run_id)
        elif header is not None:
            schema = (decode_schema(header["pages_schema"]) if header.get("pages_schema")
                      else fallback_schema)
            _fold_run(root, run_id, header, records, schema)
        path.unlink(missing_ok=True)
        return header is not None


def _closed(root: OutputRoot, run_id: str, header: dict[str, Any]) -> bool:
    """Whether the run's `runs` row is committed (a journal of this release: by version)."""
    return (header.get("journal", 1) >= JOURNAL_FORMAT
            and committed_version(root, "runs", app_id(run_id, "runs")) >= 1)


class _Replay:
    """A dead run's rows replayed round by round, each table's round committed unless the
    table holds it (by version; by content for an earlier release's journal)."""

    def __init__(self, root: OutputRoot, run_id: str, header: dict[str, Any], schema: pa.Schema) -> None:
        self.root, self.run_id, self.schema = root, run_id, schema
        self.info = RunInfo.from_header(header | {"run_id": run_id})
        self.legacy = header.get("journal", 1) < JOURNAL_FORMAT
        self.recorder = RunRecorder(root, self.info, schema, flush_rows=sys.maxsize,
                                    commit_every_s=math.inf)  # commits only as told here
        self.done = {t: committed_version(root, t, app_id(run_id, t))
                     for t in ("attempts", "pages", "documents", "runs")}
        self.have_pages: set[tuple] = set()
        self.have_attempts: set[tuple] = set()
        if self.legacy:
            self.have_pages = rows_of_run(root, "pages", run_id, ["key", "source_path", "page"])
            self.have_attempts = rows_of_run(root, "attempts", run_id, ["key", "attempt"])
        self.rounds = 0
        self.paths: set[str] = set()
        self.in_flight: dict[tuple[str, int], dict[str, Any]] = {}
        self.manifest: RunRow | None = None

    def record(self, rec: dict[str, Any]) -> None:
        kind = rec.get("t")
        if kind == "sent":
            self.in_flight[(rec["key"], int(rec["attempt"]))] = rec
        elif kind == "page":
            row = from_journal(rec, self.schema)
            self.paths.add(row["source_path"])
            self.recorder.add_page(row, write=(row["key"], row["source_path"], row["page"])
                                   not in self.have_pages)
        elif kind == "attempt":
            row = from_journal(rec, ATTEMPTS_SCHEMA)
            self.in_flight.pop((row["key"], row["attempt"]), None)
            self.recorder.add_attempt(row, write=(row["key"], row["attempt"])
                                      not in self.have_attempts)
        elif kind == "commit":
            self.commit_round()
        elif kind == "manifest":
            self.manifest = RunRow(**from_journal(rec, RUNS_SCHEMA))

    def commit_round(self) -> None:
        self.rounds += 1
        for writer in (self.recorder.attempts, self.recorder.pages):
            self._commit(writer)

    def _commit(self, writer: TableWriter) -> None:
        if self.done[writer.table] < self.rounds:
            writer.flush(self.rounds)
        else:
            writer.discard()

    def finish(self, header: dict[str, Any]) -> None:
        """The rows never committed (and the lost attempts) as one more round, then documents
        and the manifest, each unless committed before."""
        for (key, attempt), sent in self.in_flight.items():
            row = lost_attempt(sent | {"run_id": self.run_id}, LOST_IN_FLIGHT).as_dict()
            self.recorder.add_attempt(row, write=(key, attempt) not in self.have_attempts)
        if self.recorder.attempts.rows or self.recorder.pages.rows:
            self.commit_round()
        version = max(self.rounds, 1)
        self.recorder.round = self.rounds
        if not self._committed("documents", version):
            spec = DocumentSpec.from_header(header.get("documents"), self.schema)
            build_documents(self.root, self.recorder.touched, spec, run_id=self.run_id,
                            date=self.info.date, version=version)
        manifest = self.manifest or self.recorder.manifest(
            finished_at=None, documents=len(self.paths), outcome=RunOutcome.INTERRUPTED,
            error="the run was killed; recovered from its journal", not_sent=None)
        self.recorder.close(None if self._committed("runs", version) else manifest)

    def _committed(self, table: str, version: int) -> bool:
        if self.done[table] >= version:
            return True
        return self.legacy and bool(rows_of_run(self.root, table, self.run_id, ["run_id"]))


def _fold_run(root: OutputRoot, run_id: str, header: dict[str, Any], records: list[dict[str, Any]],
              schema: pa.Schema) -> None:
    replay = _Replay(root, run_id, header, schema)
    for rec in records:
        replay.record(rec)
    replay.finish(header)
