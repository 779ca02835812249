"""`documents --rebuild`: a new generation of documents rows from `pages`, with today's merge rules.

Nothing is sent: the answers are already in `pages`. The rebuild is a run of its own (kind
`rebuild`, a `runs` row, a new run id), so `current=True` reads its rows from then on. It
holds the run lock and the data lock exclusively (no run writes rows meanwhile) and first
folds killed runs' journals, so every answer that reached us counts. Only documents of the
config's fingerprint are rebuilt: the merge rules belong to its schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch import store
from ernie_batch.answers import prompt
from ernie_batch.answers.documents import DocumentSpec, Touched, build_documents, document_key
from ernie_batch.answers.judge import answer_fields
from ernie_batch.config import JobConfig
from ernie_batch.location import OutputRoot
from ernie_batch.run.recorder import RunInfo, RunRecorder
from ernie_batch.run.recovery import recover_journals
from ernie_batch.vocab import RunKind, RunOutcome

SAME = ["key", "answer_json", "provenance_json", "conflicts_json", "complete", "source_paths"]


@dataclass(frozen=True, slots=True)
class Rebuilt:
    run_id: str
    documents: int  # rows written
    complete: int
    changed: int  # rows whose answer, provenance, conflicts, completeness or paths changed


def rebuild_documents(cfg: JobConfig, run_ids: list[str] | None, wait_s: float = 0.0) -> Rebuilt:
    """Rebuild the documents the runs touched (every document: None). LockedError if in use."""
    root = cfg.output.root()
    store.check_layout(root)
    store.check_writable(root)
    info = _info(cfg)
    run_lock = store.OutputLock(root, info.run_id)
    run_lock.acquire(wait_s)
    data_lock = store.data_lock(root, exclusive=True)
    try:
        if not data_lock.acquire(wait_s):
            raise store.LockedError(f"output folder {root} is in use (its data lock is held); "
                                    "use --wait to queue behind it")
        fields = answer_fields(cfg.resolved.schema)
        recover_journals(root, store.pages_schema(fields))
        touched = _touched(root, info.fingerprint, run_ids)
        before = _current(root, touched)
        built = build_documents(root, touched, DocumentSpec.of_config(cfg, fields),
                                run_id=info.run_id, date=info.date)
        after = _current(root, touched)
        recorder = RunRecorder(root, info, store.pages_schema(fields))
        recorder.close(recorder.manifest(finished_at=datetime.now(UTC),
                                         documents=built.documents,
                                         outcome=RunOutcome.COMPLETED, error=None, not_sent=0))
    finally:
        data_lock.release()
        run_lock.release()
    changed = sum(before.get(k) != v for k, v in after.items())
    return Rebuilt(info.run_id, built.documents, built.complete, changed)


def _info(cfg: JobConfig) -> RunInfo:
    started = datetime.now(UTC)
    resolved = cfg.resolved
    return RunInfo(
        run_id=store.new_run_id(started), kind=RunKind.REBUILD, started_at=started,
        fingerprint=prompt.fingerprint(cfg),
        config_path=str(cfg.config_path) if cfg.config_path else None,
        template_path=str(resolved.template_path) if resolved.template_path else None,
        schema_path=str(resolved.schema_path) if resolved.schema_path else None,
        prompt_label=cfg.prompt.label)


def _touched(root: OutputRoot, fingerprint: str, run_ids: list[str] | None) -> Touched:
    """(content, fingerprint) of the documents with page rows of these runs (all runs: None)."""
    where = pc.field("fingerprint") == fingerprint
    if run_ids is not None:
        where = where & pc.field("run_id").isin(pa.array(run_ids, pa.string()))
    table = store.read_columns(root, "pages", ["source_sha256", "fingerprint"], where=where)
    if table is None:
        return set()
    return set(zip(table["source_sha256"].to_pylist(), table["fingerprint"].to_pylist(),
                   strict=True))


def _current(root: OutputRoot, touched: Touched) -> dict[str, tuple]:
    """What a reader sees of these documents now: key -> the columns a rebuild may change."""
    keys = pa.array(sorted(document_key(sha, fp) for sha, fp in touched), pa.string())
    table = store.read_columns(root, "documents", [*SAME, "built_at", "run_id"],
                               where=pc.field("key").isin(keys))
    if table is None or table.num_rows == 0:
        return {}
    table = store.newest_per_key(table)
    rows = zip(*(table[c].to_pylist() for c in SAME), strict=True)
    return {row[0]: row[1:] for row in rows}
