"""The shard flow: one shard of a coordinator's run, as a worker of the pool runs it.

Its parameters name the manifest under the output folder and the attempt's run id; the
documents, the config and the overrides are in the manifest, the key in the worker's
environment (or a Secret block): nothing bulky or secret is a Prefect parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from ernie_batch.interrupt import GRACEFUL, Graceful
from ernie_batch.scale.shard import run_shard

GRACE_S = 10.0  # within the worker's own grace before it kills a cancelled run (30 s)


@flow(name="ernie-shard", log_prints=False)
async def shard(manifest: str, run_id: str, earlier: list[str] | None = None) -> dict[str, Any]:
    """Run the manifest's documents as run `run_id`, replacing the `earlier` attempts (their
    run ids); returns the shard's summary. SIGTERM (a cancellation from the coordinator)
    stops it gracefully: no new request, requests in flight get a grace, what came is kept."""
    token = GRACEFUL.set(Graceful(GRACE_S))
    try:
        summary = await run_shard(Path(manifest), run_id, earlier)
    finally:
        GRACEFUL.reset(token)
    return summary.model_dump(mode="json")
