"""The scheduled reconciliation flow: recent runs' credits against the vendor's usage logs.

`serve` runs it on `[reconcile] cron` (in `schedule.timezone`) beside the ingest flow, over
the runs started in the last `reconcile.lookback_days`. A result that is not exact is logged
as a warning line; the `billing` table grows as with `ernie-batch reconcile`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger

from ernie_batch.config import JobConfig, api_key, load_config
from ernie_batch.errors import ScheduleError, first_error
from ernie_batch.money.reconcile import reconcile_runs
from ernie_batch.run.selection import RunSelection

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment


def summary_line(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in figures.items() if k != "exact")


@flow(name="ernie-reconcile", log_prints=False)
async def reconcile(config_path: str) -> dict[str, Any]:
    """Reconcile the runs of the last `reconcile.lookback_days`; returns the reconcile figures."""
    cfg = load_config(config_path)
    key = api_key(cfg)  # from the environment or a Secret block: never a parameter
    since = datetime.now(UTC) - timedelta(days=cfg.reconcile.lookback_days)
    result = await reconcile_runs(cfg, key, RunSelection(since=since.isoformat()))
    figures = result.figures.as_json()
    logger = get_run_logger()
    runs = f"{len(result.run_ids)} run(s) since {since:%Y-%m-%d %H:%M} UTC"
    if figures["exact"]:
        logger.info("reconcile: exact over %s: %s", runs, summary_line(figures))
    else:
        logger.warning("reconcile: NOT exact over %s: %s", runs, summary_line(figures))
    return figures


def build_reconcile_deployment(cfg: JobConfig, config_path: Path) -> RunnerDeployment:
    """The reconcile flow on `[reconcile] cron`; its one parameter is the config's path."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    where = cfg.config_path or "(defaults)"
    try:
        schedule = Cron(cfg.reconcile.cron or "", timezone=cfg.schedule.timezone)
        return reconcile.to_deployment(
            name=cfg.name, schedules=[schedule],
            parameters={"config_path": str(Path(config_path).resolve())},
            description=f"ernie-batch job {cfg.name!r}: credits against the vendor's usage logs",
            tags=["ernie-batch"], entrypoint_type=EntrypointType.MODULE_PATH)
    except ValueError as exc:  # a bad cron or timezone (pydantic's ValidationError included)

        raise ScheduleError(f"{where}: reconcile.cron: {first_error(exc)}") from None
