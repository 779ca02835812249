"""The server process: `python -m ernie_batch.server.daemon HOME KIND PORT IDLE_S OWNER_PID`.

Prefect's whole server (API, UI, and its services: the scheduler `serve` needs among them)
under uvicorn, in this process, as `prefect server start` runs it, plus what makes it a
server of the home (`ernie_batch.server`):

* it holds the home's server lock for its life, or exits `LOCKED` at once (another server
  runs on this database);
* it binds its socket itself (port 0: the kernel's choice, no race with another process),
  and writes the state file once it answers;
* a background one stops after IDLE_S seconds with no request and no command holding the
  users lock (taken exclusive to stop, so no command can start using it meanwhile), or when
  its home is deleted; SIGTERM (`server stop`, or an attached server's command dying)
  stops either kind.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from ernie_batch.server.home import ServerHome, ServerState

LOCKED = 75  # another server holds this home's database (EX_TEMPFAIL)
NO_PORT = 76  # the configured port is taken
GRACEFUL_S = 5  # open connections get this long when the server stops

Scope = MutableMapping[str, Any]
Asgi = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                Awaitable[None]]


class Activity:
    """ASGI middleware noting when the last request or connection ended, and how many are open."""

    def __init__(self, app: Asgi) -> None:
        self.app = app
        self.open = 0
        self.last = time.monotonic()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.open else time.monotonic() - self.last


def bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    return sock


def announce(server: Any, state: ServerState, home: ServerHome) -> None:
    """Write the state file once uvicorn serves (migrations and services started)."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    state.write(home)


def watch_idle(server: Any, activity: Activity, state: ServerState, home: ServerHome) -> None:
    """Stop a background server once idle: no request for its idle time, no command using it."""
    from ernie_batch.store.lock import FileLock

    idle_s = float(state.idle_shutdown_s or 0)
    users = FileLock(home.lock_path("users"))  # exclusive: only when no command holds it
    every = max(0.5, min(30.0, idle_s / 10))
    while not server.should_exit:
        time.sleep(every)
        if not home.dir.exists():  # its home was deleted (a test's temporary folder)
            server.should_exit = True
            return
        if activity.idle_for() < idle_s or not users.try_acquire():
            continue
        if activity.idle_for() < idle_s:  # a request came while we took the lock
            users.release()
            continue
        state.remove(home)  # held until we exit: a command arriving now waits, then starts anew
        server.should_exit = True
        return


def main(argv: list[str]) -> int:
    from ernie_batch.store.lock import FileLock

    home = ServerHome(Path(argv[0]))
    kind, port, idle_s = argv[1], int(argv[2]), float(argv[3])
    owner = int(argv[4]) if len(argv) > 4 and argv[4] != "-" else None
    home.dir.mkdir(parents=True, exist_ok=True)
    if not FileLock(home.lock_path("server")).try_acquire():
        print(f"another Prefect server runs on the database in {home.root}", flush=True)
        return LOCKED
    try:
        sock = bind(port)
    except OSError as exc:
        print(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}", flush=True)
        return NO_PORT
    os.environ["PREFECT_HOME"] = str(home.root)
    os.environ.pop("PREFECT_API_URL", None)
    import uvicorn
    from prefect.server.api.server import create_app

    activity = Activity(create_app(final=True))
    server = uvicorn.Server(uvicorn.Config(
        activity, lifespan="on", log_level="error", timeout_graceful_shutdown=GRACEFUL_S))
    state = ServerState(pid=os.getpid(), url=f"http://127.0.0.1:{sock.getsockname()[1]}",
                        kind=kind,  # type: ignore[arg-type]
                        owner_pid=owner, started_at=time.time(),
                        idle_shutdown_s=idle_s if kind == "background" else None)
    threading.Thread(target=announce, args=(server, state, home), daemon=True).start()
    if kind == "background":
        threading.Thread(target=watch_idle, args=(server, activity, state, home),
                         daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        state.remove(home)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
