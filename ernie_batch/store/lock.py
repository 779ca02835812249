"""Who may write to an output folder, held with flock(2): the kernel frees a lock when its owner dies.

Three locks, each a file:

* `OUTPUT/.lock`, the **run lock**: one top-level run (a `run`, a `backfill`, a coordinator
  of shard runs) at a time; a second one waits (`--wait`) or exits 5. Its file names the
  owner for the message.
* `OUTPUT/.data.lock`, the **data lock**: every writer of rows holds it shared (a run and
  each of its shard runs, side by side); maintenance that rewrites the dataset (compaction,
  rebuilds) holds it exclusive, so no writer is live while files are replaced.
* `OUTPUT/_journal/<run_id>.lock`, a **run-id lock**: held by whoever writes that run's
  files, the run itself or, once it died, the run folding its journal. Start-up recovery
  and temporary-file cleanup touch only run ids whose lock is free: never a live sibling's.

On a network file system `flock` is per host: a second machine sharing the folder is not
excluded (README "Running on several machines").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ernie_batch.errors import LockedError


class FileLock:
    """One flock on one path, shared or exclusive, taken over from a dead owner for free.

    With `unlink=True` the holder deletes the file on release (while still holding it); a
    waiter that then locks the deleted file notices the path is a new file and retries, so
    lock files do not pile up. Shared locks keep their file (other holders use it).
    """

    def __init__(self, path: Path, *, exclusive: bool = True, unlink: bool = False) -> None:
        self.path = path
        self.exclusive = exclusive
        self.unlink = unlink and exclusive
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody else holds it in a conflicting mode; never waits."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
                            | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # unlinked by its previous owner between our open and our lock

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.25) -> bool:
        """Wait up to `wait_s` seconds for the lock; True once held."""
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def write(self, payload: dict[str, Any]) -> None:
        """Name the holder in the file (then cut it: a reader never sees an empty file)."""
        assert self._fd is not None
        data = json.dumps(payload).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        if self._fd is not None:
            if self.unlink:
                self.path.unlink(missing_ok=True)  # while still locked: waiters re-check
            os.close(self._fd)
            self._fd = None


class OutputLock:
    """The run lock, `OUTPUT/.lock`: one top-level run at a time; the file names the owner."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.path = root / ".lock"
        self.run_id = run_id
        self._lock = FileLock(self.path, unlink=True)

    @property
    def held(self) -> bool:
        return self._lock.held

    def owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self, wait_s: float = 0.0) -> None:
        if not self._lock.acquire(wait_s):
            raise LockedError(locked_message(self.path.parent, self.owner(), wait_s))
        self._lock.write({"pid": os.getpid(), "host": socket.gethostname(),
                          "run_id": self.run_id, "since": datetime.now(UTC).isoformat()})

    def release(self) -> None:
        self._lock.release()


def data_lock(root: Path, *, exclusive: bool) -> FileLock:
    """The data lock: shared by every writer of rows, exclusive for rewriting maintenance."""
    return FileLock(root / ".data.lock", exclusive=exclusive)


def run_id_lock(root: Path, run_id: str) -> FileLock:
    """The lock on one run id's files: its journal, its parts, its temporary files."""
    return FileLock(root / "_journal" / f"{run_id}.lock", unlink=True)


@contextlib.contextmanager
def holding_dead_run(root: Path, run_id: str, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold a run id's lock while the block works on its files; False when its owner lives
    (or, after `wait_s`, still holds it: another run folding a dead one's journal holds it
    for as long as that takes)."""
    lock = run_id_lock(root, run_id)
    held = lock.acquire(wait_s) if wait_s > 0 else lock.try_acquire()
    try:
        yield held
    finally:
        lock.release()


def live_lock_owner(root: Path) -> dict[str, Any] | None:
    """The owner of the folder's run lock while a live run holds it (a quick check before start)."""
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
    """Return once no live run holds the folder's run lock; LockedError after `wait_s` seconds.

    A quick check before a run starts (it takes the lock itself later).
    """
    deadline = time.monotonic() + wait_s
    owner = live_lock_owner(root)
    while owner and time.monotonic() < deadline:
        time.sleep(0.5)
        owner = live_lock_owner(root)
    if owner:
        raise LockedError(locked_message(root, owner, wait_s))
