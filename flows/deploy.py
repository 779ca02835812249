"""`ernie-batch serve`: the ingest flow as a Prefect deployment on the config's schedule.

Prefect's ephemeral server has no scheduler ("Cannot schedule flows on an ephemeral
server"), so when no PREFECT_API_URL is configured we use the home's server
(`ernie_batch.server`: API, UI and services): the background one when it runs, else one of
our own for exactly as long as we serve, registered as the home's, so commands in other
terminals use it rather than start a second server on the same database. It gets its own
process group, so a Ctrl-C in the terminal reaches us, not it: we decide when it stops
(once no other command uses it). The runner started by `prefect.serve` executes each scheduled run as a
subprocess of this process, with this process's environment (that is where the API key
comes from: it is never a deployment parameter).

Prefect is imported inside the functions: its settings are read when it is imported, and
`ernie-batch --help` should not pay for it.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ernie_batch.config import JobConfig, load_config
from ernie_batch.errors import ConfigError, ScheduleError, ServerStartError, first_error
from ernie_batch.prefect_server import (
    configured_api_url,
    home_server_api,
    sigterm_as_interrupt,
    use_home,
)
from ernie_batch.vocab import ExitCode

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule



# --- the deployment -----------------------------------------------------------------------

def build_schedule(cfg: JobConfig) -> Schedule:
    """The one schedule of the job: its cron (in its timezone) or its interval."""
    from prefect.schedules import Cron, Interval

    s = cfg.schedule
    where = cfg.config_path or "(defaults)"
    if s.cron and s.interval_minutes:
        raise ScheduleError(f"{where}: schedule: give either cron or interval_minutes, not both")
    if not s.cron and not s.interval_minutes:
        raise ScheduleError(f"{where}: schedule: nothing to serve: set schedule.cron "
                            "(e.g. \"0 * * * *\") or schedule.interval_minutes")
    try:
        if s.cron:
            return Cron(s.cron, timezone=s.timezone)
        return Interval(datetime.timedelta(minutes=s.interval_minutes or 0), timezone=s.timezone)
    except ValueError as exc:  # pydantic's ValidationError included: bad cron or timezone
        raise ScheduleError(f"{where}: schedule: {first_error(exc)}") from None


def build_deployment(cfg: JobConfig, config_path: Path) -> RunnerDeployment:
    """A deployment of `flows.ingest.ingest` named after the job, run on its schedule.

    The only parameter is the absolute config path: every run re-reads the file (so edits
    apply to the next run) and takes the key from its environment or the Secret block at
    run time, so no secret is ever stored in the deployment. The entrypoint is a module
    path, so runs work whatever the current directory is.
    """
    from prefect.deployments.runner import EntrypointType

    from flows.ingest import ingest

    schedule = build_schedule(cfg)
    try:
        return ingest.to_deployment(
            name=cfg.name,
            schedules=[schedule],
            parameters={"config_path": str(Path(config_path).resolve())},
            description=f"ernie-batch job {cfg.name!r}: new or changed files in its sources",
            tags=["ernie-batch"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    except ValueError as exc:  # the timezone is checked here, not by Cron()/Interval()
        where = cfg.config_path or "(defaults)"
        raise ScheduleError(f"{where}: schedule: {first_error(exc)}") from None


def maintenance_deployments(cfg: JobConfig, config_path: Path) -> list[RunnerDeployment]:
    """The deployments `serve` runs beside the ingest flow, each on its own schedule from the
    config (for example a reconciliation or a compaction cron); none by default."""
    from flows.compact import compact_deployment

    found: list[RunnerDeployment] = []
    if cfg.reconcile.cron:
        from flows.reconcile import build_reconcile_deployment

        found.append(build_reconcile_deployment(cfg, config_path))
    compacting = compact_deployment(cfg, config_path)
    if compacting is not None:
        found.append(compacting)
    return found


def serve_deployment(*deployments: RunnerDeployment) -> None:
    """Register the deployments and run their scheduled runs until stopped, one at a time.

    One run at a time: a run locks the output folder anyway, so a run due while the last
    one is still working waits for it instead of failing on the lock.
    """
    from prefect import serve

    serve(*deployments, limit=1)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve_schedule(config_path: Path) -> int:
    """Serve the ingest flow on the config's schedule until Ctrl-C or SIGTERM.

    Returns 0 after a clean stop, 2 when the config cannot be served (one line on stderr),
    7 when the local Prefect server does not come up.
    """
    try:
        cfg = load_config(config_path)
        use_home(cfg.server)  # before Prefect is imported
        deployment = build_deployment(cfg, config_path)
        others = maintenance_deployments(cfg, config_path)
    except (ConfigError, ScheduleError) as exc:
        _say(f"error: {exc}")
        return ExitCode.USAGE
    when = (f"cron {cfg.schedule.cron!r} ({cfg.schedule.timezone})" if cfg.schedule.cron
            else f"every {cfg.schedule.interval_minutes:g} min")
    try:
        with sigterm_as_interrupt():
            api = configured_api_url()
            if api:
                _say(f"serving {deployment.flow_name}/{deployment.name} ({when}) with the Prefect "
                     f"server at {api}; Ctrl-C stops")
                serve_deployment(deployment, *others)
            else:
                with home_server_api(cfg.server, own=True, secrets=(cfg.api.api_key_env,),
                                     say=_say) as server:
                    whose = "the background" if server.kind == "background" else "its own"
                    _say(f"Prefect server at {server.url} ({whose}; UI there); serving "
                         f"{deployment.flow_name}/{deployment.name} ({when}); Ctrl-C stops")
                    serve_deployment(deployment, *others)
    except ServerStartError as exc:
        _say(f"error: {exc}")
        return ExitCode.SERVER
    except KeyboardInterrupt:
        pass
    _say("stopped")
    return ExitCode.OK
