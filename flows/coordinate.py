"""The coordinating flow: a run split into shard runs on a work pool (`run|backfill --pool`).

It runs in the calling process, never in the pool; its shard runs are its subflows in
Prefect's UI. The body is `ernie_batch.scale.coordinator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from ernie_batch.config import load_config
from ernie_batch.scale.coordinator import STATUS_OBSERVER, Coordinator


@flow(name="ernie-coordinate", log_prints=False)
async def coordinate(config_path: str | None, overrides: dict[str, Any], kind: str, pool: str,
                     shards: int, sources: list[str] | None = None, force: bool = False,
                     retry_failed: bool = False, wait_lock_s: float = 0.0) -> dict[str, Any]:
    """Split the selection into `shards` shard runs on `pool`; returns the summary over them."""
    cfg = load_config(config_path, overrides)
    coordinator = Coordinator(
        cfg, overrides=overrides, kind=kind, pool=pool, shards=shards,
        sources=[Path(s) for s in sources] if sources else None, force=force,
        retry_failed=retry_failed, wait_lock_s=wait_lock_s, on_status=STATUS_OBSERVER.get())
    summary = await coordinator.run()
    return summary.model_dump(mode="json")
