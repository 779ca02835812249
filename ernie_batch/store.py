"""The Parquet dataset: the answer store and the ledger of what is done.

Layout (DESIGN.md's output contract), append-only, Hive partitions by the run's UTC date:

    OUTPUT/pages/date=D/part-<run_id>-<nnnn>.parquet
    OUTPUT/attempts/date=D/part-<run_id>-<nnnn>.parquet
    OUTPUT/runs/date=D/run-<run_id>.parquet       written last
    OUTPUT/_journal/<run_id>.jsonl                every record the moment it exists
    OUTPUT/.lock                                  one run at a time

Every file is written to a temporary name, fsynced and renamed, so a reader never sees half
a file. The journal makes a kill -9 cost nothing that reached us: the next run folds it in.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

TS = pa.timestamp("us", tz="UTC")

PAGE_HEAD = [
    pa.field("run_id", pa.string()),
    pa.field("key", pa.string()),
    pa.field("fingerprint", pa.string()),
    pa.field("source_path", pa.string()),
    pa.field("source_sha256", pa.string()),
    pa.field("doc_type", pa.string()),
    pa.field("page", pa.int32()),
    pa.field("page_last", pa.int32()),
    pa.field("page_count", pa.int32()),
    pa.field("content_sha256", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("answer_json", pa.string()),
    pa.field("raw_answer", pa.string()),
]
PAGE_TAIL = [
    pa.field("response_id", pa.string()),
    pa.field("attempts", pa.int16()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("credits", pa.float64()),
    pa.field("usd", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("started_at", TS),
    pa.field("finished_at", TS),
]

ATTEMPTS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("key", pa.string()),
        pa.field("attempt", pa.int16()),
        pa.field("status_code", pa.int16()),
        pa.field("outcome", pa.string()),
        pa.field("error", pa.string()),
        pa.field("response_id", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("credits", pa.float64()),
        pa.field("usd", pa.float64()),
        pa.field("temperature", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("started_at", TS),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("config_path", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("started_at", TS),
        pa.field("finished_at", TS),
        pa.field("documents", pa.int64()),
        pa.field("units_ok", pa.int64()),
        pa.field("units_failed", pa.int64()),
        pa.field("units_skipped", pa.int64()),
        pa.field("requests", pa.int64()),
        pa.field("credits", pa.float64()),
        pa.field("usd", pa.float64()),
        pa.field("outcome", pa.string()),
        pa.field("error", pa.string()),
    ]
)

# invalid_answer and api_error rows are retried by later runs by themselves; these only
# with --retry-failed
FINAL = {"input_error", "skipped"}


def pages_schema(answer_fields: list[pa.Field]) -> pa.Schema:
    return pa.schema([*PAGE_HEAD, *answer_fields, *PAGE_TAIL])


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


class OutputError(Exception):
    """The output folder cannot be used (unwritable, full): found before any request is sent."""


class LockedError(Exception):
    """Another live run holds the output folder's lock."""


# ---------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_temp_files(root: Path) -> int:
    """Delete half-written parts a killed run left (call with the lock held: no writer is live)."""
    removed = 0
    for table in ("pages", "attempts", "runs"):
        folder = root / table
        if folder.is_dir():
            for tmp in folder.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def check_writable(root: Path) -> None:
    """Create the folder and prove a file can be written and synced there."""
    probe = root / f".write-probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError(f"output folder {root} is not writable: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # also when the disk was full: leave nothing behind


# ---------------------------------------------------------------- lock


class OutputLock:
    """OUTPUT/.lock, held with flock(2): the kernel frees it when its owner dies, even by kill -9.

    The file also names the owner (pid, host, run id) for the messages; the lock itself is
    the flock, so a crashed run's leftover file is simply taken over. After locking, the
    path must still be the file we locked (a releasing owner unlinks it), else we retry.
    """

    def __init__(self, root: Path, run_id: str) -> None:
        self.path = root / ".lock"
        self.run_id = run_id
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _try(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # unlinked by its previous owner between our open and our lock
            os.close(fd)
            return self._try()
        payload = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
             "since": datetime.now(UTC).isoformat()}
        ).encode()
        os.pwrite(fd, payload, 0)  # then cut: a reader never sees an empty file
        os.ftruncate(fd, len(payload))
        self._fd = fd
        return True

    def owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        while not self._try():
            if time.monotonic() >= deadline:
                owner = self.owner()
                raise LockedError(
                    f"output folder {self.path.parent} is locked by run {owner.get('run_id')} "
                    f"(pid {owner.get('pid')}); use --wait to queue behind it"
                )
            time.sleep(0.25)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: waiters re-check the inode
            os.close(self._fd)
            self._fd = None


