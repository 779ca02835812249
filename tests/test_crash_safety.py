"""Crash safety of the output folder: the journal and the recovery of killed runs, atomic
files, one run at a time (the lock), and an unusable output folder found before any request.

The kill -9 of real subprocesses at random moments is in test_chaos.py; here each crash is
staged exactly (a run abandoned before its last flush, a recovery cut short), in-process.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.engine import Pipeline, RunOptions, run_job
from ernie_batch.recovery import recover_journals
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY, job_config


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def killed_run(cfg, *, lose_last_pages_part: bool) -> Pipeline:
    """A run that sent everything, then died: its last rows never flushed, its lock left behind.

    With `lose_last_pages_part`, the kill also fell between the attempts part and the pages
    part of a flush (the engine writes attempts first), so those pages exist only in the journal.
    """

    async def go() -> Pipeline:
        run = Pipeline(cfg, SecretStr(TEST_KEY), RunOptions())
        await run.__aenter__()
        flush = run.recorder.maybe_flush
        run.recorder.maybe_flush = lambda force=False: flush(False)  # no end-of-run flush
        await run.process(run.discover())
        await run.pool.aclose()
        await run.client.aclose()
        run.recorder.journal.close(delete=False)
        return run

    run = asyncio.run(go())
    if lose_last_pages_part:
        run.recorder.pages.parts[-1].unlink()
    journal = run.recorder.journal.path
    with open(journal, "a", encoding="utf-8") as fh:  # a line cut by the kill
        fh.write('{"t":"page","run_id":"' + run.run_id + '","key":"ab')
    leave_locks_behind(run)
    return run


def leave_locks_behind(run: Pipeline) -> None:
    """As a kill leaves them: the lock files stay, naming a process that is gone, and the
    kernel has dropped the flocks."""
    lock = run.root / ".lock"
    owner = json.loads(lock.read_text())
    lock.write_text(json.dumps({**owner, "pid": dead_pid()}))
    for held in (run._lock._lock, run._data_lock, run._own_lock):
        os.close(held._fd)
        held._fd = None


@pytest.fixture
def job(sim_factory, tmp_path):
    sim = sim_factory(latency_s=0.01)
    src = tmp_path / "in"
    units = chaos.make_corpus(src, images=10, pdf_pages=3, seed=11)
    cfg = job_config(sim.url, tmp_path / "out", [src],
                     **{"output.flush_rows": 4, "limits.concurrency": 4})
    return sim, cfg, units


def check_exactly_once(sim, out: Path, units: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    pages = store.read_table(out, "pages").to_pandas()
    attempts = store.read_table(out, "attempts").to_pandas()
    book = sim.ledger()["entries"]
    assert len(book) == units  # nothing received was asked for again
    assert len(pages) == units and pages["key"].is_unique
    assert set(pages["status"]) == {"ok"}
    assert sorted(attempts["response_id"]) == sorted(e["response_id"] for e in book)
    credits = math.fsum(e["credits"] for e in book if e["delivered"])
    assert math.fsum(attempts["credits"]) == credits
    assert math.isclose(math.fsum(pages["credits"]), credits, rel_tol=1e-12)
    return pages, attempts


@pytest.mark.parametrize("lose_last_pages_part", [False, True])
def test_a_killed_runs_journal_is_folded_in_once_and_nothing_is_asked_again(
        job, lose_last_pages_part):
    sim, cfg, units = job
    dead = killed_run(cfg, lose_last_pages_part=lose_last_pages_part)
    out = dead.root
    assert len(dead.recorder.pages.rows) == units % 4 > 0  # rows only the journal holds
    summary = run_job(cfg, SecretStr(TEST_KEY))

    assert summary.recovered_runs == [dead.run_id]
    assert summary.requests == 0 and summary.outcome == "completed"
    check_exactly_once(sim, out, units)
    runs = store.read_table(out, "runs").to_pandas().set_index("run_id")
    killed = runs.loc[dead.run_id]
    assert killed["outcome"] == "interrupted" and killed["units_ok"] == units
    assert killed["requests"] == units
    assert killed["credits"] == math.fsum(e["credits"] for e in sim.ledger()["entries"])
    assert runs.loc[summary.run_id, "requests"] == 0
    assert not list((out / "_journal").glob("*.jsonl"))
    assert not (out / ".lock").exists()


def test_recovery_cut_short_by_another_kill_does_not_double_count(job):
    sim, cfg, units = job
    dead = killed_run(cfg, lose_last_pages_part=True)
    journal = dead.recorder.journal.path
    saved = journal.read_bytes()
    # a resume folds the journal into parts, then is killed before it can delete the journal
    recover_journals(dead.root, dead.pages_schema)
    journal.write_bytes(saved)
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.recovered_runs == [dead.run_id] and summary.requests == 0
    check_exactly_once(sim, dead.root, units)
    runs = store.read_table(dead.root, "runs").to_pandas()
    assert len(runs) == 2 and runs["run_id"].is_unique


def test_a_schema_changed_after_the_kill_does_not_block_the_resume(job, tmp_path):
    """The killed run's rows are folded in with its own answer columns, not the new run's
    (a number column that became a string made every later run fail in recovery)."""
    import pyarrow.parquet as pq

    sim, cfg, units = job
    dead = killed_run(cfg, lose_last_pages_part=True)
    schema = json.loads((PROJECT / "configs" / "schemas" / "page.json").read_text())
    schema["properties"]["total_amount"] = {"type": ["string", "null"]}
    schema["properties"]["pages_seen"] = {"type": "integer"}
    (tmp_path / "changed.json").write_text(json.dumps(schema))
    changed = job_config(sim.url, dead.root, [tmp_path / "in"],
                         **{"prompt.schema_file": str(tmp_path / "changed.json")})
    summary = run_job(changed, SecretStr(TEST_KEY))
    assert summary.recovered_runs == [dead.run_id]
    assert summary.outcome == "completed" and summary.requests == units  # a new fingerprint
    recovered = [p for p in (dead.root / "pages").rglob("part-recovered-*.parquet")]
    assert recovered
    for part in recovered:
        t = pq.read_table(part)
        assert t.schema.field("answer_total_amount").type == "double"
        assert "answer_pages_seen" not in t.schema.names
        for answer, total in zip(t["answer_json"].to_pylist(),
                                 t["answer_total_amount"].to_pylist(), strict=True):
            assert json.loads(answer)["total_amount"] == total


def test_a_part_cut_before_its_rename_stays_invisible(tmp_path, monkeypatch):
    import pyarrow as pa

    t = pa.table({"run_id": ["a"], "key": ["k"]})
    store.write_parquet_atomic(t, tmp_path / "pages" / "date=2026-01-01" / "part-a-0000.parquet")

    def killed(*_args):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_parquet_atomic(pa.table({"run_id": ["b"], "key": ["half"]}),
                                   tmp_path / "pages" / "date=2026-01-01" / "part-b-0000.parquet")
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "pages").rglob("*"))
    assert [f for f in files if not f.startswith(".")] == ["date=2026-01-01",
                                                           "part-a-0000.parquet"]
    assert store.read_table(tmp_path, "pages").column("key").to_pylist() == ["k"]
    assert pd.read_parquet(tmp_path / "pages")["key"].tolist() == ["k"]


# ---------------------------------------------------------------- one run at a time


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ernie_batch.store import OutputLock
    lock = OutputLock(Path(sys.argv[1]), "holder-run")
    lock.acquire()
    print("held", flush=True)
    release = Path(sys.argv[2])
    while not release.exists():
        time.sleep(0.05)
    lock.release()
""")


