"""Who may write to an output folder, held with flock(2): the kernel frees a lock when its owner dies.

Four locks, each a file:

* `OUTPUT/.lock`, the **run lock**: one top-level run (a `run`, a `backfill`, a coordinator
  of shard runs) at a time; a second one waits (`--wait`) or exits 5. Its file names the
  owner for the message.
* `OUTPUT/.data.lock`, the **data lock**: every writer of rows holds it shared (a run and
  each of its shard runs, side by side); `documents --rebuild` holds it exclusive, so no
  run adds pages while it rebuilds documents from them.
* `OUTPUT/.compact.lock`, the **compaction lock**: one compaction at a time. Compaction runs
  beside runs (Delta's commits keep each row once), but not beside another compaction:
  delta-rs lets a rewrite that changes no data remove files another rewrite removed
  already, so two optimizes of one partition would both commit and double its rows.
* `OUTPUT/_journal/<run_id>.lock`, a **run-id lock**: held by whoever writes that run's
  files, the run itself or, once it died, the run folding its journal. Start-up recovery
  touches only run ids whose lock is free: never a live sibling's journal.

On a network file system `flock` is per host: a second machine sharing the folder is not
excluded (README "Running on several machines").

On object storage (`s3://...`) the run lock and the compaction lock are lease objects at the
same names under the output (`lease`: conditional writes, lapse by the store's clock, renewed
while held), whichever machine holds them; the data lock is not needed (see `data_lock`);
the run-id locks stay flocks in the local state folder, beside the journals they guard. A
shard run there also holds a **run lease**, `OUTPUT/_leases/<run_id>.lock` (`run_lease`):
its machine may be another one, so its run-id lock tells nobody else whether it lives.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ernie_batch.errors import LockedError
from ernie_batch.location import OutputRoot, StrPath

if TYPE_CHECKING:
    from ernie_batch.store.lease import KeptLease


def poll(attempt: Callable[[], bool], wait_s: float, poll_s: float) -> bool:
    """Call `attempt` every `poll_s` seconds until it succeeds (True) or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while not attempt():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


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
        return poll(self.try_acquire, wait_s, poll_s)

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


def lock_dir(root: StrPath | OutputRoot) -> Path:
    """Where an output's lock files live: the folder itself; for an output on object storage,
    its local state folder (the locks of this machine's processes only)."""
    out = OutputRoot.of(root)
    return out.local_path() if out.is_local else out.journal_dir


