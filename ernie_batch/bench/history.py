"""Benchmark `history`: a run's start-up against a long history, before and after `compact`.

A synthetic history (1,000 hourly runs of 1,000 pages, one Delta commit per table and run:
1,000,000 `pages` rows in 1,000 commits; `--scale` multiplies the runs) is built as Arrow
tables directly, with the fingerprint of the config the measured runs use, so their
done-index really reads it. Each measured run sends 10 new images to the simulator (in its
own process) and runs in a fresh process of its own: its start-up is `Pipeline.startup_s`
(entry to locks, recovery and the done-index ready), its time the whole run (to its last
commit), its memory the rise of its peak RSS over the run; the same run over an empty
output is the reference for the time and memory a history adds (goal: at most 2 s and
400 MB). Baseline of the start-up, in the same process after the run: pyarrow's plain read
of the done-index key columns of the data files the Delta log lists (best of two; the
history is synced to disk, the page cache and pyarrow's thread pools warmed first).

`output` (`bench history --output s3://bucket/prefix`) puts both outputs on object storage,
reached through the standard AWS environment, under a fresh prefix deleted at the end (a
folder works too); the history is written in a local folder and copied there (`_upload`),
and the runs' local state stays in the scenario's temporary folder.
Headline: raw read time / start-up, the worse of before and after compaction (goal >=
0.667: start-up at most 1.5x the raw read).
"""

from __future__ import annotations

import binascii
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pyarrow as pa

from ernie_batch.location import Location, OutputRoot, StrPath

RUNS = 1000
PAGES_PER_RUN = 1000
PAGES_PER_DOC = 5
NEW_FILES = 10
T0 = datetime(2025, 1, 1, tzinfo=UTC)
KEY_COLUMNS = ["fingerprint", "source_sha256", "page", "page_last", "status", "source_path",
               "page_count", "run_id"]


def _hexes(rng: np.random.Generator, n: int) -> pa.Array:
    """`n` random sha256-like hex strings, built from one buffer (no Python string per row)."""
    data = binascii.hexlify(rng.bytes(32 * n))
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))


def _repeat(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.array([value], type_).take(pa.array(np.zeros(n, np.int32)))


def run_tables(i: int, fingerprint: str, pages_schema: pa.Schema, n: int) -> dict[str, pa.Table]:
    """Run `i`'s rows: `n` pages (5-page documents, 3 % failed), one attempt each, its manifest."""
    from ernie_batch.store import ATTEMPTS_SCHEMA, RUNS_SCHEMA

    rng = np.random.default_rng(i)
    at = T0 + timedelta(hours=i)
    run_id = f"{at:%Y%m%dT%H%M%SZ}-{i:06x}"
    docs = -(-n // PAGES_PER_DOC)
    doc = pa.array(np.repeat(np.arange(docs), PAGES_PER_DOC)[:n])
    page = pa.array((np.arange(n) % PAGES_PER_DOC + 1).astype(np.int32))
    ok = rng.random(n) < 0.97
    status = pa.array(np.where(ok, "ok", "invalid_answer"))
    titles = pa.array([f"Invoice {k}" for k in range(200)])
    answer = pa.array([json.dumps({"document_type": "invoice", "title": f"Invoice {k}",
                                   "language": "en", "total_amount": k * 1.5})
                       for k in range(200)]).take(pa.array(rng.integers(0, 200, n)))
    spent = rng.integers(1000, 3000, n).astype(np.float64)
    credits = pa.array(spent)
    est = np.full(n, 1808)  # a PDF page and its text, as estimated before sending
    billed = est + rng.integers(-20, 20, n)
    key = _hexes(rng, n)
    stamp = _repeat(at, n, pa.timestamp("us", tz="UTC"))
    pages = {
        "run_id": _repeat(run_id, n, pa.string()), "key": key,
        "fingerprint": _repeat(fingerprint, n, pa.string()),
        "source_path": pa.array([f"/data/inbox/{at:%Y-%m-%d}/doc-{i:05d}-{d:04d}.pdf"
                                 for d in range(docs)]).take(doc),
        "source_sha256": _hexes(rng, docs).take(doc), "doc_type": _repeat("pdf", n, pa.string()),
        "page": page, "page_last": page,
        "page_count": _repeat(PAGES_PER_DOC, n, pa.int32()), "content_sha256": _hexes(rng, n),
        "status": status, "answer_json": answer, "raw_answer": answer,
        "answer_title": titles.take(pa.array(rng.integers(0, 200, n))),
        "attempts": _repeat(1, n, pa.int16()), "credits": credits,
        "prompt_tokens": pa.array(billed), "prompt_tokens_est": pa.array(est),
        "completion_tokens": pa.array(rng.integers(60, 120, n)),
        "usd": pa.array(spent / 2_000_000), "model": _repeat("baidu/ernie-4.5-vl-424b-a47b", n, pa.string()),
        "started_at": stamp, "finished_at": stamp,
    }
    attempts = {"run_id": pages["run_id"], "key": key, "attempt": _repeat(1, n, pa.int16()),
                "status_code": _repeat(200, n, pa.int16()), "outcome": status,
                "credits": credits, "usd": pages["usd"], "started_at": stamp}
    manifest = {"run_id": [run_id], "kind": ["ingest"], "fingerprint": [fingerprint],
                "started_at": [at], "finished_at": [at], "units_ok": [int(ok.sum())],
                "requests": [n], "credits": [math.fsum(spent)], "outcome": ["completed"]}
    return {name: pa.table({f.name: cols[f.name] if f.name in cols else pa.nulls(
                len(next(iter(cols.values()))), f.type) for f in schema}, schema=schema)
            for name, schema, cols in (("pages", pages_schema, pages),
                                        ("attempts", ATTEMPTS_SCHEMA, attempts),
                                        ("runs", RUNS_SCHEMA, manifest))}


def generate(root: StrPath, runs: int, pages_per_run: int, fingerprint: str,
             pages_schema: pa.Schema) -> None:
    """The history: one commit per table and run, in the run's date partition, each table
    written by its own thread (commits to different tables do not wait for each other)."""
    from ernie_batch.store import append_rows

    def table(name: str) -> None:
        for i in range(runs):
            rows = run_tables(i, fingerprint, pages_schema, pages_per_run)[name]
            append_rows(root, name, rows, f"{T0 + timedelta(hours=i):%Y-%m-%d}")

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(table, ("pages", "attempts", "runs")))


# --- the measuring child process ----------------------------------------------------------------


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0]) / 1024