def hold_lock(out: Path, release: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(release)], cwd=PROJECT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def cli(cfg: Path, name: str, *args: str, timeout: float = 120) -> tuple[int, str]:
    env = chaos.cli_env(chaos.prefect_home())
    env.pop("PREFECT_LOGGING_LEVEL")  # what a user sees by default
    log = chaos.log_file(name)
    rc = chaos.run_cli(cfg, env, log, *args, timeout=timeout)
    return rc, log.read_text()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_a_second_run_exits_5_while_the_first_holds_the_folder(sim_factory, tmp_path):
    sim = sim_factory()
    src, out = tmp_path / "in", tmp_path / "out"
    chaos.make_corpus(src, images=2, pdf_pages=1)
    cfg = chaos.write_config(tmp_path / "job.toml", src, out, sim.url, concurrency=2)
    chaos.EXTRA_OUTPUTS.append(out)
    holder = hold_lock(out, tmp_path / "release")
    try:
        rc, text = cli(cfg, "locked")
        waited_rc, waited = cli(cfg, "wait-runs-out", "--wait", "1.5")
        with pytest.raises(store.LockedError, match=r"still locked after waiting 0.2 s \(--wait\)$"):
            store.OutputLock(out, "r").acquire(0.2)  # the run's own wait: the same words
    finally:
        (tmp_path / "release").touch()
        holder.wait(timeout=10)
    assert rc == 5, text
    [line] = error_lines(text)
    assert "is locked by run holder-run" in line and f"pid {holder.pid}" in line
    assert "use --wait" in line
    # a --wait that runs out says so, instead of suggesting --wait
    assert waited_rc == 5, waited
    [line] = error_lines(waited)
    assert f"pid {holder.pid}" in line and "still locked after waiting 1.5 s" in line
    assert "use --wait" not in line
    assert sim.ledger()["entries"] == []
    assert not (out / "pages").exists()


