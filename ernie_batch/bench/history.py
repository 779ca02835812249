"""Benchmark `history`: a run's start-up against a long history, before and after `compact`.

A synthetic history (1,000 hourly runs of 1,000 pages, one part per table and run: 1,000,000
`pages` rows; `--scale` multiplies the runs) is built as Arrow tables directly, with the
fingerprint of the config the measured runs use, so their done-index really reads it. Each
measured run sends 10 new images to the simulator (in its own process) and runs in a fresh
process of its own: its start-up is `Pipeline.startup_s` (entry to locks, recovery and the
done-index ready), its memory the rise of its peak RSS over the run. Baseline, in the same
process after the run: pyarrow's plain read of the same files' done-index key columns (best
of two; the history is synced to disk, the page cache and pyarrow's thread pools warmed
first). Headline: raw read time / start-up, the worse of before and after compaction (goal
>= 0.667: start-up at most 1.5x the raw read).
"""

from __future__ import annotations

import binascii
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

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


def generate(root: Path, runs: int, pages_per_run: int, fingerprint: str,
             pages_schema: pa.Schema) -> None:
    """The history: one part per table and run, in the run's date partition, named as the
    engine names them (a manifest `run-<run_id>.parquet`); two threads."""
    from ernie_batch.store import run_row_path, write_parquet_atomic

    def one(i: int) -> None:
        at = T0 + timedelta(hours=i)
        for name, table in run_tables(i, fingerprint, pages_schema, pages_per_run).items():
            run_id = table["run_id"][0].as_py()
            day = f"{at:%Y-%m-%d}"
            write_parquet_atomic(table, run_row_path(root, day, run_id) if name == "runs" else
                                 root / name / f"date={day}" / f"part-{run_id}-0000.parquet")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(runs)))


# --- the measuring child process ----------------------------------------------------------------


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0]) / 1024


def raw_read_s(root: Path) -> float:
    """pyarrow's plain read of the done-index key columns of every pages file, best of two."""
    import pyarrow.dataset as pads

    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        files = sorted(str(p) for p in (root / "pages").rglob("*.parquet"))
        if files:
            pads.dataset(files, format="parquet").to_table(columns=KEY_COLUMNS)
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
    from ernie_batch.engine import Pipeline

    root = Path(args["output"])
    if args.get("warm_only"):
        os.sync()  # the history just written is on disk: a run's fsyncs do not wait for it
        return {"raw_read_s": raw_read_s(root)}
    cfg = job_config(args["url"], Path(args["sources"]), root, rpm=0)

    async def go() -> tuple[float, Any]:
        async with Pipeline(cfg, SecretStr(KEY)) as run:
            await run.process(run.discover())
            summary = await run.finish()
        return run.startup_s, summary

    _warm_up(root.parent / "warm.parquet")
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    startup_s, summary = asyncio.run(go())
    peak = _rss_mb("VmHWM")
    return {"startup_s": startup_s, "rss_rise_mb": peak - before, "units_ok": summary.units_ok,
            "raw_read_s": raw_read_s(root)}


def _measure(**args: Any) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "ernie_batch.bench.history", json.dumps(args)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(scale: float = 1.0) -> dict[str, Any]:
    """RUNS x scale runs of history; see the module docstring."""
    from ernie_batch import prompt
    from ernie_batch.answers import answer_fields
    from ernie_batch.bench._http import SimProcess, job_config, make_images, workdir
    from ernie_batch.compact import TABLE_ORDER, compact_output
    from ernie_batch.store import pages_schema

    runs = max(2, round(RUNS * scale))
    with workdir("history") as tmp, SimProcess() as sim:
        hist = tmp / "history"
        cfg = job_config(sim.url, tmp, hist)
        schema = pages_schema(answer_fields(cfg.resolved.schema))
        started = time.perf_counter()
        generate(hist, runs, PAGES_PER_RUN, prompt.fingerprint(cfg), schema)
        generated_s = time.perf_counter() - started
        parts_before = len(list((hist / "pages").rglob("*.parquet")))
        sources = [make_images(tmp / f"new-{k}", NEW_FILES, first=k * NEW_FILES) for k in range(3)]
        empty = _measure(url=sim.url, sources=str(sources[0]), output=str(tmp / "empty"))
        _measure(output=str(hist), warm_only=True)
        before = _measure(url=sim.url, sources=str(sources[1]), output=str(hist))
        started = time.perf_counter()
        compaction = compact_output(hist, list(TABLE_ORDER), schema)
        compact_s = time.perf_counter() - started
        _measure(output=str(hist), warm_only=True)
        after = _measure(url=sim.url, sources=str(sources[2]), output=str(hist))
        parts_after = len(list((hist / "pages").rglob("*.parquet")))
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
        "new_files_ok": [empty["units_ok"], before["units_ok"], after["units_ok"]],
        "scale": scale,
    }


if __name__ == "__main__":
    if sys.argv[1].startswith("{"):
        print(json.dumps(_child(json.loads(sys.argv[1]))))
    else:
        print(json.dumps(run(float(sys.argv[1]))))
