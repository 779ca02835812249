"""`deploy` and `server start`: a Prefect server, a work pool, the shard flow (several machines)."""

from __future__ import annotations

import os
import signal
import socket
from typing import Annotated
from urllib.parse import urlsplit

import typer

from ernie_batch.cli.common import ConfigOpt, app, check_before_start, console, fail, out
from ernie_batch.vocab import ExitCode

server_app = typer.Typer(help="A Prefect server for runs on several machines.",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")

PoolArg = Annotated[str, typer.Option("--pool", help="The process work pool (made if missing).")]


@app.command()
def deploy(config: ConfigOpt = None, pool: PoolArg = "ernie-batch") -> None:
    """Create the work pool (if missing) and the shard flow's deployment on PREFECT_API_URL."""
    from ernie_batch.cli.common import prefect_defaults

    check_before_start(config, {}, need_key=False)
    prefect_defaults()
    from ernie_batch.prefect_server import configured_api_url
    from ernie_batch.scale.pool import deploy_pool

    api = configured_api_url()
    if not api:
        raise fail("deploy needs a Prefect server: set PREFECT_API_URL (`ernie-batch server "
                   "start` prints it)", ExitCode.USAGE)
    done = deploy_pool(pool)
    made = "created" if done.pool_created else "found"
    out.print(f"work pool {pool!r} {made}; deployment {done.deployment} on {api}", highlight=False)
    out.print(f"start workers where the package, the key and the same paths are:\n"
              f"  prefect worker start --pool {pool}\n"
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
    from ernie_batch.cli.common import prefect_defaults
    from ernie_batch.client import is_loopback

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
        with sigterm_as_interrupt(), start_local_server(host, port, extra_env=extra):
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
