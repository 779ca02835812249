"""Folding what killed runs left in `_journal/` into Parquet, exactly once, by the next lock holder.

A killed run's journal holds every row that reached it; some of them may already be in
Parquet parts (flushed before the kill), so rows are added only when the tables lack them;
a run's rows are found by their `run_id` column, never by file names (compacted files hold
many runs). A request journaled as `sent` with no `attempt` record was in flight when the
process died: it becomes an `attempts` row with outcome `lost` and null credits. Its
documents are built (unless it wrote them before it died) with the merge rules its
journal's header recorded, and its manifest by the same `RunRecorder` as a finished run's,
with outcome
`interrupted`. A recovery cut short by another kill is simply done again: the journal is
deleted only after its rows, documents and manifest are written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from ernie_batch.documents import DocumentSpec, build_documents
from ernie_batch.recorder import RunInfo, RunRecorder, lost_attempt
from ernie_batch.store import (
    ATTEMPTS_SCHEMA,
    decode_schema,
    from_journal,
    holding_dead_run,
    read_journal,
    remove_temp_files,
    rows_of_run,
)
from ernie_batch.vocab import RunOutcome

LOST_IN_FLIGHT = "sent; the process died before its response was recorded"


def remove_dead_temp_files(root: Path, own_run: str | None = None) -> int:
    """Delete the temporary parts of runs that died (never a live run's, never our own)."""

    def dead(run_id: str) -> bool:
        if run_id == own_run:
            return False
        with holding_dead_run(root, run_id) as held:
            return held

    return remove_temp_files(root, dead)


def recover_journals(root: Path, fallback_schema: pa.Schema, skip_run: str | None = None) -> list[str]:
    """Fold the journals of dead runs (all but `skip_run`'s) into Parquet; returns their run ids.

    A live run's journal is left alone: its run-id lock is held. A journal's header carries
    its run's pages schema (the answer columns may have changed since the kill);
    `fallback_schema` serves journals written before headers carried it.
    """
    folder = root / "_journal"
    if not folder.is_dir():
        return []
    return [path.stem for path in sorted(folder.glob("*.jsonl"))
            if path.stem != skip_run and fold_dead_run(root, path.stem, fallback_schema)]


def fold_dead_run(root: Path, run_id: str, fallback_schema: pa.Schema,
                  wait_s: float = 0.0) -> bool | None:
    """Fold one dead run's journal: True when folded now, None when the run is dead and
    there is nothing (left) to fold, False when its owner lives (still, after `wait_s`)."""
    path = root / "_journal" / f"{run_id}.jsonl"
    with holding_dead_run(root, run_id, wait_s) as held:
        if not held:
            return False
        if not path.exists():  # folded by another run meanwhile, or never journaled
            return None
        records = read_journal(path)
        header = next((r for r in records if r.get("t") == "run"), None)
        if header is not None:
            schema = (decode_schema(header["pages_schema"]) if header.get("pages_schema")
                      else fallback_schema)
            _fold_run(root, run_id, header, records, schema)
        path.unlink(missing_ok=True)
        return header is not None


def _fold_run(root: Path, run_id: str, header: dict[str, Any], records: list[dict[str, Any]],
              schema: pa.Schema) -> None:
    info = RunInfo.from_header(header | {"run_id": run_id})
    have_pages = rows_of_run(root, "pages", run_id, ["key", "source_path", "page"])
    have_attempts = rows_of_run(root, "attempts", run_id, ["key", "attempt"])
    recorder = RunRecorder(root, info, schema, prefix="part-recovered",
                           flush_rows=sys.maxsize, flush_seconds=math.inf)  # one part each
    paths: set[str] = set()
    in_flight: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        kind = rec.get("t")
        if kind == "sent":
            in_flight[(rec["key"], int(rec["attempt"]))] = rec
        elif kind == "page":
            row = from_journal(rec, schema)
            paths.add(row["source_path"])
            recorder.add_page(row, write=(row["key"], row["source_path"], row["page"])
                              not in have_pages)
        elif kind == "attempt":
            row = from_journal(rec, ATTEMPTS_SCHEMA)
            in_flight.pop((row["key"], row["attempt"]), None)
            recorder.add_attempt(row, write=(row["key"], row["attempt"]) not in have_attempts)
    for (key, attempt), sent in in_flight.items():
        row = lost_attempt(sent | {"run_id": run_id}, LOST_IN_FLIGHT).as_dict()
        recorder.add_attempt(row, write=(key, attempt) not in have_attempts)
    recorder.maybe_flush(force=True)
    if not rows_of_run(root, "documents", run_id, ["key"]):  # else: written before the kill
        spec = DocumentSpec.from_header(header.get("documents"), schema)
        build_documents(root, recorder.touched, spec, run_id=run_id, date=info.date,
                        prefix="part-recovered")
    manifest = None
    if not rows_of_run(root, "runs", run_id, ["run_id"]):  # by column: compaction merges files
        manifest = recorder.manifest(
            finished_at=None, documents=len(paths), outcome=RunOutcome.INTERRUPTED,
            error="the run was killed; recovered from its journal", not_sent=None)
    recorder.close(manifest)
