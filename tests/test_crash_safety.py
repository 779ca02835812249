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
from ernie_batch.run.engine import Pipeline, RunOptions, run_job
from ernie_batch.run.recovery import recover_journals
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY, job_config


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Killed(BaseException):
    """Stands for kill -9 at one step of a run (nothing after it runs; locks drop)."""


def die(*_args, **_kwargs):
    raise Killed


# where a staged kill falls (the run commits in rounds: attempts, then pages; at its end
# the last round, then documents, then its `runs` row)
AFTER_A_ROUND = "after_a_round"  # rows after the last round only in the journal
BETWEEN_TABLES = "between_tables"  # a round's attempts committed, its pages not
BEFORE_RUNS_ROW = "before_runs_row"  # everything but the manifest committed


def killed_run(cfg, at: str = AFTER_A_ROUND) -> Pipeline:
    """A run that sent everything, then died at `at`; its locks left behind as a kill leaves
    them, and a last journal line cut in half."""

    async def go() -> Pipeline:
        run = Pipeline(cfg, SecretStr(TEST_KEY), RunOptions())
        await run.__aenter__()
        await run.process(run.discover())
        if at == AFTER_A_ROUND:
            await run.pool.aclose()
            await run.client.aclose()
        elif at == BETWEEN_TABLES:
            run.recorder.pages.flush = die
            with pytest.raises(Killed):
                run.recorder.commit()
        else:
            from ernie_batch.run import recorder

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(recorder, "write_run_row", die)
                with pytest.raises(Killed):
                    await run.finish()
        run.recorder.journal.close(delete=False)
        return run

    run = asyncio.run(go())
    journal = run.recorder.journal.path
    with open(journal, "a", encoding="utf-8") as fh:  # a line cut by the kill
        fh.write('{"t":"page","run_id":"' + run.run_id + '","key":"ab')
    leave_locks_behind(run)
    return run


def leave_locks_behind(run: Pipeline) -> None:
    """As a kill leaves them: the lock files stay, naming a process that is gone, and the
    kernel has dropped the flocks."""
    lock = run.root.local_path(".lock")
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


@pytest.mark.parametrize("at", [AFTER_A_ROUND, BETWEEN_TABLES, BEFORE_RUNS_ROW])
def test_a_killed_runs_journal_is_folded_in_once_and_nothing_is_asked_again(job, at):
    sim, cfg, units = job
    dead = killed_run(cfg, at)
    out = dead.root.local_path()
    if at == AFTER_A_ROUND:
        assert len(dead.recorder.pages.rows) == units % 4 > 0  # rows only the journal holds
    if at == BETWEEN_TABLES:  # the round's attempts are in, its pages are not
        assert store.committed_version(out, "attempts", store.app_id(dead.run_id, "attempts")) \
            == dead.recorder.round > store.committed_version(
                out, "pages", store.app_id(dead.run_id, "pages"))
    summary = run_job(cfg, SecretStr(TEST_KEY))

    assert summary.recovered_runs == [dead.run_id]
    assert summary.requests == 0 and summary.outcome == "completed"
    check_exactly_once(sim, out, units)
    runs = store.read_table(out, "runs").to_pandas().set_index("run_id")
    killed = runs.loc[dead.run_id]
    # killed before its row was committed, the run had journaled it: that row, not a guess
    assert killed["outcome"] == ("completed" if at == BEFORE_RUNS_ROW else "interrupted")
    assert killed["units_ok"] == units and killed["requests"] == units
    assert killed["credits"] == math.fsum(e["credits"] for e in sim.ledger()["entries"])
    assert runs.loc[summary.run_id, "requests"] == 0
    documents = store.read_table(out, "documents").to_pandas()
    assert len(documents) == 11 and set(documents["run_id"]) == {dead.run_id}
    assert not list((out / "_journal").glob("*.jsonl"))
    assert not (out / ".lock").exists()


