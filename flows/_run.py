"""The body both flows share: one Pipeline, documents in batches, each batch a Prefect task.

Tasks take a run id and a batch number, never the key or the documents themselves: the
Pipeline lives in this process's registry, so nothing secret or bulky becomes a task input.
Two batch tasks overlap so the dispatcher never drains between batches.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import deployment

from ernie_batch.config import api_key, load_config
from ernie_batch.money.report import finished_line, summary_markdown, summary_table
from ernie_batch.run.engine import Pipeline, RunOptions, batches
from ernie_batch.run.summary import RunSummary
from ernie_batch.scale.limit_share import run_membership

_RUNS: dict[str, tuple[Pipeline, list[list[Any]]]] = {}


@task(name="discover", cache_policy=NONE)
async def discover_documents(run_id: str, sources: list[str] | None, batch_size: int) -> int:
    run, _ = _RUNS[run_id]
    # sources stay strings: a URL (s3://bucket/inbox) must not pass through pathlib
    docs = await asyncio.to_thread(run.discover, sources or None)
    _RUNS[run_id] = (run, batches(docs, batch_size))
    return len(docs)


@task(name="process-batch", cache_policy=NONE)
async def process_batch(run_id: str, batch_no: int) -> dict[str, int]:
    run, groups = _RUNS[run_id]
    await run.process(groups[batch_no])
    p = run.progress
    return {"units_done": p.units_done, "ok": p.units.ok, "failed": p.units.failed,
            "requests": p.requests}


async def run_flow(kind: str, config_path: str | None, sources: list[str] | None,
                   overrides: dict[str, Any] | None, force: bool, retry_failed: bool,
                   wait_lock_s: float, batch_size: int) -> dict[str, Any]:
    cfg = load_config(config_path, overrides)
    key = api_key(cfg)  # from the environment or a Secret block: never a parameter
    opts = RunOptions(kind=kind, force=force, retry_failed=retry_failed, wait_lock_s=wait_lock_s)
    async with Pipeline(cfg, key, opts) as run, \
            run_membership(cfg, key, run.run_id, run.budget):  # one limit for every run
        _RUNS[run.run_id] = (run, [])
        try:
            await discover_documents(run.run_id, sources, batch_size)
            pending: set[asyncio.Task[dict[str, int]]] = set()
            for batch_no in range(len(_RUNS[run.run_id][1])):
                if run.stop_reason:
                    break
                if len(pending) >= 2:
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                pending.add(asyncio.ensure_future(process_batch(run.run_id, batch_no)))
            if pending:
                await asyncio.gather(*pending)
            summary: RunSummary = await run.finish()
        finally:
            _RUNS.pop(run.run_id, None)
    if cfg.review.html:  # after the manifest: the review reads what the run wrote
        from ernie_batch.review import review_of_run

        summary = await asyncio.to_thread(review_of_run, cfg, summary)
    await _artifacts(summary)
    if deployment.get_id():  # a scheduled run: `serve` shows one line per run
        print(finished_line(summary), flush=True)
    return summary.model_dump(mode="json")


async def _artifacts(summary: RunSummary) -> None:
    key = f"ernie-batch-{summary.kind}"
    await create_table_artifact(key=key + "-table", table=summary_table(summary),
                                description=f"run {summary.run_id}")
    await create_markdown_artifact(key=key + "-report", markdown=summary_markdown(summary),
                                   description=f"run {summary.run_id}")
