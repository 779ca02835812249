"""A command's side of the home's server: find it, or start it, use it, and `server stop`.

`ServerLease.begin()` takes the users lock (shared) and finds the server the state file
names (health in < 100 ms, more patience before calling a live one deaf); when none
answers it launches one and returns at once, so the command can import Prefect and find
its documents while the server comes up; `ready()` waits for it. A state file naming a
dead process is stale and ignored; a live server of ours that does not answer is stopped
and replaced. `end()` lets go; an attached server (the command's own) is stopped then,
once no other command uses it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ernie_batch.errors import ServerStartError
from ernie_batch.server.home import (
    DAEMON_MODULE,
    HEALTH_PATIENT_S,
    HEALTH_QUICK_S,
    Kind,
    ServerHome,
    ServerState,
    alive,
    healthy,
    is_our_daemon,
    wait_gone,
)
from ernie_batch.store.lock import FileLock

READY_TIMEOUT_S = 180.0  # a fresh home migrates its database first: ~20 s, more under load
USERS_WAIT_S = 60.0  # a background server stopping for idleness holds the users lock this long at most
STOP_GRACE_S = 30.0


def find(home: ServerHome) -> ServerState | None:
    """The server the state file names, if it answers; None if there is none (or a stale file)."""
    state = ServerState.read(home)
    if state is None:
        return None
    if not alive(state.pid):
        state.remove(home)  # crashed or killed: its lock went with it
        return None
    if state.kind == "attached" and state.owner_pid and not alive(state.owner_pid):
        # its command died, so it is stopping (it still answers meanwhile): never hand it to
        # a new command, whose runs would lose their server a moment later
        if not wait_gone(state.pid, STOP_GRACE_S) and is_our_daemon(state.pid, home):
            terminate(state.pid)
        state.remove(home)
        return None
    if healthy(state.url, HEALTH_QUICK_S) or healthy(state.url, HEALTH_PATIENT_S):
        return state
    return None


def terminate(pid: int, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; returns once the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, grace_s):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10.0)
    except ProcessLookupError:
        pass


def launch(home: ServerHome, kind: Kind, port: int, idle_s: float,
           secrets: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Start a server process for `home` (not waiting for it). A background one leads a new
    session and outlives us; an attached one too, but the kernel stops it when we die.

    Its environment is ours less PREFECT_API_URL and the variables named in `secrets` (the
    API key's: a server that outlives its command never holds the key)."""
    from ernie_batch.prefect_server import dying_with_parent

    package_root = str(Path(__file__).resolve().parent.parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and k not in secrets}
    env.update({"PREFECT_HOME": str(home.root),
                "PYTHONPATH": os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                              if p)})
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    owner = str(os.getpid()) if kind == "attached" else "-"
    command = [sys.executable, "-m", DAEMON_MODULE, str(home.root), kind, str(port),
               str(idle_s), owner]
    if kind == "attached":
        command = dying_with_parent(command)
    home.dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(home.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=home.root,
                                start_new_session=True)


def _free(path: Path) -> bool:
    """Nobody holds the lock at `path` right now."""
    lock = FileLock(path)
    held = lock.try_acquire()
    lock.release()
    return held


