"""Benchmark `scale`: one API limit shared by 1, 2 and 3 workers of a Prefect work pool.

A Prefect server (SQLite, in a private home), `ernie-batch deploy`, then for each worker
count a run of the CLI with `--pool --shards <workers>`, every worker limited to one flow
run at a time, against the simulator (its own process) limited to `PER_WINDOW` requests per
`WINDOW_S`: the rate the simulator saw while requests flowed (first to last answer) over the
limit, its busiest window and its 429s. The headline ratio is the worst of the three.
Time is compressed as in `rate` (a 4 s window for the minute).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ernie_batch.bench._http import (
    KEY,
    SimProcess,
    arrival_rate,
    busiest_window,
    count_429,
    make_images,
    workdir,
)

WINDOW_S = 4.0
PER_WINDOW = 200
LATENCY_S = 0.4
CONCURRENCY = 40  # per shard: 2 x rate x latency, so one shard alone can use the whole limit
REQUESTS = 1200
POOL = "ernie-bench"


def _config(path: Path, sim_url: str, sources: Path, output: Path) -> Path:
    q = json.dumps
    path.write_text(f"""name = "bench-scale"
[sources]
paths = [{q(str(sources))}]
[api]
base_url = {q(sim_url)}
timeout_s = 60
[limits]
concurrency = {CONCURRENCY}
rpm = {PER_WINDOW * 60 / WINDOW_S}
window_s = {WINDOW_S}
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


def _round(workers: int, n: int, tmp: Path, sim: SimProcess, env: dict[str, str],
           first: int) -> dict[str, Any]:
    """One run with `workers` workers and as many shards; the simulator's figures."""
    sources = make_images(tmp / f"in-{workers}", n, first=first)
    config = _config(tmp / f"job-{workers}.toml", sim.url, sources, tmp / "out")
    procs = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                               POOL, "--limit", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
             for _ in range(workers)]
    try:
        time.sleep(WINDOW_S * 1.05)  # a quiet window, then an empty ledger
        sim.reset()
        done = _cli("run", "-c", str(config), "--pool", POOL, "--shards", str(workers),
                    "--json", env=env)
        book = sim.ledger()
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait()
    if done.returncode != 0:
        raise RuntimeError(f"the run with {workers} worker(s) failed: {done.stderr[-2000:]}")
    entries = book["entries"]
    return {"ratio": round(arrival_rate(entries, WINDOW_S) / PER_WINDOW, 3),
            "busiest_window": busiest_window(entries, WINDOW_S),
            "rate_limited": count_429(book["stats"]), "requests": len(entries)}


def run(scale: float = 1.0) -> dict[str, Any]:
    from ernie_batch.prefect_server import start_local_server, use_api
    from ernie_batch.scale.pool import deploy_pool

    n = max(10, round(REQUESTS * scale))
    figures: dict[str, Any] = {}
    with workdir("scale") as tmp, SimProcess(rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S,
                                             latency_s=LATENCY_S) as sim:
        os.environ["PREFECT_HOME"] = str(tmp / "home")  # the server's database, ours alone
        with start_local_server() as server, use_api(server.api_url):
            deploy_pool(POOL)
            env = _env(tmp / "home", PREFECT_API_URL=server.api_url)
            for i, workers in enumerate((1, 2, 3)):
                figures[f"workers_{workers}"] = _round(workers, n, tmp, sim, env, first=i * n)
    rounds = list(figures.values())
    return {
        "scenario": "scale",
        "ratio": min(r["ratio"] for r in rounds),
        "goal": 0.90,
        "busiest_window": max(r["busiest_window"] for r in rounds),
        "limit_per_window": PER_WINDOW,
        "rate_limited": sum(r["rate_limited"] for r in rounds),
        **figures,
        "window_s": WINDOW_S,
        "latency_s": LATENCY_S,
        "concurrency_per_shard": CONCURRENCY,
        "requests_per_round": n,
        "simulator": "separate process",
        "scale": scale,
    }
