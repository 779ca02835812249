"""The compaction flow, and its deployment for `serve` when the config has a `[compact] cron`."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow

from ernie_batch.answers.judge import answer_fields
from ernie_batch.config import JobConfig, load_config
from ernie_batch.errors import ScheduleError, first_error
from ernie_batch.run.compact import COMPACTED_TABLES, compact_output
from ernie_batch.store import pages_schema

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment


@flow(name="ernie-compact", log_prints=False)
def compact(config_path: str | None = None, tables: list[str] | None = None,
            before: str | None = None, wait_lock_s: float = 600.0) -> dict[str, Any]:
    """Compact the output folder of the job in `config_path` (waits for a compaction in progress)."""
    cfg = load_config(config_path)
    summary = compact_output(
        Path(cfg.output.path), tables or list(COMPACTED_TABLES),
        pages_schema(answer_fields(cfg.resolved.schema)),
        before=date.fromisoformat(before) if before else None, wait_s=wait_lock_s,
        options=cfg.compact)
    return summary.as_json()


def compact_deployment(cfg: JobConfig, config_path: Path) -> RunnerDeployment | None:
    """The compaction flow on `[compact] cron` (in `[schedule] timezone`); None without a cron."""
    if not cfg.compact.cron:
        return None
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    where = cfg.config_path or "(defaults)"
    try:
        return compact.to_deployment(
            name=cfg.name, schedules=[Cron(cfg.compact.cron, timezone=cfg.schedule.timezone)],
            parameters={"config_path": str(Path(config_path).resolve())},
            description=f"ernie-batch job {cfg.name!r}: compact and vacuum the output's tables",
            tags=["ernie-batch"], entrypoint_type=EntrypointType.MODULE_PATH)
    except ValueError as exc:  # a bad cron or timezone
        raise ScheduleError(f"{where}: compact: {first_error(exc)}") from None
