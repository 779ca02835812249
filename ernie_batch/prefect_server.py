"""Where a command's Prefect API is: a configured server, the home's server, or one for a block.

* Configured (PREFECT_API_URL in the environment or the active profile): used as it is.
* The home's server (`ernie_batch.server`): `run`, `backfill`, `demo` and `serve` use the one
  that runs, else start one that outlives them (background) or, failing that, their own
  (`home_server_api`). Their runs share the key's limit through it, as on a configured one.
* `server start` (a team's server, perhaps on PostgreSQL) and `bench scale`: a `prefect
  server start` for as long as a block runs (`start_local_server`).

Every server we start leads its own process group, so a terminal's Ctrl-C reaches the
command, not the server under its run (Prefect's ephemeral server shares the caller's group:
a Ctrl-C killed it while the run still needed it). Those for a command or a block are asked
by the kernel to stop when their parent dies, even by kill -9 (PR_SET_PDEATHSIG on Linux).

Prefect is imported inside the functions: its settings are read when it is imported.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ernie_batch.errors import ServerStartError
from ernie_batch.server.home import Kind, ServerState, prefect_home

if TYPE_CHECKING:
    from ernie_batch.config import ServerOptions

LOOPBACK = "127.0.0.1"
# A fresh PREFECT_HOME migrates its database first: ~20 s on a small machine, more under load.
HEALTH_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0


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
    """`prefect server start` (UI, scheduler, services), from this interpreter's environment
    (not whatever is on PATH)."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host,
            "--port", str(port), "--no-background"]


# Exec'd in front of the server: asks the kernel for SIGTERM when the parent dies (Linux),
# then becomes the server. (A preexec_fn would do the same, but is unsafe in a threaded parent.)
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)  # the parent died before we asked\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_parent(command: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


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


def drain_to_server(timeout_s: float = 10.0) -> None:
    """Send the logs and events this process still holds for the server, before it stops
    (else Prefect's workers try at exit, find no server, and print "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: nothing to send is fine too
            worker.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def start_local_server(host: str = LOOPBACK, port: int | None = None,
                       timeout_s: float = HEALTH_TIMEOUT_S,
                       extra_env: dict[str, str] | None = None) -> Iterator[LocalServer]:
    """Run a Prefect server while the block runs; always stop it after.

    The log goes to a private (0600) temporary file, kept (and named in the error) only
    when the server fails to come up. `extra_env` adds to the server's environment (a database
    URL goes there, never on a command line).
    """
    port = port or free_port(host)
    fd, name = tempfile.mkstemp(prefix="ernie-batch-prefect-server-", suffix=".log")
    log_path = Path(name)
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.update(extra_env or {})
    kwargs: dict[str, Any] = (
        {"start_new_session": True} if hasattr(os, "killpg")
        else {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    )
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(dying_with_parent(server_command(host, port)),
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=env, **kwargs)
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


PRIVATE_API_ENV = "ERNIE_BATCH_PRIVATE_PREFECT_API"  # the URL of a server of our own


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it (environment or the active profile)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def shared_server() -> bool:
    """Whether runs talk to a Prefect server the user configured (others' runs may use it
    too: they share the API's limit through it), not one this command started for itself."""
    url = configured_api_url()
    return url is not None and url != os.environ.get(PRIVATE_API_ENV)


@contextlib.contextmanager
def use_api(url: str, *, shared: bool = False) -> Iterator[None]:
    """Point this process and the run subprocesses it starts at `url`, a server we started:
    this command's alone, or (`shared`) the home's, which other commands use too (their runs
    then share the key's limit through it, as on a configured server).

    Prefect reads its settings when imported, so the environment alone is not enough here:
    `temporary_settings` changes the live settings; the environment variables are for any
    child process that does not inherit them.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = {name: os.environ.get(name) for name in ("PREFECT_API_URL", PRIVATE_API_ENV)}
    os.environ["PREFECT_API_URL"] = url
    if shared:
        os.environ.pop(PRIVATE_API_ENV, None)
    else:
        os.environ[PRIVATE_API_ENV] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def use_home(opts: ServerOptions) -> None:
    """`server.home`, when set, is PREFECT_HOME for this command and what it starts (before
    Prefect is imported: it reads its settings then)."""
    if opts.home is not None:
        os.environ["PREFECT_HOME"] = str(prefect_home(opts.home))


@contextlib.contextmanager
def home_server_api(opts: ServerOptions, *, own: bool = False, secrets: tuple[str, ...] = (),
                    say: Callable[[str], None] = lambda message: None,
                    note: Callable[[str], None] | None = None) -> Iterator[ServerState]:
    """This process pointed at its home's Prefect server (`ernie_batch.server`) while the block
    runs: the one running, else a new background one (`opts.background`), else one of the
    command's own (`own`, or when the background one cannot start: said). A server started
    here gets our environment less the variables in `secrets` (the API key's). `say` hears
    what is going on; `note` (default `say`) that a background server was started and stays.

    Flow runs started in the block carry this command's client tag; those of commands that
    died using the server are marked `Crashed` first.
    """
    from prefect import tags

    from ernie_batch.server.home import ServerHome
    from ernie_batch.server.local import ServerLease
    from ernie_batch.server.orphans import ClientLock, crash_orphans

    home = ServerHome(prefect_home(opts.home))
    kind: Kind = "background" if opts.background and not own else "attached"
    idle_s = opts.idle_shutdown_minutes * 60
    lease = ServerLease(home, kind=kind, port=opts.port, idle_s=idle_s, secrets=secrets, say=say)
    try:
        state = _ready(lease, say)
    except ServerStartError as exc:
        if kind == "attached":
            raise
        say(f"the background Prefect server did not start ({exc}): starting one for this "
            "command")
        lease = ServerLease(home, kind="attached", secrets=secrets, say=say)
        state = _ready(lease, say)
    if lease.started and lease.kind == "background":
        (note or say)(f"started a background Prefect server at {state.url} (its UI there); it "
                      f"stops after {opts.idle_shutdown_minutes:g} idle minutes, or with "
                      "`ernie-batch server stop`")
    try:
        with ClientLock(home) as client, use_api(state.api_url, shared=True), tags(client.tag):
            crashed = crash_orphans(home)
            if crashed:
                say(f"marked {crashed} flow run(s) of a killed command Crashed")
            try:
                yield state
            finally:
                drain_to_server()
    finally:
        lease.end()


def _ready(lease: Any, say: Callable[[str], None]) -> ServerState:
    try:
        lease.begin()
        if lease.started:
            say(f"starting {'a background' if lease.kind == 'background' else 'a'} Prefect server "
                f"in {lease.home.root} (about 20 s the first time) …")
        return lease.ready()
    except BaseException:
        lease.end()
        raise


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
