"""The coordinator's side of the shared rate limit: one request budget, grants handed out by it.

Every grant is one lease of a `RequestBudget` (the one a single run paces itself with, at
0.986 of a limit alone), so all the shards together send no more than it admits: in any
window of `window_s + EXPIRY_S + SEND_S`, at most the configured requests. A shard uses a
grant at most `EXPIRY_S` after it was issued (later, it expires), and its request reaches
the API within about `SEND_S` more (the body built, the journal line written, the network),
so the request still arrives within a window the budget counted it in. Grants go to
shards that report requests waiting, round-robin. A lease is released when the shard
reports the fate of the request it allowed (first granted, first settled), so a 429 at any
worker lowers the one shared rate and pauses every shard by its Retry-After; no shard
adjusts the rate itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

from ernie_batch.limits import Lease, RequestBudget
from ernie_batch.scale.channel import Channel, ShardReport, read_json, write_json

EXPIRY_S = 0.1  # a grant older than this is not used (and counts as spent)
SEND_S = 0.1  # from a grant's use to its request's arrival, at most (about)
TICK_S = 0.01  # how often reports are read and grants written
KEEP_BATCHES_S = 2.0  # grant batches kept in the file: enough for any reader to catch up


class Granter:
    """Hands out the limit to the shards of one coordinator; `run()` until `stop()`."""

    def __init__(self, channel: Channel, shards: int, *, per_window: float, window_s: float,
                 adaptive: bool = True) -> None:
        self.channel = channel
        self.shards = shards
        self.budget = RequestBudget(rpm=per_window, max_in_flight=0, adaptive=adaptive,
                                    window_s=window_s + EXPIRY_S + SEND_S)
        self.granted = [0] * shards
        self.rate_limited = 0  # 429s the shards met, all together
        self._batches: list[list[tuple[float, int]]] = [[] for _ in range(shards)]
        self._leases: list[collections.deque[Lease]] = [collections.deque()
                                                         for _ in range(shards)]
        self._reports: list[ShardReport | None] = [None] * shards
        self._mtimes = [0] * shards
        self._settled = [0] * shards
        self._seen_429 = [0] * shards
        self._next = 0
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Until stopped: read reports, settle leases, grant what the budget admits now."""
        while not self._stopping.is_set():
            self._read_reports()
            granted = False
            while (wanting := self._wanting()) and (lease := self.budget.try_acquire()):
                shard = self._pick(wanting)
                self._leases[shard].append(lease)
                self.granted[shard] += 1
                granted = True
            if granted:
                self._write_grants()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), TICK_S)
        self.budget.stop()

    def _wanting(self) -> list[int]:
        """Shards with more requests waiting than grants on their way to them."""
        out = []
        for shard, report in enumerate(self._reports):
            if report is None or report.status != "running":
                continue
            on_their_way = self.granted[shard] - report.used - report.expired
            if report.waiting > on_their_way:
                out.append(shard)
        return out

    def _pick(self, wanting: list[int]) -> int:
        """Round-robin over the shards that want one."""
        shard = min(wanting, key=lambda s: (s - self._next) % self.shards)
        self._next = (shard + 1) % self.shards
        return shard

    def _read_reports(self) -> None:
        for shard in range(self.shards):
            path = self.channel.report(shard)
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime == self._mtimes[shard]:
                continue
            report = ShardReport.read(path)
            if report is None:
                continue
            self._mtimes[shard] = mtime
            self._reports[shard] = report
            self._settle(shard, report)

    def _settle(self, shard: int, report: ShardReport) -> None:
        """Release the leases whose requests came back (or expired); all once a shard ended."""
        leases = self._leases[shard]
        new_429 = max(0, report.rate_limited - self._seen_429[shard])
        self._seen_429[shard] = report.rate_limited
        self.rate_limited += new_429
        settle = report.settled - self._settled[shard]
        if report.status != "running":
            settle = len(leases)
        self._settled[shard] += settle
        for i in range(min(settle, len(leases))):
            limited = i < new_429
            self.budget.release(leases.popleft(), outcome="rate_limited" if limited else "ok",
                                retry_after=report.retry_after if limited else None)

    def _write_grants(self) -> None:
        now = time.time()
        shards = {}
        for shard in range(self.shards):
            batches = self._batches[shard]
            if not batches or batches[-1][1] != self.granted[shard]:
                batches.append((now, self.granted[shard]))
            while len(batches) > 1 and batches[0][0] < now - KEEP_BATCHES_S:
                batches.pop(0)
            shards[str(shard)] = batches
        write_json(self.channel.grants, {"updated": now, "shards": shards})


def grants_of(channel: Channel, shard: int) -> list[tuple[float, int]]:
    """A shard's recent grant batches: (issued at, cumulative granted after), oldest first."""
    value = read_json(channel.grants)
    if not isinstance(value, dict):
        return []
    return [(float(t), int(n)) for t, n in value.get("shards", {}).get(str(shard), [])]