class ServerLease:
    """One command's use of its home's server. `begin()`, then `ready()`, then `end()`."""

    def __init__(self, home: ServerHome, *, kind: Kind, port: int = 0, idle_s: float = 600.0,
                 secrets: tuple[str, ...] = (),
                 say: Callable[[str], None] = lambda message: None) -> None:
        self.home, self.kind, self.port, self.idle_s, self.say = home, kind, port, idle_s, say
        self.secrets = secrets
        self.users = FileLock(home.lock_path("users"), exclusive=False)
        self._start = FileLock(home.lock_path("start"))
        self.state: ServerState | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.started = False  # this command started the server

    def begin(self) -> None:
        """Find the home's server, or launch one (without waiting for it)."""
        try:
            self._begin()
        except OSError as exc:  # an unwritable home, say
            raise ServerStartError(f"cannot use {self.home.dir} for the local Prefect server: "
                                   f"{exc.strerror or exc}") from None

    def _begin(self) -> None:
        self.home.dir.mkdir(parents=True, exist_ok=True)
        if not self.users.acquire(USERS_WAIT_S, poll_s=0.05):
            raise ServerStartError(f"the Prefect server in {self.home.root} did not finish "
                                   f"stopping within {USERS_WAIT_S:.0f} s")
        seen = ServerState.read(self.home)
        self.state = find(self.home)
        if self.state is not None:
            return
        if not self._start.acquire(READY_TIMEOUT_S, poll_s=0.05):  # one starts it, others wait
            raise ServerStartError(f"another command has been starting the Prefect server in "
                                   f"{self.home.root} for {READY_TIMEOUT_S:.0f} s")
        if ServerState.read(self.home) != seen:  # started by another command while we waited
            self.state = find(self.home)
        if self.state is None:
            self._replace_deaf()
            self._proc = launch(self.home, self.kind, self.port, self.idle_s, self.secrets)
            self.started = True

    def _replace_deaf(self) -> None:
        state = ServerState.read(self.home)
        if state is not None and alive(state.pid) and is_our_daemon(state.pid, self.home):
            self.say(f"the Prefect server at {state.url} (pid {state.pid}) does not answer: "
                     "replacing it")
            terminate(state.pid, grace_s=5.0)
        if state is not None:
            state.remove(self.home)

    def ready(self, timeout_s: float = READY_TIMEOUT_S) -> ServerState:
        """The server, once it answers; ServerStartError if the one we started gave up."""
        try:
            if self.state is None:
                self.state = self._wait(timeout_s)
            return self.state
        finally:
            self._start.release()

    def _wait(self, timeout_s: float) -> ServerState:
        from ernie_batch.server.daemon import LOCKED

        deadline = time.monotonic() + timeout_s
        while True:
            state = ServerState.read(self.home)
            if state is not None and alive(state.pid) and healthy(state.url, 1.0):
                return state
            code = self._proc.poll() if self._proc is not None else None
            if code == LOCKED:  # another server (stopping, or starting for a killed command)
                self._proc = None
            elif code is not None:
                raise ServerStartError(f"the local Prefect server exited with code {code} before "
                                       f"it was ready; its log: {self.home.log_path}")
            if self._proc is None and _free(self.home.lock_path("server")):
                self._proc = launch(self.home, self.kind, self.port, self.idle_s, self.secrets)
            if time.monotonic() >= deadline:
                raise ServerStartError(f"the local Prefect server was not healthy after "
                                       f"{timeout_s:.0f} s; its log: {self.home.log_path}")
            time.sleep(0.1)

    def end(self) -> None:
        """Let go of the server; an attached one of ours stops once no other command uses it."""
        state, mine = self.state, self.kind == "attached" and self._proc is not None
        self.users.release()
        if not (mine and state is not None):
            return
        users = FileLock(self.home.lock_path("users"))
        try:
            if not users.try_acquire():
                self.say("another command still uses this Prefect server: it stops when that "
                         "command ends (Ctrl-C stops it now)")
                users.acquire(float("inf"), poll_s=0.2)
            state.remove(self.home)
        finally:
            terminate(state.pid)
            users.release()


class ServerInUse(Exception):
    """`server stop` without --force while a command uses the server."""


def stop(home: ServerHome, force: bool = False) -> str:
    """Stop the home's background server; what happened, in one line."""
    state = ServerState.read(home)
    if state is None or not alive(state.pid):
        if state is not None:
            state.remove(home)
        return f"no background Prefect server runs for {home.root}"
    if state.kind == "attached":
        raise ServerInUse(f"the Prefect server at {state.url} belongs to a running command "
                          f"(pid {state.owner_pid}) and stops with it")
    users = FileLock(home.lock_path("users"))
    if not users.try_acquire() and not force:
        raise ServerInUse(f"the background Prefect server at {state.url} is in use by a running "
                          "command (its runs would lose their server); --force stops it anyway")
    try:
        if is_our_daemon(state.pid, home):
            terminate(state.pid)
        state.remove(home)
    finally:
        users.release()
    return f"stopped the background Prefect server at {state.url} (pid {state.pid})"
