"""Benchmark `overhead`: what the pipeline costs beside a bare HTTP loop.

Both sides send the same prepared requests to the same zero-latency, unlimited simulator
(in its own process) at the same concurrency:
- bare: asyncio, one `httpx.AsyncClient`, a semaphore, the bodies built beforehand with
  `answers.prompt.build_body`; each answer read as JSON, nothing recorded;
- pipeline: `run.engine.Pipeline` end to end on the same units (done-index, queue, request
  budget, body building, client, answer validation, journal, Delta commits, manifest).
Preparation is excluded from both: the units are prepared once beforehand and handed to the
pipeline by a stand-in for its `PreparePool`. Each side runs three times, alternately
(which goes first swaps each round; the ledger is emptied before each run); the best of
each counts. Headline: pipeline pages/s / bare pages/s (goal 0.8).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from ernie_batch.bench._http import KEY, SimProcess, job_config, prepared_requests, warm_up, workdir

PAGES = 1000
CONCURRENCY = 16  # limits.concurrency's default
ROUNDS = 3


class ReadyUnits:
    """Stands in for `PreparePool`: hands out units prepared beforehand (preparation excluded)."""

    def __init__(self, units: dict[Path, list[Any]]) -> None:
        self.units = units

    async def stream(self, docs: Iterable[Any]) -> AsyncIterator[tuple[Any, list[Any]]]:
        for doc in docs:
            yield doc, self.units[doc.path]

    async def aclose(self) -> None:
        return None


async def bare_loop(url: str, bodies: list[dict[str, Any]]) -> float:
    """Seconds to send every body and read every answer, `CONCURRENCY` at a time."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:

        async def one(body: dict[str, Any]) -> None:
            async with gate:
                response = await client.post("/chat/completions", json=body)
                response.raise_for_status()
                response.json()

        t = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t


async def pipeline(cfg: Any, docs: list[Any],
                   units: dict[Path, list[Any]]) -> tuple[float, Any, float]:
    """(seconds, summary, seconds committing rows to the tables) of one pipeline run over
    prepared units, set-up to manifest."""
    from ernie_batch.run.engine import Pipeline

    t = time.perf_counter()
    async with Pipeline(cfg, SecretStr(KEY), pool=ReadyUnits(units)) as run:
        await run.process(docs)
        summary = await run.finish()
    return time.perf_counter() - t, summary, run.recorder.commit_s


def run(scale: float = 1.0) -> dict[str, Any]:
    """1,000 pages (x scale) each way, best of three; see the module docstring."""
    n = max(2, round(PAGES * scale))
    with workdir("overhead") as tmp, SimProcess() as sim:
        warm_up(sim, tmp)
        base = job_config(sim.url, tmp / "in", tmp / "out-0", concurrency=CONCURRENCY, rpm=0)
        docs, units, bodies = prepared_requests(base, tmp / "in", n)
        bare_s: list[float] = []
        pipe_s: list[float] = []
        bare_cpu: list[float] = []
        pipe_cpu: list[float] = []
        commit_s: list[float] = []
        summary, requests = None, 0
        for i in range(ROUNDS):
            for side in ("bare", "pipeline") if i % 2 == 0 else ("pipeline", "bare"):
                sim.reset()  # an empty ledger each time: a growing one slows the server's GC
                cpu = time.process_time()
                if side == "bare":
                    bare_s.append(asyncio.run(bare_loop(sim.url, bodies)))
                    bare_cpu.append(time.process_time() - cpu)
                else:
                    cfg = base.model_copy(deep=True)
                    cfg.output.path = tmp / f"out-{i}"
                    seconds, summary, committing = asyncio.run(pipeline(cfg, docs, units))
                    pipe_cpu.append(time.process_time() - cpu)
                    pipe_s.append(seconds)
                    commit_s.append(committing)
                requests += sim.ledger()["stats"].get("requests", 0)
    bare_rate, pipe_rate = len(bodies) / min(bare_s), summary.units_ok / min(pipe_s)
    return {
        "scenario": "overhead",
        "ratio": round(pipe_rate / bare_rate, 3),
        "goal": 0.8,
        "pipeline_pages_per_s": round(pipe_rate, 1),
        "bare_pages_per_s": round(bare_rate, 1),
        # this process's CPU per page (the simulator's is apart): steadier than pages/s
        # when other work shares the machine
        "pipeline_cpu_ms_per_page": round(1000 * min(pipe_cpu) / len(bodies), 2),
        "bare_cpu_ms_per_page": round(1000 * min(bare_cpu) / len(bodies), 2),
        # the Delta commits of attempts, pages and the manifest (periodic, not per page)
        "commit_ms_per_page": round(1000 * min(commit_s) / len(bodies), 3),
        "pages": len(bodies),
        "pages_ok": summary.units_ok,
        "requests": requests,
        "concurrency": CONCURRENCY,
        "rounds": ROUNDS,
        "preparation": "excluded from both",
        "latency_s": 0.0,
        "simulator": "separate process",
        "scale": scale,
    }


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)))