def test_wait_queues_behind_the_lock_and_a_dead_owner_is_taken_over(job, tmp_path):
    sim, cfg, units = job
    out = Path(cfg.output.path)
    release = tmp_path / "release"
    holder = hold_lock(out, release)
    try:
        with pytest.raises(store.LockedError, match=f"pid {holder.pid}.*--wait"):
            run_job(cfg, SecretStr(TEST_KEY))
        assert sim.ledger()["entries"] == []
        t0 = time.monotonic()
        subprocess.Popen([sys.executable, "-c",
                          f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(release)!r})"
                          ".touch()"])
        summary = run_job(cfg, SecretStr(TEST_KEY), RunOptions(wait_lock_s=60))
        assert time.monotonic() - t0 >= 1.4
        assert summary.outcome == "completed" and summary.units_ok == units
    finally:
        release.touch()
        holder.wait(timeout=10)
    # a lock naming a process that no longer exists is stale: taken over at once
    (out / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename,
                                           "run_id": "ghost"}))
    summary = run_job(cfg, SecretStr(TEST_KEY), RunOptions(force=True))
    assert summary.outcome == "completed" and summary.requests == units
    assert not (out / ".lock").exists()


def test_cli_wait_queues_behind_a_live_run(sim_factory, tmp_path):
    sim = sim_factory()
    src, out = tmp_path / "in", tmp_path / "out"
    units = chaos.make_corpus(src, images=3, pdf_pages=1)
    cfg = chaos.write_config(tmp_path / "job.toml", src, out, sim.url, concurrency=2)
    chaos.EXTRA_OUTPUTS.append(out)
    release = tmp_path / "release"
    holder = hold_lock(out, release)
    env = chaos.cli_env(chaos.prefect_home())
    log = chaos.log_file("wait")
    proc = chaos.start_cli(cfg, env, log, "--wait", "120")
    try:
        time.sleep(4)  # the CLI queues at the lock before it even starts Prefect
        assert proc.poll() is None, log.read_text()
        assert sim.ledger()["entries"] == []  # still waiting, nothing sent
        release.touch()
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        release.touch()
        holder.wait(timeout=10)
        if proc.poll() is None:
            chaos.kill_group(proc)
    assert len(sim.ledger()["entries"]) == units


# ---------------------------------------------------------------- unusable output folders


def test_an_unwritable_output_folder_stops_the_cli_before_any_request(sim_factory, tmp_path):
    sim = sim_factory()
    src = tmp_path / "in"
    chaos.make_corpus(src, images=2, pdf_pages=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a folder should be\n")
    out = blocker / "out"  # root ignores permissions, but not a file used as a folder
    cfg = chaos.write_config(tmp_path / "job.toml", src, out, sim.url, concurrency=2)
    rc, text = cli(cfg, "unwritable")
    assert rc == 2, text
    [line] = error_lines(text)
    assert f"output folder {out} is not writable: {blocker} is a file" in line
    assert sim.ledger()["entries"] == []


def test_a_full_disk_is_found_before_any_request(job, monkeypatch):
    sim, cfg, _ = job

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(store.OutputError, match="not writable: No space left on device"):
        run_job(cfg, SecretStr(TEST_KEY))
    monkeypatch.undo()
    assert sim.ledger()["entries"] == []
    out = Path(cfg.output.path)
    assert not (out / ".lock").exists()
    assert list(out.iterdir()) == []  # not even the probe file is left behind


def test_a_part_left_half_written_by_a_kill_is_cleaned_up(job):
    sim, cfg, units = job
    run_job(cfg, SecretStr(TEST_KEY))
    folder = next((cfg.output.path / "pages").glob("date=*"))
    leftover = folder / ".part-20260101T000000Z-dead00-0000.parquet.123.tmp"
    leftover.write_bytes(b"PAR1 half a file")
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.requests == 0
    assert not leftover.exists()


def test_a_live_siblings_journal_and_temporary_parts_are_never_touched(job):
    """Recovery folds only journals whose run-id lock is free: a live writer's stay as they are."""
    sim, cfg, units = job
    dead = killed_run(cfg, lose_last_pages_part=False)
    journal = dead.recorder.journal.path
    folder = next((cfg.output.path / "pages").glob("date=*"))
    tmp = folder / f".part-{dead.run_id}-0009.parquet.1.tmp"
    tmp.write_bytes(b"PAR1 being written")
    alive = store.run_id_lock(dead.root, dead.run_id)
    assert alive.try_acquire()  # as if its owner still lived (a shard run beside us)
    try:
        summary = run_job(cfg, SecretStr(TEST_KEY))
        assert summary.recovered_runs == [] and journal.exists() and tmp.exists()
    finally:
        alive.release()
    again = run_job(cfg, SecretStr(TEST_KEY))  # its owner gone: folded once, leftovers removed
    assert again.recovered_runs == [dead.run_id] and again.requests == 0
    assert not journal.exists() and not tmp.exists()
