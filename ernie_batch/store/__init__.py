"""The Parquet dataset: the answer store and the ledger of what is done.

Layout (DESIGN.md's output contract), append-only, Hive partitions by the run's UTC date:

    OUTPUT/pages/date=D/part-<run_id>-<nnnn>.parquet
    OUTPUT/attempts/date=D/part-<run_id>-<nnnn>.parquet
    OUTPUT/documents/date=D/part-<run_id>-<nnnn>.parquet   derived from pages (documents.py)
    OUTPUT/runs/date=D/run-<run_id>.parquet       written last
    OUTPUT/billing/date=D/part-<reconcile_id>-<nnnn>.parquet   the vendor's usage logs (reconcile)
    OUTPUT/evals/date=D/part-<eval_id>-<nnnn>.parquet   prompt versions scored on labels (eval)
    OUTPUT/_journal/<run_id>.jsonl                every record the moment it exists
    OUTPUT/.lock                                  one run at a time

Every file is written to a temporary name, fsynced and renamed, so a reader never sees half
a file. The journal makes a kill -9 cost nothing that reached us: the next run folds it in
(`ernie_batch.recovery`). The modules: `records` (schemas and typed rows), `files` (atomic
writes), `lock`, `journal`, `tables` (writing and reading parts), `snapshot` (which files a
reader reads while compaction replaces parts: `OUTPUT/_compact/`), `fencing` (the shard runs
whose rows do not count: their coordinator did not accept them), `done` (what earlier runs
did, and the skip decisions).
"""

from ernie_batch.errors import LockedError, OutputError
from ernie_batch.store.done import DocumentDecision, DoneIndex, UnitDecision, load_done
from ernie_batch.store.files import check_writable, remove_temp_files, write_parquet_atomic
from ernie_batch.store.journal import Journal, from_journal, read_journal
from ernie_batch.store.lock import (
    FileLock,
    OutputLock,
    data_lock,
    holding_dead_run,
    live_lock_owner,
    run_id_lock,
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
from ernie_batch.store.snapshot import finish_interrupted, live_files
from ernie_batch.store.tables import (
    TableWriter,
    newest_per_key,
    read_columns,
    read_table,
    rows_of_run,
    run_row_path,
    sum_exact,
    write_run_row,
)

__all__ = [
    "ATTEMPTS_SCHEMA", "BILLING_SCHEMA", "EVALS_SCHEMA", "RUNS_SCHEMA", "AttemptRow",
    "DocumentDecision", "DoneIndex", "FileLock", "Journal", "data_lock", "finish_interrupted",
    "holding_dead_run", "live_files", "run_id_lock",
    "LockedError", "OutputError", "OutputLock", "PageRow", "RunRow", "TableWriter",
    "UnitDecision", "check_writable", "decode_schema", "encode_schema", "from_journal",
    "live_lock_owner", "load_done", "new_run_id", "newest_per_key", "pages_schema",
    "read_columns", "read_journal", "read_table", "remove_temp_files", "rows_of_run",
    "run_row_path", "sum_exact", "wait_until_unlocked", "write_parquet_atomic", "write_run_row",
]
