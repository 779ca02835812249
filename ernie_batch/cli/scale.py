"""`deploy`, `server start` and `server stop`: a Prefect server, a work pool, the shard flow."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import urlsplit

import typer

from ernie_batch.cli.common import ConfigOpt, app, check_before_start, console, fail, out
from ernie_batch.vocab import ExitCode

server_app = typer.Typer(help="A Prefect server for runs on several machines; stopping the "
                              "background one.", no_args_is_help=True)
app.add_typer(server_app, name="server")

PoolArg = Annotated[str, typer.Option("--pool", help="The process work pool (made if missing).")]


@app.command()
def deploy(config: ConfigOpt = None, pool: PoolArg = "ernie-batch") -> None:
    """Create the work pool (if missing) and the shard flow's deployment on PREFECT_API_URL."""
    from ernie_batch.cli.common import prefect_defaults

    check_before_start(config, {}, need_key=False)
    prefect_defaults()
    from ernie_batch.prefect_server import configured_api_url
    from ernie_batch.scale.pool import deploy_pool, worker_command

    api = configured_api_url()
    if not api:
        raise fail("deploy needs a Prefect server: set PREFECT_API_URL (`ernie-batch server "
                   "start` prints it)", ExitCode.USAGE)
    done = deploy_pool(pool)
    made = "created" if done.pool_created else "found"
    out.print(f"work pool {pool!r} {made}; deployment {done.deployment} on {api}", highlight=False)
    out.print(f"start workers where the package, the key and the same paths are (one shard "
              f"run at a time each):\n  {worker_command(pool)}\n"
              f"then: ernie-batch run -c FILE --pool {pool} --shards N", highlight=False)


def _has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return True  # unparseable: assume the worst


@server_app.command("start")
def server_start(
    host: Annotated[str, typer.Option(help="Address to listen on (not loopback: needs "
                                           "PREFECT_SERVER_API_AUTH_STRING).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 4200,
    database_url: Annotated[str | None, typer.Option(
        help="PostgreSQL, e.g. postgresql+asyncpg://user@host/db; default "
             "$PREFECT_API_DATABASE_CONNECTION_URL, else SQLite in PREFECT_HOME. A password "
             "goes in that variable, never on the command line.")] = None,
) -> None:
    """Run `prefect server start` (on PostgreSQL when a database URL is given) until Ctrl-C."""
    from ernie_batch.api.client import is_loopback
    from ernie_batch.cli.common import prefect_defaults

    if database_url and _has_password(database_url):
        raise fail("--database-url: a URL with a password shows in `ps`; put it in "
                   "PREFECT_API_DATABASE_CONNECTION_URL instead", ExitCode.USAGE)
    if not is_loopback(host) and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise fail(f"--host {host}: an open Prefect API hands out its Secret blocks (the API "
                   "key among them); set PREFECT_SERVER_API_AUTH_STRING first", ExitCode.USAGE)
    prefect_defaults()
    from ernie_batch.errors import ServerStartError
    from ernie_batch.prefect_server import sigterm_as_interrupt, start_local_server

    url = database_url or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    extra = {"PREFECT_API_DATABASE_CONNECTION_URL": url} if url else {}
    shown = host if host not in ("0.0.0.0", "::") else socket.gethostname()
    console.print(f"starting the Prefect server on {host}:{port} "
                  f"({'PostgreSQL' if url else 'SQLite in PREFECT_HOME'}) …", highlight=False)
    try:
        with sigterm_as_interrupt(), home_database(None if url else port), \
                start_local_server(host, port, extra_env=extra) as server:
            if not url:
                announce_home_server(server.process.pid, server.url.replace("0.0.0.0", "127.0.0.1"))
            out.print(f"Prefect UI: http://{shown}:{port}\n"
                      f"export PREFECT_API_URL=http://{shown}:{port}/api", highlight=False)
            if os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
                out.print("clients: export PREFECT_API_AUTH_STRING (the same value as "
                          "PREFECT_SERVER_API_AUTH_STRING)", highlight=False)
            while True:
                signal.pause()
    except ServerStartError as exc:
        raise fail(str(exc), ExitCode.SERVER) from None
    except KeyboardInterrupt:
        console.print("stopped")


@contextlib.contextmanager
def home_database(port: int | None) -> Iterator[None]:
    """On PREFECT_HOME's SQLite (`port` given): hold the home's server lock while we serve, so
    the commands' background server never runs beside us on that database (they use ours:
    `announce_home_server`); exit 2 when a server runs there already."""
    if port is None:
        yield
        return
    from ernie_batch.server.home import ServerHome, ServerState, prefect_home
    from ernie_batch.store.lock import FileLock

    home = ServerHome(prefect_home())
    lock = FileLock(home.lock_path("server"))
    if not lock.try_acquire():
        state = ServerState.read(home)
        where = f" at {state.url} (`ernie-batch server stop` stops it)" if state else ""
        raise fail(f"a Prefect server already runs on the database in {home.root}{where}",
                   ExitCode.USAGE)
    try:
        yield
    finally:
        state = ServerState.read(home)
        if state is not None and state.owner_pid == os.getpid():
            state.remove(home)
        lock.release()


def announce_home_server(pid: int, url: str) -> None:
    """Name our server in the home's state file: commands without PREFECT_API_URL use it."""
    import time

    from ernie_batch.server.home import ServerHome, ServerState, prefect_home

    ServerState(pid=pid, url=url, kind="attached", owner_pid=os.getpid(),
                started_at=time.time(), idle_shutdown_s=None).write(ServerHome(prefect_home()))


@server_app.command("stop")
def server_stop(
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option(
        help="Stop it even while a command uses it (its runs lose their Prefect server).")] = False,
) -> None:
    """Stop the background Prefect server `run`, `backfill` and `demo` keep between commands
    (that of PREFECT_HOME, or of the config's server.home). Exit 5 while a command uses it."""
    from ernie_batch.cli.common import load
    from ernie_batch.server.home import ServerHome, prefect_home
    from ernie_batch.server.local import ServerInUse, stop

    cfg = load(config, {}) if config else None
    home = ServerHome(prefect_home(cfg.server.home if cfg else None))
    try:
        out.print(stop(home, force=force), highlight=False, soft_wrap=True)
    except ServerInUse as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
