"""The output on object storage: every table a Delta table on S3 (a real S3 API on loopback),
written by runs and by every command, read back as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_batch import store
from tests import test_chaos as chaos
from tests.conftest import PROJECT, S3_SECRET

TABLES = ("pages", "attempts", "runs", "documents", "billing")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=300)


def _user_reads(url: str, table: str):
    """The table as a user reads it: delta-rs alone, reaching the bucket from the environment."""
    from deltalake import DeltaTable

    return DeltaTable(url + "/" + table).to_pyarrow_table()


@pytest.fixture
def s3_job(s3, sim_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A job whose output is s3://BUCKET/out, its CLI environment, and the simulator."""
    _, bucket = s3
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the local state folder
    sim = sim_factory()
    units = chaos.make_corpus(tmp_path / "in", images=3, pdf_pages=2, seed=27)
    out = f"s3://{bucket}/out"
    config = chaos.write_config(tmp_path / "job.toml", tmp_path / "in", out, sim.url,
                                concurrency=4, flush_rows=2)  # a few commits
    return config, out, chaos.cli_env(chaos.prefect_home()), sim, units


@pytest.mark.slow  # tens of seconds: the default tier stays under 10 minutes
def test_every_command_works_on_an_output_in_a_bucket(s3_job, tmp_path: Path) -> None:
    config, out, env, sim, units = s3_job
    res = _cli(env, "run", "-c", str(config), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["units_ok"] == units and summary["output"] == out
    assert not (PROJECT / "s3:").exists() and not (tmp_path / "s3:").exists()

    pages = store.read_table(out, "pages")
    assert pages.num_rows == units and set(pages["status"].to_pylist()) == {"ok"}
    mine = _user_reads(out, "pages")
    assert sorted(mine["key"].to_pylist()) == sorted(pages["key"].to_pylist())
    assert _user_reads(out, "runs")["run_id"].to_pylist() == [summary["run_id"]]
    attempts = store.read_table(out, "attempts")
    assert sum(attempts["credits"].to_pylist()) == summary["credits"]

    again = _cli(env, "run", "-c", str(config), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["units_already_done"] == units

    report = _cli(env, "report", "-c", str(config), "--run", summary["run_id"], "--json")
    assert report.returncode == 0, report.stderr
    (row,) = json.loads(report.stdout)["runs"]
    assert (row["credits"], row["outcome"]) == (summary["credits"], "completed")

    docs = _cli(env, "documents", "-c", str(config), "--rebuild")
    assert docs.returncode == 0, docs.stderr
    documents = store.read_table(out, "documents", current=True)
    assert documents.num_rows == 4 and all(documents["complete"].to_pylist())

    reconcile = _cli(env, "reconcile", "-c", str(config), "--run", summary["run_id"], "--json")
    assert reconcile.returncode == 0, reconcile.stderr
    figures = json.loads(reconcile.stdout.splitlines()[-1])
    assert figures["exact"] and figures["vendor_credits"] == summary["credits"]
    assert _user_reads(out, "billing").num_rows == summary["requests"]

    before = {t: sorted(map(str, store.read_table(out, t).to_pylist())) for t in TABLES}
    compact = _cli(env, "compact", "-c", str(config), "--json")
    assert compact.returncode == 0, compact.stderr
    rewritten = {t["table"]: t for t in json.loads(compact.stdout.splitlines()[-1])["tables"]}
    assert rewritten["pages"]["files_before"] > rewritten["pages"]["files_after"] == 1
    assert {t: sorted(map(str, store.read_table(out, t).to_pylist())) for t in TABLES} == before

    html = tmp_path / "review.html"
    review = _cli(env, "review", "-c", str(config), "--run", summary["run_id"],
                  "--html", str(html))
    assert review.returncode == 0, review.stderr
    assert html.read_text().count(summary["run_id"]) >= 1

    said = "".join(r.stdout + r.stderr for r in (res, again, report, docs, reconcile, compact,
                                                  review))
    assert S3_SECRET not in said
    for table in TABLES:
        assert S3_SECRET not in str(_user_reads(out, table).to_pylist())
    for path in (tmp_path / "cache").rglob("*"):  # the local state: journals, locks
        assert not path.is_file() or S3_SECRET.encode() not in path.read_bytes()


def test_a_bucket_that_cannot_be_written_is_one_line_before_a_run(s3, tmp_path: Path) -> None:
    from tests.conftest import TEST_KEY

    res = _cli(chaos.cli_env(chaos.prefect_home()) | {"AIMLAPI_API_KEY": TEST_KEY}, "run",
               str(tmp_path), "-c", str(PROJECT / "configs" / "demo.toml"),
               "--output", "s3://no-such-bucket-z/out")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "output s3://no-such-bucket-z/out is not writable" in lines[0]
    assert S3_SECRET not in res.stderr + res.stdout


@pytest.mark.slow  # a ttl to wait out and two runs through Prefect: ~30 s
def test_a_second_run_waits_for_the_lease_and_takes_over_a_dead_ones(s3_job, tmp_path) -> None:
    """The run lock on a bucket is a lease object: a live holder keeps a second run out (exit
    5, or it queues with --wait); a holder killed with -9 stops renewing, and once its lease
    lapsed by the store's clock the waiting run takes it over."""
    import signal
    import time

    config, out, env, _, units = s3_job
    config.write_text(config.read_text().replace("[output]\n", "[output]\nlease_ttl_s = 3\n"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom ernie_batch.location import OutputRoot\n"
         "from ernie_batch.store import OutputLock\n"
         f"OutputLock(OutputRoot({out!r}, lease_ttl_s=3), 'run-on-another-machine').acquire()\n"
         "print('held', flush=True)\ntime.sleep(600)\n"],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(4)  # renewed meanwhile: still held after its ttl
        locked = _cli(env, "run", "-c", str(config))
        assert locked.returncode == 5, locked.stderr
        assert f"output {out} is locked by run run-on-another-machine" in locked.stderr
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        res = _cli(env, "run", "-c", str(config), "--wait", "60", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.splitlines()[-1])["units_ok"] == units
        assert time.monotonic() - killed > 3  # not before the lease lapsed
    finally:
        holder.kill()
        holder.wait()


def test_one_compaction_at_a_time_on_a_bucket(s3_job) -> None:
    from ernie_batch.store import compact_lock

    config, out, env, _, _ = s3_job
    held = compact_lock(out)
    assert held.acquire()
    try:
        res = _cli(env, "compact", "-c", str(config))
        assert res.returncode == 5 and "is being compacted by another process" in res.stderr
    finally:
        held.release()
    res = _cli(env, "compact", "-c", str(config), "--json")
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_a_machine_lost_mid_run_costs_at_most_its_last_seconds_of_answers(
        s3, sim_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 with nothing committed yet and the local journal deleted (the machine is gone):
    the next run takes the lapsed lease, commits what the dead run staged, exactly once, and
    sends again only what arrived after its last staging."""
    import shutil
    import signal
    import time
    from collections import Counter

    _, bucket = s3
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stage_every_s = 1.0
    sim = sim_factory(latency_s=0.25)
    units = chaos.make_corpus(tmp_path / "in", images=60, pdf_pages=1, seed=29)
    out = f"s3://{bucket}/out"
    config = chaos.write_config(tmp_path / "job.toml", tmp_path / "in", out, sim.url,
                                concurrency=2, flush_rows=10_000)
    config.write_text(config.read_text().replace("[output]\n", (
        f"[output]\nlease_ttl_s = 3\nstage_every_s = {stage_every_s}\ncommit_every_s = 600\n")))
    env = chaos.cli_env(chaos.prefect_home())
    dead = chaos.start_cli(config, env, tmp_path / "dead.log")
    try:
        deadline = time.monotonic() + 240
        while len(sim.ledger()["entries"]) < 25 or not _staging_keys(bucket):
            assert dead.poll() is None and time.monotonic() < deadline, (
                tmp_path / "dead.log").read_text()
            time.sleep(0.2)
        time.sleep(1.5)  # mid-stage cadence
        os.killpg(dead.pid, signal.SIGKILL)
        killed_at = time.time()
    finally:
        dead.kill()
        dead.wait()
    sent_by_dead = len(sim.ledger()["entries"])
    assert store.read_table(out, "pages") is None or store.read_table(out, "pages").num_rows == 0
    shutil.rmtree(tmp_path / "cache")  # the journal and the state: lost with the machine

    res = _cli(env, "run", "-c", str(config), "--wait", "60", "--json")
    assert res.returncode == 0, res.stderr
    pages = store.read_table(out, "pages")
    assert pages.num_rows == units and len(set(pages["key"].to_pylist())) == units
    assert set(pages["status"].to_pylist()) == {"ok"}
    runs = {r["run_id"]: r for r in store.read_table(out, "runs").to_pylist()}
    assert len(runs) == 2 and sorted(r["outcome"] for r in runs.values()) == [
        "completed", "interrupted"]
    entries = sim.ledger()["entries"]
    times = Counter(e["content_sha256"] for e in entries)
    again = [e for e in entries[:sent_by_dead] if times[e["content_sha256"]] > 1]
    # answered before the kill yet sent again: only those after the dead run's last staging
    oldest = max((killed_at - e["at"] for e in again), default=0.0)
    print(f"sent by the dead run {sent_by_dead}, sent again {len(again)}, the oldest "
          f"{oldest:.2f} s before the kill (stage_every_s {stage_every_s})")
    assert sent_by_dead - len(again) >= 20  # most of it was kept
    assert oldest <= stage_every_s + 2 * 0.25 + 1.0  # the cadence, two responses, one stage write
    attempts = store.read_table(out, "attempts")
    assert len(set(zip(attempts["key"].to_pylist(), attempts["run_id"].to_pylist(),
                       attempts["attempt"].to_pylist(), strict=True))) == attempts.num_rows
    assert _staging_keys(bucket) == []  # folded, then deleted


def _staging_keys(bucket: str) -> list[str]:
    import obstore

    from ernie_batch.buckets import client, resolve_access

    return [m["path"] for batch in obstore.list(client(resolve_access(), "s3", bucket),
                                                 "out/_staging/") for m in batch]


@pytest.mark.slow
def test_compaction_killed_at_random_points_in_a_bucket_and_a_reader_beside_it(
        s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of `compact` at random points leaves every row once; the next compaction takes
    the lapsed lease and finishes; a reader during it sees every row once, at every read."""
    import random
    import signal
    import threading
    import time

    import pyarrow as pa

    _, bucket = s3
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = f"s3://{bucket}/out"
    schema = store.pages_schema([])
    for i in range(24):  # 24 commits over 3 date partitions
        rows = [{name: None for name in schema.names} | {
            "run_id": f"run-{i:02d}", "key": f"k{i}-{j}", "source_path": f"/in/{i}/{j}.png",
            "source_sha256": f"{i:02d}{j:02d}" * 16, "doc_type": "png", "status": "ok"}
            for j in range(5)]
        store.append_rows(out, "pages", pa.Table.from_pylist(rows, schema=schema),
                          f"2026-01-0{1 + i % 3}")
    keys = sorted(f"k{i}-{j}" for i in range(24) for j in range(5))
    (tmp_path / "in").mkdir()
    config = chaos.write_config(tmp_path / "job.toml", tmp_path / "in", out,
                                "http://127.0.0.1:9/v1", concurrency=1)
    config.write_text(config.read_text().replace("[output]\n", "[output]\nlease_ttl_s = 3\n"))
    env = chaos.cli_env(chaos.prefect_home())
    rng = random.Random(2027)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "ernie_batch.cli", "compact", "-c",
                                 str(config), "--wait", "30"], cwd=PROJECT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(1.0, 6.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert sorted(store.read_columns(out, "pages", ["key"])["key"].to_pylist()) == keys

    seen: list[list[str]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(sorted(store.read_columns(out, "pages", ["key"])["key"].to_pylist()))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        res = _cli(env, "compact", "-c", str(config), "--wait", "30", "--json")
    finally:
        stop.set()
        reader.join()
    assert res.returncode == 0, res.stderr
    assert seen and all(s == keys for s in seen), len(seen)
    handle = _user_reads(out, "pages")
    assert sorted(handle["key"].to_pylist()) == keys
    from ernie_batch.store.maintain import files_by_partition

    assert {d: f.files for d, f in files_by_partition(out, "pages").items()} == {
        "2026-01-01": 1, "2026-01-02": 1, "2026-01-03": 1}


def test_a_journal_left_on_a_machine_whose_run_was_recovered_elsewhere_adds_nothing(
        s3, tmp_path: Path) -> None:
    """Machine A's run commits a round, journals one more answer and is lost before staging
    it (its journal stays on A's disk). Machine B's run recovers it from what it staged (its
    `runs` row written) and answers that unit again. A comes back with its disk: its next run
    discards the journal instead of committing the late answer a second time."""
    from datetime import UTC, datetime

    from ernie_batch.buckets import resolve_access
    from ernie_batch.location import OutputRoot
    from ernie_batch.run.recorder import RunInfo, RunRecorder
    from ernie_batch.run.recovery import recover_journals
    from ernie_batch.run.staged import recover_staged
    from ernie_batch.store import AttemptRow, PageRow

    _, bucket = s3
    out = f"s3://{bucket}/out"
    machine_a, machine_b = (OutputRoot(out, resolve_access(), tmp_path / m, 3.0) for m in "ab")
    schema = store.pages_schema([])
    now = datetime.now(UTC)
    lost = RunRecorder(machine_a, RunInfo(run_id=store.new_run_id(now), kind="run",
                                          started_at=now, fingerprint="f" * 64), schema,
                       stage_every_s=3600)
    lost.open_journal({"pages_schema": store.encode_schema(schema)})

    def answer(key: str) -> None:
        lost.attempt(AttemptRow(
            run_id=lost.run_id, key=key, attempt=1, status_code=200, outcome="ok", error=None,
            response_id=f"chatcmpl-{key}", prompt_tokens=10, completion_tokens=5, credits=900.0,
            usd=0.0045, temperature=None, latency_s=0.2, started_at=now))
        lost.page(PageRow(
            run_id=lost.run_id, key=key, fingerprint="f" * 64, source_path=f"s3://b/{key}.png",
            source_sha256=key, doc_type="image", page=1, page_last=1, page_count=1,
            status="ok", error=None, model="m", started_at=now, finished_at=now, attempts=1,
            credits=900.0, latency_s=0.2))

    answer("first")
    assert lost.commit() == 1  # staged and committed
    answer("late")  # journaled on A, never staged: the machine is lost here
    lost.journal.close(delete=False)

    assert recover_staged(machine_b, schema) == [lost.run_id]  # B: from what it staged
    assert recover_journals(machine_a, schema) == [lost.run_id]  # A, back with its disk
    pages = store.read_table(out, "pages").to_pylist()
    assert [r["key"] for r in pages] == ["first"]  # "late" was sent again by B's run
    runs = store.read_table(out, "runs").to_pylist()
    assert [(r["run_id"], r["outcome"]) for r in runs] == [(lost.run_id, "interrupted")]
    assert not list(machine_a.journal_dir.glob("*.jsonl"))
