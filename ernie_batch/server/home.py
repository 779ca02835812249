"""What a home holds for its server: `PREFECT_HOME/ernie-batch-server/`.

    state.json    the running server: pid, URL, kind, since when (written once it answers,
                  removed when it stops; a file naming a dead or deaf process is stale)
    server.lock   held (exclusive) by the server process for its life: one per database
    users.lock    held (shared) by every command using the server; taken exclusive by a
                  background server only to stop, so it never stops under a command
    start.lock    held by the command starting a server, so two commands start one, not two
    clients/      one lock file per command using the server (`orphans`)
    server.log    the server's output (0600), replaced at each start

No Prefect here: a command reads these before it imports Prefect (seconds) or decides it
does not need to.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["background", "attached"]
DAEMON_MODULE = "ernie_batch.server.daemon"
HEALTH_QUICK_S = 0.1  # a server that answers at all answers /health this fast
HEALTH_PATIENT_S = 5.0  # before calling a live server deaf (a busy machine, a long request)


def prefect_home(configured: Path | None = None) -> Path:
    """`server.home` when set, else PREFECT_HOME as Prefect resolves it (default ~/.prefect)."""
    if configured is not None:
        return configured.expanduser().absolute()
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser().absolute()


@dataclass(frozen=True)
class ServerHome:
    """The server's files in one PREFECT_HOME."""

    root: Path  # the PREFECT_HOME: its database lives here too

    @property
    def dir(self) -> Path:
        return self.root / "ernie-batch-server"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def clients(self) -> Path:
        return self.dir / "clients"

    def lock_path(self, name: Literal["server", "users", "start"]) -> Path:
        return self.dir / f"{name}.lock"


@dataclass(frozen=True)
class ServerState:
    """What the state file says of the running server."""

    pid: int
    url: str  # http://127.0.0.1:PORT (the API under /api)
    kind: Kind
    owner_pid: int | None  # an attached server's command
    started_at: float  # wall clock
    idle_shutdown_s: float | None  # a background server's

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def write(self, home: ServerHome) -> None:
        """Atomically: a reader sees the old file or the new one, never half of one."""
        home.dir.mkdir(parents=True, exist_ok=True)
        tmp = home.state_path.with_suffix(f".{self.pid}.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, home.state_path)

    @classmethod
    def read(cls, home: ServerHome) -> ServerState | None:
        try:
            data = json.loads(home.state_path.read_text())
            return cls(int(data["pid"]), str(data["url"]), data["kind"],
                       data.get("owner_pid"), float(data["started_at"]),
                       data.get("idle_shutdown_s"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove(self, home: ServerHome) -> None:
        """Remove the state file if it still names this server (a successor's stays)."""
        if ServerState.read(home) == self:
            home.state_path.unlink(missing_ok=True)


def healthy(url: str, timeout_s: float = HEALTH_QUICK_S) -> bool:
    """GET {url}/api/health answers true within `timeout_s`."""
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=timeout_s) as resp:
            return resp.status == 200 and resp.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def alive(pid: int) -> bool:
    """A running process has this number (a zombie, dead but not reaped yet, is not one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number
        return False
    return not _zombie(pid)


def is_our_daemon(pid: int, home: ServerHome) -> bool:
    """Whether `pid` is a server process of ours for this home (not a reused process number),
    by its command line: its arguments from /proc, else the line `ps` shows (macOS)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.exists():
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        return DAEMON_MODULE in argv and str(home.root) in argv
    try:
        line = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True,
                              text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return f" {DAEMON_MODULE} {home.root} " in f" {line.strip()} "


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait for `pid` to exit (reaping it when it is our child); True once it has."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
