"""The shard flow: one shard of a coordinator's run, as a worker of the pool runs it.

Its parameters say where the manifest is (the output, a folder or a bucket; its storage
options, references and no secret; the manifest's key below it) and the attempt's run id;
the documents, the config, its template and schema are in the manifest, the key in the
worker's environment (or a Secret block): nothing bulky or secret is a Prefect parameter,
and no path on the coordinator's machine. It ends
`Cancelled` when interrupted (its coordinator cancelled it), `Failed` on a fatal API error
or a budget stop, else `Completed`; its summary is the state's data, its `runs` row the record.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from ernie_batch.run.interrupt import GRACEFUL, Graceful
from ernie_batch.scale.outcome import flow_state
from ernie_batch.scale.shard import output_root, run_shard

GRACE_S = 10.0  # within the worker's own grace before it kills a cancelled run (30 s)


@flow(name="ernie-shard", log_prints=False)
async def shard(output: str, manifest: str, run_id: str, earlier: list[str] | None = None,
                storage_options: dict[str, Any] | None = None) -> Any:
    """Run the documents of the manifest `manifest` below `output` as run `run_id`, replacing
    the `earlier` attempts (their run ids). SIGTERM (a cancellation from the coordinator)
    stops it gracefully: no new request, requests in flight get a grace, what came is kept."""
    token = GRACEFUL.set(Graceful(GRACE_S))
    try:
        summary = await run_shard(output_root(output, storage_options), manifest, run_id,
                                  earlier, flow_run.get_id())
    finally:
        GRACEFUL.reset(token)
    return flow_state(summary)
