"""The tables: the answer store and the ledger of what is done, as Delta Lake tables.

Layout (DESIGN.md's output contract, in Delta Lake since the release after c3d244b), each
table partitioned by `date` (the run's UTC start date; billing's: the vendor's `created`):

    OUTPUT/pages/        one row per request unit            _delta_log/ + date=D/ data files
    OUTPUT/attempts/     one row per HTTP request
    OUTPUT/documents/    derived from pages (answers.documents)
    OUTPUT/runs/         one row per run, committed last
    OUTPUT/billing/      the vendor's usage logs (reconcile)
    OUTPUT/evals/        prompt versions scored on labels (eval)
    OUTPUT/_journal/<run_id>.jsonl   every record the moment it exists
    OUTPUT/.lock, .data.lock, .compact.lock   one run at a time; no rewrite under a run;
                                     one compaction at a time

On object storage (`s3://bucket/prefix`) the journals and run-id locks live in the local state
folder (`OutputRoot.journal_dir`), `.lock` and `.compact.lock` are lease objects, and a run
stages its rows as uncommitted data files listed in `OUTPUT/_staging/<run_id>.json`
(`staging`), which the next run commits if the run died.

A run commits its rows every few seconds and at its end, one Delta transaction per table,
each at most once (application transactions: `delta`); the journal makes a kill -9 cost
nothing that reached us (`ernie_batch.run.recovery`). The modules: `records` (schemas and
typed rows), `evolve` (answer columns whose type changes between prompt versions),
`delta` (opening, appending, scanning), `tables` (writing and reading rows), `maintain`
(optimize and vacuum), `layout` and
`migrate` (the earlier release's layout, converted), `files` (small atomic files, the
folder probe), `lock`, `journal`, `fencing` (the shard runs whose rows do not count: their
coordinator did not accept them), `done` (what earlier runs did, and the skip decisions),
`lease` (locks an object store can hold: conditional writes, lapse by the store's clock;
flock on a folder; imported by name, not from here), `staging` (uncommitted data files of
a run on object storage). Where an output lives is `ernie_batch.location.OutputRoot`.
Nothing outside this package knows the table format.
"""

from ernie_batch.errors import LockedError, OutputError, UnconvertedOutputError
from ernie_batch.location import OutputRoot, StrPath
from ernie_batch.store.delta import app_id, committed_version
from ernie_batch.store.done import (
    DocumentDecision,
    DoneIndex,
    UnitDecision,
    known_objects,
    load_done,
)
from ernie_batch.store.files import check_writable
from ernie_batch.store.journal import Journal, from_journal, read_journal
from ernie_batch.store.layout import TABLES, check_layout
from ernie_batch.store.lock import (
    FileLock,
    OutputLock,
    compact_lock,
    data_lock,
    holding_dead_run,
    live_lock_owner,
    run_id_lock,
    run_lease,
    run_lease_live,
    wait_until_unlocked,
)
from ernie_batch.store.records import (
    ATTEMPTS_SCHEMA,
    BILLING_SCHEMA,
    EVALS_SCHEMA,
    RUNS_SCHEMA,
    AttemptRow,
    PageRow,
    RunRow,
    decode_schema,
    encode_schema,
    new_run_id,
    pages_schema,
)
from ernie_batch.store.tables import (
    TableWriter,
    append_rows,
    newest_per_key,
    read_columns,
    read_table,
    rows_of_run,
    sum_exact,
    write_run_row,
)

__all__ = [
    "ATTEMPTS_SCHEMA", "BILLING_SCHEMA", "EVALS_SCHEMA", "RUNS_SCHEMA", "TABLES", "AttemptRow",
    "DocumentDecision", "DoneIndex", "FileLock", "Journal", "LockedError", "OutputError",
    "OutputLock", "OutputRoot", "PageRow", "RunRow", "StrPath", "TableWriter",
    "UnconvertedOutputError", "UnitDecision", "app_id", "append_rows", "check_layout", "check_writable",
    "committed_version", "compact_lock", "data_lock", "decode_schema", "encode_schema",
    "from_journal", "holding_dead_run", "known_objects", "live_lock_owner", "load_done", "new_run_id",
    "newest_per_key", "pages_schema", "read_columns", "read_journal", "read_table",
    "rows_of_run", "run_id_lock", "run_lease", "run_lease_live", "sum_exact",
    "wait_until_unlocked", "write_run_row",
]