def live_lock_owner(root: Path) -> dict[str, Any] | None:
    """The owner of the folder's lock while a live run holds it (a quick check before start)."""
    path = root / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return OutputLock(root, "").owner() or {"run_id": "?", "pid": "?"}
    finally:
        os.close(fd)
    return None


# ---------------------------------------------------------------- journal


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def _from_journal(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in schema:
        v = row.get(f.name)
        if v is not None and f.type == TS:
            v = datetime.fromisoformat(v)
        out[f.name] = v
    return out


class Journal:
    """Append-only JSON lines, flushed per record: what reached us survives a kill -9.

    Flushing hands each line to the kernel (enough for a killed process); an fsync at most
    every `sync_every_s` also bounds what a power cut can take to that much time, without
    paying a disk sync per response.
    """

    def __init__(self, path: Path, header: dict[str, Any], sync_every_s: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        self._sync_every_s = sync_every_s
        self._synced = 0.0
        self.write({"t": "run", **header})

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(_jsonable(record), ensure_ascii=False, separators=(",", ":")))
        self._fh.write("\n")
        self._fh.flush()
        now = time.monotonic()
        if now - self._synced >= self._sync_every_s:
            os.fsync(self._fh.fileno())
            self._synced = now

    def close(self, delete: bool) -> None:
        self._fh.close()
        if delete:
            self.path.unlink(missing_ok=True)


def read_journal(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line cut by the kill: everything before it is whole
    return records


# ---------------------------------------------------------------- tables


class TableWriter:
    """Buffers rows of one table and writes them as numbered, atomically renamed parts."""

    def __init__(self, root: Path, table: str, schema: pa.Schema, run_id: str, date: str,
                 prefix: str = "part") -> None:
        self.folder = root / table / f"date={date}"
        self.schema = schema
        self.run_id = run_id
        self.prefix = prefix
        self.rows: list[dict[str, Any]] = []
        self.parts: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        path = self.folder / f"{self.prefix}-{self.run_id}-{len(self.parts):04d}.parquet"
        while path.exists():  # a recovered run may already have parts
            path = path.with_name(path.stem + "r.parquet")
        write_parquet_atomic(table, path)
        self.parts.append(path)
        self.rows = []


def _dataset(folder: Path) -> pads.Dataset | None:
    if not folder.is_dir():
        return None
    files = sorted(str(p) for p in folder.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        return None
    return pads.dataset(files, format="parquet", partitioning="hive",
                        partition_base_dir=str(folder))


def read_columns(root: Path, table: str, columns: list[str]) -> pa.Table | None:
    """Only the named columns of a table, across all its parts (files may differ in answer columns)."""
    ds = _dataset(root / table)
    if ds is None:
        return None
    present = [c for c in columns if c in ds.schema.names]
    return ds.to_table(columns=present)


def read_table(root: Path, table: str) -> pa.Table | None:
    """A whole table with the union of all parts' schemas (new answer columns read as null)."""
    folder = root / table
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        return None
    schema = pa.unify_schemas([pq.read_schema(p) for p in files])
    ds = pads.dataset([str(p) for p in files], schema=schema, format="parquet",
                      partitioning="hive", partition_base_dir=str(folder))
    return ds.to_table()


# ---------------------------------------------------------------- what is done


@dataclass
class DocRecord:
    """What earlier runs recorded for one (file content, fingerprint)."""

    page_count: int | None = None
    units: dict[tuple[int, int], str] = field(default_factory=dict)  # (page, last) -> best status
    paths: set[str] = field(default_factory=set)


_RANK = {s: i for i, s in enumerate(("skipped", "input_error", "api_error", "invalid_answer", "ok"))}


@dataclass
class DoneIndex:
    docs: dict[tuple[str, str], DocRecord] = field(default_factory=dict)

    def add(self, sha: str, fp: str, page: int, last: int, status: str, path: str,
            page_count: int | None) -> None:
        rec = self.docs.setdefault((sha, fp), DocRecord())
        if page_count is not None:
            rec.page_count = page_count
        rec.paths.add(path)
        if status == "duplicate":
            return
        old = rec.units.get((page, last))
        if old is None or _RANK.get(status, -1) > _RANK.get(old, -1):
            rec.units[(page, last)] = status

    def get(self, sha: str, fp: str) -> DocRecord | None:
        return self.docs.get((sha, fp))


DONE_COLUMNS = ["source_sha256", "fingerprint", "page", "page_last", "status", "source_path",
                "page_count"]


def load_done(root: Path, fingerprint: str | None = None) -> DoneIndex:
    """Read key columns only; optionally only rows of one fingerprint."""
    index = DoneIndex()
    table = read_columns(root, "pages", DONE_COLUMNS)
    if table is None or table.num_rows == 0:
        return index
    if fingerprint is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["fingerprint"], fingerprint))
    cols = {name: table[name].to_pylist() for name in DONE_COLUMNS}
    for i in range(table.num_rows):
        index.add(cols["source_sha256"][i], cols["fingerprint"][i], cols["page"][i],
                  cols["page_last"][i], cols["status"][i], cols["source_path"][i],
                  cols["page_count"][i])
    return index


# ---------------------------------------------------------------- recovery


def encode_schema(schema: pa.Schema) -> str:
    """A schema as text for a journal header (Arrow IPC, base64)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def recover_journals(root: Path, pages_schema_for: Any, skip_run: str | None = None) -> list[str]:
    """Fold what killed runs left in _journal/ into Parquet; returns the recovered run ids.

    `pages_schema_for(header)` gives the pages schema for the run (its answer columns).
    """
    folder = root / "_journal"
    if not folder.is_dir():
        return []
    recovered = []
    for path in sorted(folder.glob("*.jsonl")):
        run_id = path.stem
        if run_id == skip_run:
            continue
        records = read_journal(path)
        header = next((r for r in records if r.get("t") == "run"), None)
        if header is None:
            path.unlink(missing_ok=True)
            continue
        # the killed run's own answer columns: the schema may have changed since the kill
        schema = (decode_schema(header["pages_schema"]) if header.get("pages_schema")
                  else pages_schema_for(header))
        _fold_run(root, run_id, header, records, schema)
        path.unlink(missing_ok=True)
        recovered.append(run_id)
    return recovered


def _existing(root: Path, table: str, run_id: str, cols: list[str]) -> set[tuple]:
    folder = root / table
    files = [str(p) for p in folder.rglob(f"*-{run_id}-*.parquet")] if folder.is_dir() else []
    if not files:
        return set()
    t = pq.ParquetDataset(files).read(columns=cols)
    return set(zip(*(t[c].to_pylist() for c in cols), strict=True))


def _fold_run(root: Path, run_id: str, header: dict[str, Any], records: list[dict[str, Any]],
              pschema: pa.Schema) -> None:
    date = header["date"]
    have_pages = _existing(root, "pages", run_id, ["key", "source_path", "page"])
    have_attempts = _existing(root, "attempts", run_id, ["key", "attempt"])
    pages = TableWriter(root, "pages", pschema, run_id, date, prefix="part-recovered")
    attempts = TableWriter(root, "attempts", ATTEMPTS_SCHEMA, run_id, date, prefix="part-recovered")
    all_pages, all_attempts = [], []
    for rec in records:
        kind = rec.get("t")
        if kind == "page":
            row = _from_journal(rec, pschema)
            all_pages.append(row)
            if (row["key"], row["source_path"], row["page"]) not in have_pages:
                pages.add(row)
        elif kind == "attempt":
            row = _from_journal(rec, ATTEMPTS_SCHEMA)
            all_attempts.append(row)
            if (row["key"], row["attempt"]) not in have_attempts:
                attempts.add(row)
    pages.flush()
    attempts.flush()
    runs_dir = root / "runs" / f"date={date}"
    if not (runs_dir / f"run-{run_id}.parquet").exists():
        counts = count_statuses(r["status"] for r in all_pages)
        write_run_row(root, date, {
            "run_id": run_id, "kind": header.get("kind"), "config_path": header.get("config_path"),
            "fingerprint": header.get("fingerprint"),
            "started_at": datetime.fromisoformat(header["started_at"]),
            "finished_at": None, "documents": len({r["source_path"] for r in all_pages}),
            "units_ok": counts["ok"], "units_failed": counts["failed"],
            "units_skipped": counts["skipped"], "requests": len(all_attempts),
            "credits": sum_exact(r["credits"] for r in all_attempts),
            "usd": sum_exact(r["usd"] for r in all_attempts),
            "outcome": "interrupted", "error": "the run was killed; recovered from its journal",
        })


def count_statuses(statuses: Iterable[str]) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    for s in statuses:
        if s == "ok":
            counts["ok"] += 1
        elif s in ("skipped", "duplicate"):
            counts["skipped"] += 1
        else:
            counts["failed"] += 1
    return counts


def sum_exact(values: Iterable[float | None]) -> float:
    """Order-independent, correctly rounded sum: totals match the API's to the last bit."""
    import math

    return math.fsum(v for v in values if v is not None)


def write_run_row(root: Path, date: str, row: dict[str, Any]) -> Path:
    path = root / "runs" / f"date={date}" / f"run-{row['run_id']}.parquet"
    write_parquet_atomic(pa.Table.from_pylist([row], schema=RUNS_SCHEMA), path)
    return path
