"""The scheduled ingestion flow: the config's sources, only new or changed content."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._run import run_flow


@flow(name="ernie-ingest", log_prints=False)
async def ingest(
    config_path: str | None = None,
    sources: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    retry_failed: bool = False,
    wait_lock_s: float = 0.0,
    batch_size: int = 200,
    kind: str = "ingest",
) -> dict[str, Any]:
    """Run the job in `config_path`; returns the run summary (outcome, counts, credits)."""
    return await run_flow(kind, config_path, sources, overrides, force, retry_failed,
                          wait_lock_s, batch_size)
