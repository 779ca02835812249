"""The backfill flow: a folder or a date range, again, perhaps with a new prompt version.

It writes to the same dataset as the scheduled runs: unit keys make that safe (pages
already answered with the same fingerprint are skipped unless `force`), and the output
lock makes two runs on one folder take turns.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from flows._run import run_flow


@flow(name="ernie-backfill", log_prints=False)
async def backfill(
    config_path: str | None = None,
    folders: list[str] | None = None,
    since: str | None = None,
    until: str | None = None,
    date_from: Literal["mtime", "path"] | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    retry_failed: bool = False,
    wait_lock_s: float = 0.0,
    batch_size: int = 200,
) -> dict[str, Any]:
    """Re-run `folders` (default: the config's sources), only files dated in [since, until)."""
    merged = dict(overrides or {})
    merged.update({k: v for k, v in (("sources.since", since), ("sources.until", until),
                                     ("sources.date_from", date_from)) if v is not None})
    return await run_flow("backfill", config_path, folders, merged, force, retry_failed,
                          wait_lock_s, batch_size)