def test_recovery_cut_short_by_another_kill_does_not_double_count(job):
    sim, cfg, units = job
    dead = killed_run(cfg, BETWEEN_TABLES)
    journal = dead.recorder.journal.path
    saved = journal.read_bytes()
    # a resume folds the journal in, then is killed before it can delete the journal
    recover_journals(dead.root, dead.pages_schema)
    journal.write_bytes(saved)
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.recovered_runs == [dead.run_id] and summary.requests == 0
    check_exactly_once(sim, dead.root, units)
    runs = store.read_table(dead.root, "runs").to_pandas()
    assert len(runs) == 2 and runs["run_id"].is_unique
    assert len(store.read_table(dead.root, "documents")) == 11


def test_a_schema_changed_after_the_kill_does_not_block_the_resume(job, tmp_path):
    """The killed run's rows are folded in with its own answer columns, not the new run's;
    the new run's `total_amount` (now a string) lands in `answer_total_amount__string`, the
    killed run's stays a number in `answer_total_amount` (README "Output schema")."""
    sim, cfg, units = job
    dead = killed_run(cfg, BETWEEN_TABLES)
    schema = json.loads((PROJECT / "configs" / "schemas" / "page.json").read_text())
    schema["properties"]["total_amount"] = {"type": ["string", "null"]}
    schema["properties"]["pages_seen"] = {"type": "integer"}
    (tmp_path / "changed.json").write_text(json.dumps(schema))
    changed = job_config(sim.url, dead.root, [tmp_path / "in"],
                         **{"prompt.schema_file": str(tmp_path / "changed.json")})
    summary = run_job(changed, SecretStr(TEST_KEY))
    assert summary.recovered_runs == [dead.run_id]
    assert summary.outcome == "completed" and summary.requests == units  # a new fingerprint
    pages = store.read_table(dead.root, "pages")
    assert pages.schema.field("answer_total_amount").type == "double"
    assert pages.schema.field("answer_total_amount__string").type == "string"
    for row in pages.to_pylist():
        total = json.loads(row["answer_json"])["total_amount"]
        if row["run_id"] == dead.run_id:
            assert (row["answer_total_amount"], row["answer_total_amount__string"]) == (total, None)
            assert row["answer_pages_seen"] is None
        else:
            assert row["answer_total_amount"] is None
            assert row["answer_total_amount__string"] == total


def test_a_data_file_a_killed_writer_left_uncommitted_stays_invisible_until_vacuumed(tmp_path):
    """A writer killed after writing a data file and before its commit leaves an orphan: no
    reader sees its rows, and vacuum deletes it once it is older than the retention."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ernie_batch.store.maintain import vacuum_table

    writer = store.TableWriter(tmp_path, "pages", store.pages_schema([]), "2026-01-01")
    writer.add({"run_id": "a", "key": "k"})
    writer.flush()
    orphan = tmp_path / "pages" / "date=2026-01-01" / "part-00000-killed-c000.zstd.parquet"
    pq.write_table(pa.table({"run_id": ["b"], "key": ["half"]}), orphan)
    assert store.read_table(tmp_path, "pages").column("key").to_pylist() == ["k"]
    assert vacuum_table(tmp_path, "pages", 24) == 0 and orphan.exists()  # too young
    two_days_ago = time.time() - 48 * 3600
    os.utime(orphan, (two_days_ago, two_days_ago))
    assert vacuum_table(tmp_path, "pages", 24) == 1 and not orphan.exists()
    assert store.read_table(tmp_path, "pages").column("key").to_pylist() == ["k"]
    with pytest.raises(store.OutputError, match="below the floor of 24 h"):
        vacuum_table(tmp_path, "pages", 1)


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


def test_a_live_siblings_journal_is_never_touched(job):
    """Recovery folds only journals whose run-id lock is free: a live writer's stays as it is."""
    sim, cfg, units = job
    dead = killed_run(cfg)
    journal = dead.recorder.journal.path
    alive = store.run_id_lock(dead.root, dead.run_id)
    assert alive.try_acquire()  # as if its owner still lived (a shard run beside us)
    try:
        summary = run_job(cfg, SecretStr(TEST_KEY))
        assert summary.recovered_runs == [] and journal.exists()
    finally:
        alive.release()
    again = run_job(cfg, SecretStr(TEST_KEY))  # its owner gone: folded once
    assert again.recovered_runs == [dead.run_id] and again.requests == 0
    assert not journal.exists()
