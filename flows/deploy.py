"""`ernie-batch serve`: the ingest flow as a Prefect deployment on the config's schedule.

Prefect's ephemeral server has no scheduler ("Cannot schedule flows on an ephemeral
server"), so when no PREFECT_API_URL is configured we run a real `prefect server start` on
loopback for exactly as long as we serve. It gets its own process group, so stopping it
stops whatever it started, and a Ctrl-C in the terminal reaches us, not it: we decide
when it stops. The runner started by `prefect.serve` executes each scheduled run as a
subprocess of this process, with this process's environment (that is where the API key
comes from: it is never a deployment parameter).

Prefect is imported inside the functions: its settings are read when it is imported, and
`ernie-batch --help` should not pay for it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ernie_batch.config import JobConfig, load_config
from ernie_batch.errors import ConfigError, ScheduleError, ServerStartError
from ernie_batch.vocab import ExitCode

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

LOOPBACK = "127.0.0.1"
# A fresh PREFECT_HOME migrates its database first: ~20 s on a small machine, more under load.
HEALTH_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0


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
        raise ScheduleError(f"{where}: schedule: {_first_error(exc)}") from None


def _first_error(exc: ValueError) -> str:
    """One line out of a ValueError or a pydantic ValidationError."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        return str(errors()[0]["msg"]).removeprefix("Value error, ")
    return str(exc).strip().splitlines()[0]


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
        raise ScheduleError(f"{where}: schedule: {_first_error(exc)}") from None


# --- a local Prefect server -----------------------------------------------------------------

@dataclass
class LocalServer:
    """A `prefect server start` subprocess, leader of its own process group."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after `grace_s`."""
        pgid = self.process.pid
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait politely
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait()
        # children outliving the leader (the group id stays reserved while any exist)
        if hasattr(os, "killpg"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, 0)
                os.killpg(pgid, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
    elif process.poll() is None and sig == signal.SIGTERM:
        process.terminate()
    elif process.poll() is None:
        process.kill()


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(host: str, port: int) -> list[str]:
    """`prefect server start` from this interpreter's environment, not whatever is on PATH."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host,
            "--port", str(port), "--no-background"]


def wait_healthy(server: LocalServer, timeout_s: float) -> None:
    """Poll GET /api/health until it answers true; fail early if the server exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise ServerStartError(f"the local Prefect server exited with code {code} before it "
                                   f"was ready; its log: {server.log_path}")
        try:
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=2) as resp:
                if resp.status == 200 and resp.read().strip() == b"true":
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServerStartError(f"the local Prefect server was not healthy after {timeout_s:.0f} s; "
                           f"its log: {server.log_path}")


@contextlib.contextmanager
def start_local_server(host: str = LOOPBACK, port: int | None = None,
                       timeout_s: float = HEALTH_TIMEOUT_S) -> Iterator[LocalServer]:
    """Run `prefect server start` on loopback while the block runs; always stop it after.

    The log goes to a private (0600) temporary file, kept (and named in the error) only
    when the server fails to come up.
    """
    port = port or free_port(host)
    fd, name = tempfile.mkstemp(prefix="ernie-batch-prefect-server-", suffix=".log")
    log_path = Path(name)
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    kwargs: dict[str, Any] = (
        {"start_new_session": True} if hasattr(os, "killpg")
        else {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    )
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(server_command(host, port), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs)
    server = LocalServer(process=process, host=host, port=port, log_path=log_path)
    keep_log = False
    try:
        try:
            wait_healthy(server, timeout_s)
        except ServerStartError:
            keep_log = True
            raise
        yield server
    finally:
        server.stop()
        if not keep_log:
            log_path.unlink(missing_ok=True)


# --- serving ----------------------------------------------------------------------------------

def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it (environment or the active profile)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@contextlib.contextmanager
def use_api(url: str) -> Iterator[None]:
    """Point this process and the run subprocesses it starts at `url`.

    Prefect reads its settings when imported, so the environment alone is not enough here:
    `temporary_settings` changes the live settings; the environment variable is for any
    child process that does not inherit them.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops us like Ctrl-C (until Prefect's runner installs its own graceful handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def maintenance_deployments(cfg: JobConfig, config_path: Path) -> list[RunnerDeployment]:
    """The deployments `serve` runs beside the ingest flow, each on its own schedule from the
    config (for example a reconciliation or a compaction cron); none by default."""
    from flows.compact import compact_deployment

    return [d for d in (compact_deployment(cfg, config_path),) if d is not None]


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
                _say("PREFECT_API_URL is unset: starting a local Prefect server (the ephemeral "
                     "one cannot schedule) …")
                with start_local_server() as server, use_api(server.api_url):
                    _say(f"Prefect server at {server.url} (log: {server.log_path}); serving "
                         f"{deployment.flow_name}/{deployment.name} ({when}); Ctrl-C stops")
                    serve_deployment(deployment, *others)
    except ServerStartError as exc:
        _say(f"error: {exc}")
        return ExitCode.SERVER
    except KeyboardInterrupt:
        pass
    _say("stopped")
    return ExitCode.OK
