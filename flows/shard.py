"""The shard flow: one shard of a coordinator's run, as a worker of the pool runs it.

Its parameters name the manifest under the output folder and the attempt's run id; the
documents, the config and the overrides are in the manifest, the key in the worker's
environment (or a Secret block): nothing bulky or secret is a Prefect parameter. It ends
`Cancelled` when interrupted (its coordinator cancelled it), `Failed` on a fatal API error
or a budget stop, else `Completed`; its summary is the state's data, its `runs` row the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from ernie_batch.run.interrupt import GRACEFUL, Graceful
from ernie_batch.scale.outcome import flow_state
from ernie_batch.scale.shard import run_shard

GRACE_S = 10.0  # within the worker's own grace before it kills a cancelled run (30 s)


@flow(name="ernie-shard", log_prints=False)
async def shard(manifest: str, run_id: str, earlier: list[str] | None = None) -> Any:
    """Run the manifest's documents as run `run_id`, replacing the `earlier` attempts (their
    run ids). SIGTERM (a cancellation from the coordinator) stops it gracefully: no new
    request, requests in flight get a grace, what came is kept."""
    token = GRACEFUL.set(Graceful(GRACE_S))
    try:
        summary = await run_shard(Path(manifest), run_id, earlier, flow_run.get_id())
    finally:
        GRACEFUL.reset(token)
    return flow_state(summary)
