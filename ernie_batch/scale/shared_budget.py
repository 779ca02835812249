"""A shard run's request budget: every request waits for a grant from its coordinator.

It stands in for `RequestBudget` in the shard's `Pipeline` (same `acquire` / `release` /
`stop`), keeps the shard's own in-flight cap, and talks to the coordinator through the
channel files: it reports how many requests wait and what became of those sent, and reads
the grants. A grant seen more than `EXPIRY_S` after it was issued is not used (it counts
as spent: the coordinator already counted it in its window). A stop flag written by any
shard (a fatal error, the budget) stops this one too, with the same reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from ernie_batch.errors import BudgetStopped
from ernie_batch.scale.channel import Channel, ShardReport, read_json, write_json
from ernie_batch.scale.granter import EXPIRY_S, grants_of

POLL_S = 0.01  # how often grants are read and the report written (when it changed)


@dataclass(eq=False)
class GrantLease:
    """One request's permission, handed back with `SharedBudget.release`."""

    est_tokens: int
    released: bool = False


class SharedBudget:
    """The shard's side of the coordinator's limit (see `ernie_batch.scale.granter`)."""

    def __init__(self, channel: Channel, shard: int, run_id: str, max_in_flight: int) -> None:
        self.channel, self.shard = channel, shard
        self.report = ShardReport(shard=shard, run_id=run_id, host=socket.gethostname(),
                                  pid=os.getpid())
        self._slots = asyncio.Semaphore(max_in_flight)
        self._granted_seen = 0  # cumulative grants read (used or expired)
        self._usable: collections.deque[float] = collections.deque()  # issue times, unused
        self._grant = asyncio.Event()
        self._stopped = False
        self._dirty = True
        self._poller: asyncio.Task[None] | None = None
        self.on_stop_flag: Callable[[str, str | None], None] | None = None

    # ---- the RequestBudget interface the sender uses

    async def acquire(self, est_tokens: int = 0) -> GrantLease:
        self._check_stopped()
        self._ensure_polling()
        await self._slots.acquire()
        try:
            self.report.waiting += 1
            self._dirty = True
            try:
                while not self._take_fresh_grant():
                    self._check_stopped()
                    self._grant.clear()
                    await self._grant.wait()
            finally:
                self.report.waiting -= 1
            self.report.used += 1
            self._dirty = True
            return GrantLease(est_tokens)
        except BaseException:
            self._slots.release()
            raise

    def release(self, lease: GrantLease, *, outcome: str, actual_tokens: int | None = None,
                retry_after: float | None = None) -> None:
        if lease.released:
            raise RuntimeError("lease released twice")
        lease.released = True
        self._slots.release()
        if outcome == "ok":
            self.report.ok += 1
        elif outcome == "rate_limited":
            self.report.rate_limited += 1
            self.report.retry_after = retry_after
        else:
            self.report.errors += 1
        self._dirty = True

    def stop(self) -> None:
        """Every waiting and future acquire raises BudgetStopped."""
        self._stopped = True
        self._grant.set()

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def aclose(self) -> None:
        """Say this shard is done (its unused grants and open leases settle at once)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self.report.status = "finished"
        self._write_report()

    # ---- the channel

    def _check_stopped(self) -> None:
        if self._stopped:
            raise BudgetStopped("the run is stopping")

    def _ensure_polling(self) -> None:
        if self._poller is None:
            self._write_report()
            self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            self._read_grants(time.time())
            self._read_stop_flag()
            if self._dirty:
                self._write_report()
            await asyncio.sleep(POLL_S)

    def _take_fresh_grant(self) -> bool:
        """Use the oldest grant still fresh; the stale ones expire on the way."""
        now = time.time()
        while self._usable:
            issued = self._usable.popleft()
            if now - issued <= EXPIRY_S:
                return True
            self.report.expired += 1
            self._dirty = True
        return False

    def _read_grants(self, now: float) -> None:
        fresh = 0
        for issued, cumulative in grants_of(self.channel, self.report.run_id):
            new = cumulative - self._granted_seen
            if new <= 0:
                continue
            self._granted_seen = cumulative
            if now - issued > EXPIRY_S:
                self.report.expired += new
                self._dirty = True
            else:
                self._usable.extend([issued] * new)
                fresh += new
        if fresh:
            self._grant.set()

    def _read_stop_flag(self) -> None:
        flag = read_json(self.channel.stop)
        if isinstance(flag, dict) and not self._stopped:
            if self.on_stop_flag is not None:
                self.on_stop_flag(str(flag.get("reason")), flag.get("error"))
            self.stop()

    def raise_stop_flag(self, reason: str, error: str | None) -> None:
        """Tell every shard of the coordinator to stop (the first flag stays)."""
        if not self.channel.stop.exists():
            write_json(self.channel.stop, {"reason": reason, "error": error,
                                           "shard": self.shard, "at": time.time()})

    def _write_report(self) -> None:
        self.report.updated = time.time()
        self.report.write(self.channel.report(self.report.run_id))
        self._dirty = False