def raw_read_s(root: str) -> float:
    """pyarrow's plain read of the done-index key columns of the pages table's current data
    files (as the Delta log lists them; on object storage through pyarrow's own S3 client,
    which reads the same AWS environment), best of two."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        try:
            files = DeltaTable(OutputRoot.of(root).table_uri("pages")).file_uris()
        except TableNotFoundError:
            files = []
        if files:
            fs, _ = pafs.FileSystem.from_uri(files[0])
            paths = [f.partition("://")[2] or f for f in files]
            pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=KEY_COLUMNS)
        best = min(best, time.perf_counter() - started)
    return best


def _warm_up(path: Path) -> None:
    """A filtered read of a one-row file: pyarrow starts its thread pools and kernels on first
    use (~0.15 s once per process), which would land on whichever side reads first."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"k": ["a"]}), path)
    pads.dataset([str(path)]).to_table(filter=pc.field("k").isin(["a"]))


def _child(args: dict[str, Any]) -> dict[str, Any]:
    """One measured run (see the module docstring); then the raw read of the same files."""
    import asyncio

    from pydantic import SecretStr

    from ernie_batch.bench._http import KEY, job_config
    from ernie_batch.run.engine import Pipeline

    root = args["output"]
    if args.get("warm_only"):
        os.sync()  # the history just written is on disk: a run's fsyncs do not wait for it
        return {"raw_read_s": raw_read_s(root)}
    cfg = job_config(args["url"], Path(args["sources"]), root, state_dir=Path(args["state"]),
                     rpm=0)

    async def go() -> tuple[float, Any]:
        async with Pipeline(cfg, SecretStr(KEY)) as run:
            await run.process(run.discover())
            summary = await run.finish()
        return run.startup_s, summary

    Path(args["state"]).mkdir(parents=True, exist_ok=True)
    _warm_up(Path(args["state"]) / "warm.parquet")
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    started = time.perf_counter()
    startup_s, summary = asyncio.run(go())
    run_s = time.perf_counter() - started
    peak = _rss_mb("VmHWM")
    return {"startup_s": startup_s, "run_s": run_s, "rss_rise_mb": peak - before,
            "units_ok": summary.units_ok, "raw_read_s": raw_read_s(root)}


def _measure(**args: Any) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "ernie_batch.bench.history", json.dumps(args)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench history: a measured run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _files(root: StrPath | OutputRoot) -> int:
    from ernie_batch.store.maintain import files_by_partition

    return sum(f.files for f in files_by_partition(root, "pages").values())


def _root(url: str, state: Path) -> OutputRoot:
    """The output at `url` as the store takes it, its local state (if on object storage) in
    `state`."""
    out = OutputRoot.of(url)
    return OutputRoot(out.url, state_dir=state) if not out.is_local else out


def _delete_prefix(where: Location) -> int:
    """Every object under the prefix `where` deleted (what the scenario wrote); how many."""
    import obstore

    from ernie_batch.buckets import client

    store = client(OutputRoot.of(where).object_access(), where.scheme, where.bucket)
    paths = [m["path"] for batch in obstore.list(store, where.key + "/", chunk_size=1000)
             for m in batch]
    for i in range(0, len(paths), 1000):
        obstore.delete(store, paths[i:i + 1000])
    return len(paths)


