"""Folding what killed runs left in `_journal/` into Parquet, exactly once, by the next lock holder.

A killed run's journal holds every row that reached it; some of them may already be in
Parquet parts (flushed before the kill), so rows are added only when the tables lack them;
a run's rows are found by their `run_id` column, never by file names (compacted files hold
many runs). Its manifest is built by the same `RunRecorder` as a finished run's, with outcome
`interrupted`. A recovery cut short by another kill is simply done again: the journal is
deleted only after its rows and manifest are written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from ernie_batch.recorder import RunInfo, RunRecorder
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
    recovered = []
    for path in sorted(folder.glob("*.jsonl")):
        run_id = path.stem
        if run_id == skip_run:
            continue
        with holding_dead_run(root, run_id) as held:
            if not held or not path.exists():  # alive, or folded by another run meanwhile
                continue
            records = read_journal(path)
            header = next((r for r in records if r.get("t") == "run"), None)
            if header is not None:
                schema = (decode_schema(header["pages_schema"]) if header.get("pages_schema")
                          else fallback_schema)
                _fold_run(root, run_id, header, records, schema)
                recovered.append(run_id)
            path.unlink(missing_ok=True)
    return recovered


def _fold_run(root: Path, run_id: str, header: dict[str, Any], records: list[dict[str, Any]],
              schema: pa.Schema) -> None:
    info = RunInfo.from_header(header | {"run_id": run_id})
    have_pages = rows_of_run(root, "pages", run_id, ["key", "source_path", "page"])
    have_attempts = rows_of_run(root, "attempts", run_id, ["key", "attempt"])
    recorder = RunRecorder(root, info, schema, prefix="part-recovered",
                           flush_rows=sys.maxsize, flush_seconds=math.inf)  # one part each
    paths: set[str] = set()
    for rec in records:
        kind = rec.get("t")
        if kind == "page":
            row = from_journal(rec, schema)
            paths.add(row["source_path"])
            recorder.add_page(row, write=(row["key"], row["source_path"], row["page"])
                              not in have_pages)
        elif kind == "attempt":
            row = from_journal(rec, ATTEMPTS_SCHEMA)
            recorder.add_attempt(row, write=(row["key"], row["attempt"]) not in have_attempts)
    manifest = None
    if not rows_of_run(root, "runs", run_id, ["run_id"]):  # by column: compaction merges files
        manifest = recorder.manifest(
            finished_at=None, documents=len(paths), outcome=RunOutcome.INTERRUPTED,
            error="the run was killed; recovered from its journal", not_sent=None)
    recorder.close(manifest)
