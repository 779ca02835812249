"""One shard run, as a worker runs it: the manifest's documents through an ordinary `Pipeline`.

The differences from a run of the CLI: its run id and its documents come from the
coordinator; it takes no folder run lock (the coordinator holds it for all its shards; each
shard holds the shared data lock and its own run-id lock, as every writer does); its budget
asks the coordinator for every request (`SharedBudget`); a fatal error or a budget stop here
raises the coordinator's stop flag, and the flag raised elsewhere stops this one.

A shard run that replaces an earlier attempt (its worker went silent) takes the earlier
one's work over when that one is dead: start-up recovery folds its journal (its run-id lock
is free), its rows count, its units are not sent again. An earlier attempt still alive (a
worker that lost its server but lives on) is *fenced*: its rows never count as done here,
its units are sent again, and the coordinator will not accept it; it gets no more grants,
so it cannot send another request either. The report says which was which.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pyarrow as pa

from ernie_batch.config import api_key, load_config
from ernie_batch.engine import Pipeline, RunOptions
from ernie_batch.errors import ConfigError
from ernie_batch.recovery import fold_dead_run
from ernie_batch.scale.channel import Channel, read_json
from ernie_batch.scale.plan import document_of
from ernie_batch.scale.shared_budget import SharedBudget
from ernie_batch.summary import RunSummary
from ernie_batch.vocab import RunKind, RunOutcome

STOPS_EVERY_SHARD = (RunOutcome.FATAL_API_ERROR, RunOutcome.BUDGET_STOPPED)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, and every path it names checked: one line naming the first missing one."""
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise ConfigError(f"shard manifest {path} cannot be read here: the worker must see the "
                          "output folder at the same path as the coordinator")
    overrides = manifest.get("overrides") or {}
    named = [manifest.get("config_path"), overrides.get("output.path"),
             overrides.get("prompt.template_file"), overrides.get("prompt.schema_file"),
             *(overrides.get("sources.paths") or [])]
    for path_text in named:
        if path_text and not Path(path_text).exists():
            raise ConfigError(f"{path_text} does not exist on this worker: the coordinator's "
                              "paths must be the same here (shared storage, same mount point)")
    return manifest


# how long an earlier attempt's run-id lock may stay held before it counts as alive: a sibling
# shard's start-up may be folding that dead attempt's journal (seconds, even for a big one)
FOLD_WAIT_S = 20.0


def take_over(root: Path, recovered: list[str], earlier: list[str], schema: pa.Schema,
              wait_s: float = FOLD_WAIT_S) -> tuple[list[str], list[str]]:
    """The earlier attempts this run takes over (dead: folded now, by its start-up, or by a
    sibling's) and those it fences (alive: their run-id lock still held after `wait_s`).

    Waiting matters: a sibling folding the dead attempt holds its lock, and taking that for
    a live owner would fence the attempt, send its answered pages again and pay them twice.
    """
    taken, fenced = [], []
    for run_id in earlier:
        dead = run_id in recovered or fold_dead_run(root, run_id, schema, wait_s) is not False
        (taken if dead else fenced).append(run_id)
    return taken, fenced


async def run_shard(manifest_path: Path, run_id: str,
                    earlier: list[str] | None = None) -> RunSummary:
    """Run the shard's documents under run id `run_id`, replacing the `earlier` attempts."""
    manifest = read_manifest(manifest_path)
    cfg = load_config(manifest.get("config_path"), manifest.get("overrides") or {})
    key = api_key(cfg)  # from this worker's environment or a Secret block, never the manifest
    channel = Channel(manifest_path.parent)
    shard = int(manifest["shard"])
    budget = SharedBudget(channel, shard, run_id, cfg.limits.concurrency)
    opts = RunOptions(kind=RunKind.SHARD, force=bool(manifest.get("force")),
                      retry_failed=bool(manifest.get("retry_failed")), run_id=run_id,
                      parent_run_id=manifest["coordinator_run_id"], shard=shard,
                      wait_lock_s=float(manifest.get("wait_lock_s") or 600))
    docs = [document_of(d) for d in manifest["documents"]]
    try:
        async with Pipeline(cfg, key, opts, budget=budget) as run:  # type: ignore[arg-type]
            taken, fenced = await asyncio.to_thread(take_over, run.root, run.recovered,
                                                    earlier or [], run.pages_schema)
            budget.report.extra = {"taken_over": taken, "fenced": fenced}
            run.done.ignored_runs.update(fenced)
            budget.on_stop_flag = lambda reason, error: run.stop.set(RunOutcome(reason), error)
            run.stop.listeners.append(
                lambda reason, error: budget.raise_stop_flag(reason, error)
                if reason in STOPS_EVERY_SHARD else None)
            run.progress.documents_total = len(docs)
            await run.process(docs)
            return await run.finish()
    finally:
        await budget.aclose()
