"""One run at a time per output folder: `OUTPUT/.lock`, held with flock(2)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ernie_batch.errors import LockedError


class OutputLock:
    """OUTPUT/.lock, held with flock(2): the kernel frees it when its owner dies, even by kill -9.

    The file also names the owner (pid, host, run id) for the messages; the lock itself is
    the flock, so a crashed run's leftover file is simply taken over. After locking, the
    path must still be the file we locked (a releasing owner unlinks it), else we retry.
    """

    def __init__(self, root: Path, run_id: str) -> None:
        self.path = root / ".lock"
        self.run_id = run_id
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _try(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # unlinked by its previous owner between our open and our lock
            os.close(fd)
            return self._try()
        payload = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
             "since": datetime.now(UTC).isoformat()}
        ).encode()
        os.pwrite(fd, payload, 0)  # then cut: a reader never sees an empty file
        os.ftruncate(fd, len(payload))
        self._fd = fd
        return True

    def owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        while not self._try():
            if time.monotonic() >= deadline:
                raise LockedError(locked_message(self.path.parent, self.owner(), wait_s))
            time.sleep(0.25)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: waiters re-check the inode
            os.close(self._fd)
            self._fd = None


def live_lock_owner(root: Path) -> dict[str, Any] | None:
    """The owner of the folder's lock while a live run holds it (a quick check before start)."""
    path = root / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return OutputLock(root, "").owner() or {"run_id": "?", "pid": "?"}
    finally:
        os.close(fd)
    return None


def locked_message(root: Path, owner: dict[str, Any], waited_s: float = 0.0) -> str:
    """Who holds the folder; the hint to queue only when the caller did not wait already."""
    held = f"output folder {root} is locked by run {owner.get('run_id')} (pid {owner.get('pid')})"
    if waited_s > 0:
        return f"{held}; still locked after waiting {waited_s:g} s (--wait)"
    return f"{held}; use --wait to queue behind it"


def wait_until_unlocked(root: Path, wait_s: float) -> None:
    """Return once no live run holds the folder's lock; LockedError after `wait_s` seconds.

    A quick check before a run starts (it takes the lock itself later).
    """
    deadline = time.monotonic() + wait_s
    owner = live_lock_owner(root)
    while owner and time.monotonic() < deadline:
        time.sleep(0.5)
        owner = live_lock_owner(root)
    if owner:
        raise LockedError(locked_message(root, owner, wait_s))