class OutputLock:
    """The run lock, `OUTPUT/.lock`: one top-level run at a time; the file names the owner.
    On object storage a lease object, renewed while held (`lease.KeptLease`)."""

    def __init__(self, root: StrPath | OutputRoot, run_id: str) -> None:
        self.root = OutputRoot.of(root)
        self.run_id = run_id
        if self.root.is_local:
            self.path = lock_dir(root) / ".lock"
            self._lock: FileLock | KeptLease = FileLock(self.path, unlink=True)
        else:
            self._lock = object_lock(self.root, ".lock", self._owner())

    @property
    def held(self) -> bool:
        return self._lock.held

    def when_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in another thread) if the lease on object storage is lost: taken
        over after it lapsed unrenewed. A flock on a folder is never lost."""
        if not isinstance(self._lock, FileLock):
            self._lock.on_lost = callback

    def _owner(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "since": datetime.now(UTC).isoformat()}

    def owner(self) -> dict[str, Any]:
        if isinstance(self._lock, FileLock):
            try:
                return json.loads(self.path.read_text())
            except (OSError, ValueError):
                return {}
        return self._lock.holder()

    def acquire(self, wait_s: float = 0.0) -> None:
        if not self._lock.acquire(wait_s):
            raise LockedError(locked_message(self.root, self.owner(), wait_s))
        if isinstance(self._lock, FileLock):
            self._lock.write(self._owner())

    def release(self) -> None:
        self._lock.release()


def object_lock(root: OutputRoot, name: str, info: dict[str, Any]) -> KeptLease:
    """A lock on an output on object storage: the lease object `OUTPUT/<name>`, lapsing
    `root.lease_ttl_s` after its holder stopped renewing it."""
    from ernie_batch.store.lease import KeptLease, ObjectLease

    return KeptLease(ObjectLease(root.location.join(name), root.object_access(), info,
                                 root.lease_ttl_s))


class _Unneeded:
    """A lock an output on object storage does without (see `data_lock`)."""

    held = True

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.25) -> bool:
        return True

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


def data_lock(root: StrPath | OutputRoot, *, exclusive: bool) -> FileLock | _Unneeded:
    """The data lock: shared by every writer of rows, exclusive for rewriting maintenance.
    An output on object storage has none: its rewriting maintenance (`documents --rebuild`)
    holds the run lock, which already keeps every run out (a coordinator holds it for its
    shard runs)."""
    if not OutputRoot.of(root).is_local:
        return _Unneeded()
    return FileLock(lock_dir(root) / ".data.lock", exclusive=exclusive)


def compact_lock(root: StrPath | OutputRoot) -> FileLock | KeptLease:
    """The compaction lock (see the module docstring); a lease object on object storage."""
    out = OutputRoot.of(root)
    if not out.is_local:
        return object_lock(out, ".compact.lock", {"pid": os.getpid(),
                                                   "host": socket.gethostname()})
    return FileLock(lock_dir(root) / ".compact.lock")


RUN_LEASES = "_leases"


def run_lease(root: OutputRoot, run_id: str, info: dict[str, Any] | None = None) -> KeptLease:
    """A run's own lease on an output on object storage, held while it writes (a shard run).
    Whoever takes it once it lapsed knows the run is dead, and the run, if it was only
    paused, learns at its next renewal that it was replaced, and stops."""
    return object_lock(root, f"{RUN_LEASES}/{run_id}.lock", info or {})


def run_lease_live(root: OutputRoot, run_id: str) -> bool:
    """Whether `run_id` holds its run lease now (never held, released or lapsed: False)."""
    return bool(run_lease(root, run_id).holder(live=True))


def run_id_lock(root: StrPath | OutputRoot, run_id: str) -> FileLock:
    """The lock on one run id's files: its journal, and its rows until they are committed."""
    return FileLock(OutputRoot.of(root).journal_dir / f"{run_id}.lock", unlink=True)


@contextlib.contextmanager
def holding_dead_run(root: StrPath | OutputRoot, run_id: str,
                     wait_s: float = 0.0) -> Iterator[bool]:
    """Hold a run id's lock while the block works on its files; False when its owner lives
    (or, after `wait_s`, still holds it: another run folding a dead one's journal holds it
    for as long as that takes)."""
    lock = run_id_lock(root, run_id)
    held = lock.acquire(wait_s) if wait_s > 0 else lock.try_acquire()
    try:
        yield held
    finally:
        lock.release()


def live_lock_owner(root: StrPath | OutputRoot) -> dict[str, Any] | None:
    """The owner of the output's run lock while a live run holds it (a quick check before
    start); on object storage, while its lease has not lapsed."""
    out = OutputRoot.of(root)
    if not out.is_local:
        return object_lock(out, ".lock", {}).holder(live=True) or None
    path = lock_dir(root) / ".lock"
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


def locked_message(root: StrPath | OutputRoot, owner: dict[str, Any],
                   waited_s: float = 0.0) -> str:
    """Who holds the output; the hint to queue only when the caller did not wait already."""
    what = "output folder" if OutputRoot.of(root).is_local else "output"
    held = f"{what} {root} is locked by run {owner.get('run_id')} (pid {owner.get('pid')})"
    if waited_s > 0:
        return f"{held}; still locked after waiting {waited_s:g} s (--wait)"
    return f"{held}; use --wait to queue behind it"


def wait_until_unlocked(root: StrPath | OutputRoot, wait_s: float) -> None:
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
