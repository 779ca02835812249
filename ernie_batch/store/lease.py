"""Leases: who may hold an output (one run at a time; compaction alone), on a folder or a bucket.

On object storage a lease is one small JSON object, and every change to it is a conditional
write the store arbitrates:

* taken by creating it with `If-None-Match: *` (of two creators exactly one succeeds);
* renewed, taken over (lapsed or released) and released with `If-Match` on the ETag it was
  read at: compare and swap, so of two contenders for a lapsed lease exactly one wins, and a
  holder whose lease was taken over learns it at its next renewal (`LeaseLost`);
* judged lapsed by the store's clock alone: the lease's Last-Modified as the store reports
  it, against the Last-Modified of an object written just now (`store_now`), plus the
  holder's `ttl_s` and a second for the HTTP date's resolution. No local clock is compared
  with the store's or another machine's.

Every write carries a fresh nonce: a small object's ETag is its MD5, and a renewal that
wrote the same bytes would keep its ETag, letting a stale `If-Match` through.

A holder trusts its lease for `ttl_s` after the start of its last successful write, by its
own monotonic clock: never longer than the store grants. A holder paused past that (SIGSTOP,
a full disk) must stop writing until a renewal succeeds again.

On a local folder `flock` stays (the kernel frees a dead holder's lock at once) behind the
same interface, `FlockLease`. `open_lease` picks one by the location.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from ernie_batch.buckets import ObjectAccess, client, resolve_access
from ernie_batch.errors import LeaseLost
from ernie_batch.location import Location
from ernie_batch.store.lock import FileLock, poll

DATE_RESOLUTION_S = 1.0  # Last-Modified is an HTTP date: whole seconds


class Lease(Protocol):
    """What a holder does with a lease, wherever it lives."""

    @property
    def held(self) -> bool: ...

    def try_acquire(self) -> bool: ...

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> bool: ...

    def renew(self) -> None: ...

    def release(self) -> None: ...

    def holder(self) -> dict[str, Any]: ...


class FlockLease:
    """A lease on a local folder: an exclusive flock, which needs no renewal and lapses when
    its holder dies (the kernel frees it). The file names the holder."""

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = path
        self.info = info
        self._lock = FileLock(path, unlink=True)

    @property
    def held(self) -> bool:
        return self._lock.held

    def try_acquire(self) -> bool:
        if self._lock.held:
            return True
        if not self._lock.try_acquire():
            return False
        self._lock.write(self.info)
        return True

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> bool:
        if not self._lock.acquire(wait_s, poll_s):
            return False
        self._lock.write(self.info)
        return True

    def renew(self) -> None:
        if not self._lock.held:
            raise LeaseLost(f"lease {self.path} is not held")

    def release(self) -> None:
        self._lock.release()

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}


class ObjectLease:
    """A lease held as an object on object storage (see the module's docstring)."""

    def __init__(self, location: Location, access: ObjectAccess, info: dict[str, Any],
                 ttl_s: float = 60.0) -> None:
        if ttl_s <= 2 * DATE_RESOLUTION_S:
            raise ValueError(f"ttl_s {ttl_s:g}: a lease needs more than "
                             f"{2 * DATE_RESOLUTION_S:g} s (Last-Modified has whole seconds)")
        self.location = location
        self.info = info
        self.ttl_s = ttl_s
        self._store = client(access, location.scheme, location.bucket)
        self._etag: str | None = None
        self._trusted_until = 0.0  # monotonic: ttl_s after our last write began
        self._seen: dict[str, Any] = {}  # the holder when we last lost

    @property
    def held(self) -> bool:
        return self._etag is not None and time.monotonic() < self._trusted_until

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({"holder": self.info, "ttl_s": self.ttl_s, "released": released,
                           "nonce": uuid.uuid4().hex}).encode()

    def _put(self, mode: Any, released: bool = False) -> None:
        import obstore

        began = time.monotonic()
        result = obstore.put(self._store, self.location.key, self._body(released), mode=mode)
        self._etag, self._trusted_until = result["e_tag"], began + self.ttl_s

    def try_acquire(self) -> bool:
        """Take the lease if it is free, released or lapsed; never waits. False when another
        holds it (or won the race for it)."""
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        if self.held:
            return True
        for _ in range(3):  # it may vanish or change between two of our requests
            try:
                self._put("create")
                return True
            except AlreadyExistsError:
                pass
            try:
                meta, data = self._read()
            except (NotFoundError, FileNotFoundError):  # obstore raises the latter for a 404
                continue
            if not data.get("released") and not self._lapsed(meta["last_modified"], data):
                self._seen = data.get("holder", {})
                return False
            try:
                self._put({"e_tag": meta["e_tag"]})
                return True
            except PreconditionError:  # another contender took it first
                return False
        return False

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> bool:
        """Try until `wait_s` has passed; True once held."""
        return poll(self.try_acquire, wait_s, poll_s)

    def renew(self) -> None:
        """Write the lease again (If-Match on our last ETag); LeaseLost when it was taken over."""
        from obstore.exceptions import PreconditionError

        if self._etag is None:
            raise LeaseLost(f"lease {self.location} is not held")
        try:
            self._put({"e_tag": self._etag})
        except PreconditionError:
            self._etag = None
            raise LeaseLost(f"lease {self.location} was taken over: it lapsed before it was "
                            "renewed") from None

    def release(self) -> None:
        """Mark it released (If-Match): the next contender takes it at once. A lease taken over
        meanwhile is left to its new holder."""
        from obstore.exceptions import PreconditionError

        if self._etag is None:
            return
        with contextlib.suppress(PreconditionError):
            self._put({"e_tag": self._etag}, released=True)
        self._etag = None

    def holder(self, live: bool = False) -> dict[str, Any]:
        """Who holds it now ({} when nobody does); with `live`, {} also once it lapsed."""
        from obstore.exceptions import NotFoundError

        try:
            meta, data = self._read()
        except (NotFoundError, FileNotFoundError):
            return {}
        if data.get("released") or (live and self._lapsed(meta["last_modified"], data)):
            return {}
        return data.get("holder", {}) or {"run_id": "?"}

    def _read(self) -> tuple[dict[str, Any], dict[str, Any]]:
        import obstore

        result = obstore.get(self._store, self.location.key)
        try:
            data = json.loads(bytes(result.bytes()))
        except ValueError:
            data = {}  # not ours, or cut: lapses like any other by its Last-Modified
        return result.meta, data if isinstance(data, dict) else {}

    def _lapsed(self, written: datetime, data: dict[str, Any]) -> bool:
        ttl = float(data.get("ttl_s") or self.ttl_s)
        return (store_now(self._store, self.location) - written).total_seconds() > (
            ttl + DATE_RESOLUTION_S)


def store_now(store: Any, near: Location) -> datetime:
    """The store's clock: the Last-Modified of an object written just now beside `near`."""
    import obstore

    key = f"{near.key}.clock"
    obstore.put(store, key, b"", mode="overwrite")
    return obstore.head(store, key)["last_modified"]


def open_lease(location: Location, info: dict[str, Any], *, ttl_s: float = 60.0,
               access: ObjectAccess | None = None) -> FlockLease | ObjectLease:
    """The lease at `location`: an object on object storage, an flock file on a local folder."""
    if location.is_remote:
        return ObjectLease(location, access or resolve_access(), info, ttl_s)
    return FlockLease(Path(location), info)


class KeptLease:
    """An object lease renewed in a thread for as long as it is held (the run lock and
    compaction's lock on object storage): `lost` is set once it is lost, and the holder must
    then stop writing. Renewed every third of its ttl: two renewals may fail before it lapses."""

    def __init__(self, lease: ObjectLease) -> None:
        self.lease = lease
        self.lost = threading.Event()
        self.on_lost: Callable[[], None] | None = None  # called in the renewal thread
        self._renewing = contextlib.ExitStack()

    @property
    def held(self) -> bool:
        return self.lease.held and not self.lost.is_set()

    def try_acquire(self) -> bool:
        return self._renewed(self.lease.try_acquire())

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> bool:
        return self._renewed(self.lease.acquire(wait_s, poll_s))

    def _renewed(self, got: bool) -> bool:
        if got:
            self._renewing.close()
            self.lost = self._renewing.enter_context(
                kept(self.lease, self.lease.ttl_s / 3, lambda: self.on_lost and self.on_lost()))
        return got

    def renew(self) -> None:
        self.lease.renew()

    def release(self) -> None:
        self._renewing.close()
        self.lease.release()

    def holder(self, live: bool = False) -> dict[str, Any]:
        return self.lease.holder(live)


@contextlib.contextmanager
def kept(lease: Lease, every_s: float,
         on_lost: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """Renew a held lease every `every_s` seconds in a thread while the block runs. The event
    it yields is set (and `on_lost` called, in that thread) once the lease is lost (taken
    over, or not renewed within its ttl): the holder must then stop writing."""
    lost, done = threading.Event(), threading.Event()

    def lose() -> None:
        lost.set()
        if on_lost is not None:
            on_lost()

    def loop() -> None:
        while not done.wait(every_s):
            try:
                lease.renew()
            except LeaseLost:
                lose()
                return
            except Exception:  # noqa: BLE001 - a store that did not answer: try again next tick
                if not lease.held:
                    lose()
                    return

    thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        done.set()
        thread.join()
