"""The coordinating flow: a run split into shard runs on a work pool (`run|backfill --pool`).

It runs in the calling process, never in the pool; its shard runs are its subflows in
Prefect's UI. The body is `ernie_batch.scale.coordinator`. Its flow run ends as its shards'
most severe outcome says: `Cancelled` after Ctrl-C, `Failed` on a fatal error, a budget stop
or a shard that failed for good, else `Completed`; the summary is the state's data.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from ernie_batch.config import load_config
from ernie_batch.scale.coordinator import STATUS_OBSERVER, Coordinator
from ernie_batch.scale.outcome import flow_state


@flow(name="ernie-coordinate", log_prints=False)
async def coordinate(config_path: str | None, overrides: dict[str, Any], kind: str, pool: str,
                     shards: int, sources: list[str] | None = None, force: bool = False,
                     retry_failed: bool = False, wait_lock_s: float = 0.0) -> Any:
    """Split the selection into `shards` shard runs on `pool`; its state carries the summary."""
    cfg = load_config(config_path, overrides)
    coordinator = Coordinator(
        cfg, kind=kind, pool=pool, shards=shards,
        sources=sources or None, force=force,
        retry_failed=retry_failed, wait_lock_s=wait_lock_s, on_status=STATUS_OBSERVER.get())
    return flow_state(await coordinator.run())


async def coordinated(**parameters: Any) -> dict[str, Any]:
    """Run the coordinating flow; its summary, whatever state it ended in."""
    state = await coordinate(**parameters, return_state=True)
    return await state.aresult(raise_on_failure=False)
