"""Benchmark `scale`: one API limit shared by 1, 2 and 3 workers of a Prefect work pool.

A Prefect server (SQLite, in a private home), `ernie-batch deploy`, then for each window
(12 s, and the API's 60 s) and each worker count a run of the CLI with `--pool --shards
<workers>`, the workers started as the README says (`pool.worker_command`: one flow run at
a time each), against the simulator (its own process) limited to `PER_WINDOW` requests per
window, `REQUESTS` requests a round (10 windows): the rate the simulator saw while requests
flowed (first to last answer) over the limit, its busiest window and its 429s, and the rate
over the whole command (start-up included). The headline ratio is the worst round's.
The documents are put in a bucket of a loopback S3 API (moto's server, its own process),
since the workers of a pool read no path of the coordinator's; the output is a local
folder (one host), so the figures are the limit's sharing, not the object store's speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ernie_batch.bench._http import (
    KEY,
    SimProcess,
    arrival_rate,
    busiest_window,
    count_429,
    make_images,
    moto_s3,
    workdir,
)

WINDOWS_S = (12.0, 60.0)
PER_WINDOW = 120
LATENCY_S = 0.4
CONCURRENCY = 16  # per shard: well above rate x latency, so one shard alone can use it all
REQUESTS = 1200  # 10 windows
POOL = "ernie-bench"
BUCKET = "bench-scale"


def _config(path: Path, sim_url: str, sources: str, output: Path, window_s: float) -> Path:
    q = json.dumps
    path.write_text(f"""name = "bench-scale"
[sources]
paths = [{q(sources)}]
[api]
base_url = {q(sim_url)}
timeout_s = 60
[limits]
concurrency = {CONCURRENCY}
rpm = {PER_WINDOW * 60 / window_s}
window_s = {window_s}
[retries]
backoff_base_s = 0.05
backoff_max_s = 1.0
[prepare]
workers = -1
[output]
path = {q(str(output))}
""")
    return path


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "AIMLAPI_API_KEY": KEY,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
                "PREFECT_WORKER_QUERY_SECONDS": "1", **extra})
    return env


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args], env=env,
                          capture_output=True, text=True, timeout=1800)


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    """Stop the workers: SIGTERM (Prefect's worker turns it into a SIGINT to itself), and
    SIGKILL for one still there after `grace_s` (seen here: a worker idle for 40 minutes
    after its SIGTERM, which kept the benchmark waiting)."""
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _upload(store: Any, folder: Path, prefix: str) -> str:
    """Every file of `folder` put under `prefix` in the bench's bucket; the prefix's URL."""
    import obstore

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: obstore.put(store, f"{prefix}/{p.name}", p.read_bytes()),
                      sorted(folder.iterdir())))
    return f"s3://{BUCKET}/{prefix}/"


def _round(workers: int, n: int, tmp: Path, sim: SimProcess, env: dict[str, str],
           first: int, window_s: float, bucket: Any) -> dict[str, Any]:
    """One run with `workers` workers and as many shards; the simulator's figures."""
    from ernie_batch.scale.pool import worker_command

    name = f"{window_s:g}s-{workers}"
    sources = _upload(bucket, make_images(tmp / f"in-{name}", n, first=first), f"in-{name}")
    config = _config(tmp / f"job-{name}.toml", sim.url, sources, tmp / f"out-{name}", window_s)
    command = [sys.executable, "-m", *worker_command(POOL).split()]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
             for _ in range(workers)]
    try:
        time.sleep(window_s * 1.05)  # a quiet window, then an empty ledger
        sim.reset()
        started = time.time()
        done = _cli("run", "-c", str(config), "--pool", POOL, "--shards", str(workers),
                    "--json", env=env)
        seconds = time.time() - started
        book = sim.ledger()
    finally:
        _stop(procs)
    if done.returncode != 0:
        raise RuntimeError(f"the run with {workers} worker(s) failed: {done.stderr[-2000:]}")
    entries = book["entries"]
    return {"ratio": round(arrival_rate(entries, window_s) / PER_WINDOW, 3),
            "busiest_window": busiest_window(entries, window_s),
            "rate_limited": count_429(book["stats"]), "requests": len(entries),
            "wall_ratio": round(len(entries) / seconds * window_s / PER_WINDOW, 3),
            "seconds": round(seconds, 1)}


def run(scale: float = 1.0) -> dict[str, Any]:
    from ernie_batch.buckets import client, resolve_access
    from ernie_batch.prefect_server import start_local_server, use_api
    from ernie_batch.scale.pool import deploy_pool

    n = max(10, round(REQUESTS * scale))
    figures: dict[str, Any] = {}
    with workdir("scale") as tmp, moto_s3(BUCKET) as s3, start_local_server(
            extra_env={"PREFECT_HOME": str(tmp / "home")}) as server:  # its database, ours alone
        bucket = client(resolve_access(environ=s3), "s3", BUCKET)
        with use_api(server.api_url):
            deploy_pool(POOL)
        env = _env(tmp / "home", PREFECT_API_URL=server.api_url, **s3)
        for w, window_s in enumerate(WINDOWS_S):
            with SimProcess(rpm=PER_WINDOW * 60 / window_s, window_s=window_s,
                            latency_s=LATENCY_S) as sim:
                for i, workers in enumerate((1, 2, 3)):
                    figures[f"window_{window_s:g}s_workers_{workers}"] = _round(
                        workers, n, tmp, sim, env, first=(3 * w + i) * n, window_s=window_s,
                        bucket=bucket)
    rounds = list(figures.values())
    return {
        "scenario": "scale",
        "ratio": min(r["ratio"] for r in rounds),
        "goal": 0.93,
        "busiest_window_over_limit": max(r["busiest_window"] - PER_WINDOW for r in rounds),
        "limit_per_window": PER_WINDOW,
        "rate_limited": sum(r["rate_limited"] for r in rounds),
        **figures,
        "windows_s": list(WINDOWS_S),
        "latency_s": LATENCY_S,
        "concurrency_per_shard": CONCURRENCY,
        "requests_per_round": n,
        "simulator": "separate process",
        "sources": "a bucket of moto's S3 server on loopback",
        "scale": scale,
    }
