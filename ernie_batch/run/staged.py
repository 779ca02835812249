"""Committing what dead runs staged on object storage, exactly once, by the next run.

A run on an output in a bucket stages its rows every `stage_every_s` (`store.staging`); a
run that then holds the output's run lease knows every other staging manifest is a dead
run's (its lease lapsed; or it died between its last commit and deleting its manifest). Each
staged round is committed unless the table holds its version already (a journal folded on
the dead run's own machine, or an earlier recovery cut short), after checking its files
still exist; then the documents and the `runs` row (outcome `interrupted`) are written from
the rows the table now holds, each unless committed, and the manifest is deleted last: a
recovery killed half-way is simply done again.
"""

from __future__ import annotations

import logging
import math
import sys

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.answers.documents import DocumentSpec, build_documents
from ernie_batch.location import OutputRoot
from ernie_batch.run.recorder import RunInfo, RunRecorder
from ernie_batch.store import (
    app_id,
    committed_version,
    decode_schema,
    read_columns,
    run_lease_live,
)
from ernie_batch.store.staging import StagedFilesMissing, StagingManifest, commit_files, pending
from ernie_batch.vocab import RunOutcome

log = logging.getLogger(__name__)
LOST_MACHINE = "the run stopped without ending; recovered from what it staged"


def recover_staged(root: OutputRoot, fallback_schema: pa.Schema,
                   skip_run: str | None = None) -> list[str]:
    """Fold every staging manifest but `skip_run`'s (the caller holds the output's lease) and
    those of shard runs that hold their own run lease (alive: a dead coordinator's shards
    may still be running, on any machine); run ids."""
    folded = []
    for manifest in pending(root):
        if manifest.run_id != skip_run and not run_lease_live(root, manifest.run_id):
            fold_staged(root, manifest, fallback_schema)
            folded.append(manifest.run_id)
    return folded


def recover_staged_run(root: OutputRoot, run_id: str, fallback_schema: pa.Schema) -> bool:
    """Fold the staging manifest of one run judged dead (a shard attempt that died on another
    machine, taken over by its next attempt); False when it has none."""
    for manifest in pending(root):
        if manifest.run_id == run_id:
            fold_staged(root, manifest, fallback_schema)
            return True
    return False


def fold_staged(root: OutputRoot, manifest: StagingManifest, fallback_schema: pa.Schema) -> None:
    run_id, header = manifest.run_id, manifest.header
    schema = (decode_schema(header["pages_schema"]) if header.get("pages_schema")
              else fallback_schema)
    for n in sorted(manifest.rounds):
        for table in ("attempts", "pages"):
            try:
                commit_files(root, table, manifest.files(n, table), app_id(run_id, table), n,
                             check=True)
            except StagedFilesMissing as exc:  # their units are not done: sent again
                log.warning("run %s, round %d: %s", run_id, n, exc)
    version = max([1, *manifest.rounds, *(committed_version(root, t, app_id(run_id, t))
                                          for t in ("attempts", "pages"))])
    done = {t: committed_version(root, t, app_id(run_id, t)) >= version
            for t in ("documents", "runs")}
    if not all(done.values()):
        _write_manifest(root, RunInfo.from_header(header | {"run_id": run_id}), schema, header,
                        version, done)
    manifest.delete()


def _write_manifest(root: OutputRoot, info: RunInfo, schema: pa.Schema, header: dict,
                    version: int, done: dict[str, bool]) -> None:
    """The dead run's documents and `runs` row, from the rows the tables hold for it."""
    recorder = RunRecorder(root, info, schema, flush_rows=sys.maxsize, commit_every_s=math.inf)
    mine = pc.field("run_id") == info.run_id
    attempts = read_columns(root, "attempts", ["key", "attempt", "credits", "usd", "outcome"],
                            mine, include_rejected=True)
    for row in attempts.to_pylist() if attempts is not None else []:
        recorder.add_attempt(row, write=False)
    pages = read_columns(root, "pages", ["source_path", "source_sha256", "fingerprint",
                                         "status", "error"], mine, include_rejected=True)
    for row in pages.to_pylist() if pages is not None else []:
        recorder.add_page(row, write=False)
    recorder.round = version
    if not done["documents"]:
        spec = DocumentSpec.from_header(header.get("documents"), schema)
        build_documents(root, recorder.touched, spec, run_id=info.run_id, date=info.date,
                        version=version)
    paths = set(pages["source_path"].to_pylist()) if pages is not None else set()
    recorder.close(None if done["runs"] else recorder.manifest(
        finished_at=None, documents=len(paths), outcome=RunOutcome.INTERRUPTED,
        error=LOST_MACHINE, not_sent=None))