def _upload(folder: Path, where: Location) -> float:
    """Copy the tables written in `folder` to `where` (16 at a time; a Delta log names its
    data files relative to the table, so the copy is the same tables); seconds taken. Written
    on object storage directly, the history took 1.4 s a run (3 commits) at 100 runs on the
    loopback S3, and more as the log grows: about half an hour at 1,000."""
    import obstore

    from ernie_batch.buckets import client

    started = time.perf_counter()
    store = client(OutputRoot.of(where).object_access(), where.scheme, where.bucket)
    files = [f for f in folder.rglob("*") if f.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: obstore.put(
            store, f"{where.key}/{f.relative_to(folder).as_posix()}", f.read_bytes()), files))
    shutil.rmtree(folder)
    return time.perf_counter() - started


def run(scale: float = 1.0, output: str | None = None) -> dict[str, Any]:
    """RUNS x scale runs of history, written under `output` (a folder or s3://bucket/prefix;
    default: a temporary folder); see the module docstring."""
    from ernie_batch.answers import prompt
    from ernie_batch.answers.judge import answer_fields
    from ernie_batch.bench._http import SimProcess, job_config, make_images, workdir
    from ernie_batch.run.compact import COMPACTED_TABLES, compact_output
    from ernie_batch.store import pages_schema

    runs = max(2, round(RUNS * scale))
    with workdir("history") as tmp, SimProcess() as sim:
        base = Location.parse(output).absolute().join(f"ernie-bench-history-{uuid4().hex[:8]}") \
            if output else Location.parse(tmp)
        hist, empty_out = str(base / "history"), str(base / "empty")
        state = {k: str(tmp / f"state-{k}") for k in ("empty", "before", "after", "compact")}
        try:
            cfg = job_config(sim.url, tmp, hist)
            schema = pages_schema(answer_fields(cfg.resolved.schema))
            started = time.perf_counter()
            written = hist if not base.is_remote else str(tmp / "history")
            generate(written, runs, PAGES_PER_RUN, prompt.fingerprint(cfg), schema)
            generated_s = time.perf_counter() - started
            uploaded_s = _upload(Path(written), base / "history") if base.is_remote else 0.0
            parts_before = _files(hist)
            sources = [make_images(tmp / f"new-{k}", NEW_FILES, first=k * NEW_FILES)
                       for k in range(3)]
            empty = _measure(url=sim.url, sources=str(sources[0]), output=empty_out,
                             state=state["empty"])
            _measure(output=hist, warm_only=True)
            before = _measure(url=sim.url, sources=str(sources[1]), output=hist,
                              state=state["before"])
            started = time.perf_counter()
            compaction = compact_output(_root(hist, Path(state["compact"])),
                                        list(COMPACTED_TABLES), schema)
            compact_s = time.perf_counter() - started
            _measure(output=hist, warm_only=True)
            after = _measure(url=sim.url, sources=str(sources[2]), output=hist,
                             state=state["after"])
            parts_after = _files(hist)
        finally:
            if output and base.is_remote:
                _delete_prefix(base)
    return {
        "scenario": "history",
        "ratio": round(min(before["raw_read_s"] / before["startup_s"],
                           after["raw_read_s"] / after["startup_s"]), 3),
        "goal": round(1 / 1.5, 3),
        "startup_over_raw_read": round(before["startup_s"] / before["raw_read_s"], 3),
        "startup_over_raw_read_compacted": round(after["startup_s"] / after["raw_read_s"], 3),
        "startup_s": round(before["startup_s"], 3),
        "startup_s_compacted": round(after["startup_s"], 3),
        "startup_s_empty_output": round(empty["startup_s"], 3),
        "raw_read_s": round(before["raw_read_s"], 3),
        "raw_read_s_compacted": round(after["raw_read_s"], 3),
        # the whole run (start-up, 10 files sent, documents, commits) against the same run on
        # an empty output: the goal, at most 2 s and 400 MB more
        "run_s_above_empty": round(before["run_s"] - empty["run_s"], 2),
        "run_s_above_empty_compacted": round(after["run_s"] - empty["run_s"], 2),
        "goal_run_s_above_empty": 2.0,
        "run_s_empty_output": round(empty["run_s"], 2),
        "rss_above_empty_mb": round(before["rss_rise_mb"] - empty["rss_rise_mb"], 1),
        "rss_above_empty_mb_compacted": round(after["rss_rise_mb"] - empty["rss_rise_mb"], 1),
        "goal_rss_above_empty_mb": 400,
        "rss_rise_mb_empty_output": round(empty["rss_rise_mb"], 1),
        "pages_rows": runs * PAGES_PER_RUN,
        "pages_parts": parts_before,
        "pages_files_compacted": parts_after,
        "compact_s": round(compact_s, 2),
        "compacted_tables": {t.table: [t.files_before, t.files_after] for t in compaction.tables
                             if t.files_before},
        "generate_s": round(generated_s, 1),
        "upload_s": round(uploaded_s, 1),
        "new_files_ok": [empty["units_ok"], before["units_ok"], after["units_ok"]],
        "scale": scale,
        "output": "object storage" if output and base.is_remote else "local folder",
    }


if __name__ == "__main__":
    if sys.argv[1].startswith("{"):
        print(json.dumps(_child(json.loads(sys.argv[1]))))
    else:
        print(json.dumps(run(float(sys.argv[1]))))
