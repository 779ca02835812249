"""The coordinator's side of the shared rate limit: one request budget, grants handed out by it.

Every grant is one lease of a `RequestBudget` (the one a single run paces itself with, at
0.986 of a limit alone), so all the shard runs together send no more than it admits: in any
window of `window_s + EXPIRY_S + SEND_S`, at most the configured requests. A shard run uses
a grant at most `EXPIRY_S` after it was issued (later, it expires), and its request reaches
the API within about `SEND_S` more (the body built, the journal line written, the network),
so the request still arrives within a window the budget counted it in. Grants go to the
current shard runs that report requests waiting, round-robin; a shard run the coordinator
replaced (its worker went silent) gets none, so it cannot send another request. A lease is
released when the shard run reports the fate of the request it allowed (first granted,
first settled), so a 429 at any worker lowers the one shared rate and pauses every shard by
its Retry-After; no shard adjusts the rate itself.
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


class _Run:
    """What the granter knows of one shard run."""

    def __init__(self) -> None:
        self.granted = 0
        self.batches: list[tuple[float, int]] = []
        self.leases: collections.deque[Lease] = collections.deque()
        self.report: ShardReport | None = None
        self.mtime = 0
        self.settled = 0
        self.seen_429 = 0


class Granter:
    """Hands out the limit to a coordinator's current shard runs; `run()` until `stop()`."""

    def __init__(self, channel: Channel, *, per_window: float, window_s: float,
                 adaptive: bool = True) -> None:
        self.channel = channel
        self.window_s = window_s + EXPIRY_S + SEND_S
        self.budget = RequestBudget(rpm=per_window, max_in_flight=0, adaptive=adaptive,
                                    window_s=self.window_s)
        self.not_before = 0.0  # a resumed granter grants nothing until its window is clear
        self.rate_limited = 0  # 429s the shard runs met, all together
        self._runs: dict[str, _Run] = {}
        self._order: list[str] = []  # the current shard runs, for round-robin
        self._next = 0
        self._stopping = asyncio.Event()

    def admit(self, run_id: str) -> None:
        """A shard run to grant to (submitted, or about to be)."""
        self._runs.setdefault(run_id, _Run())
        if run_id not in self._order:
            self._order.append(run_id)

    def retire(self, run_id: str) -> None:
        """No more grants to this shard run (finished, or replaced by a new attempt)."""
        if run_id in self._order:
            self._order.remove(run_id)
        run = self._runs.get(run_id)
        if run is not None:
            self._release_all(run)

    def resume(self, channel: Channel) -> None:
        """Go on from the grants an earlier coordinator of this plan wrote: every shard run
        counts its grants from there (a grant is never handed out twice). Which of those
        fell in the current window is not known, so it grants nothing for one window after
        the last of them: the dead coordinator's window cannot be exceeded."""
        value = read_json(channel.grants)
        if isinstance(value, dict) and value.get("updated"):
            self.not_before = float(value["updated"]) + self.window_s
        for run_id, batches in (value or {}).get("runs", {}).items():
            if batches:
                run = self._runs.setdefault(run_id, _Run())
                run.granted = int(batches[-1][1])
                run.batches = [(float(t), int(n)) for t, n in batches]

    # ---- a member of the key's shared limit (`ernie_batch.scale.limit_share`)

    # (the budget the grants come from holds, renews and counts for the coordinator)

    def set_share(self, fraction: float) -> None:
        self.budget.set_share(fraction)

    def hold(self, seconds: float) -> None:
        self.budget.hold(seconds)

    def renew(self, seconds: float) -> None:
        self.budget.renew(seconds)

    def recent(self) -> tuple[int, float | None]:
        return self.budget.recent()

    def occupy(self, count: int, at_wall: float) -> None:
        self.budget.occupy(count, at_wall)

    def _may_grant(self) -> bool:
        return time.time() >= self.not_before

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Until stopped: read reports, settle leases, grant what the budget admits now."""
        while not self._stopping.is_set():
            self._read_reports()
            granted = False
            while (self._may_grant() and (wanting := self._wanting())
                   and (lease := self.budget.try_acquire())):
                run = self._runs[self._pick(wanting)]
                run.leases.append(lease)
                run.granted += 1
                granted = True
            if granted:
                self._write_grants()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), TICK_S)
        self.budget.stop()

    def _wanting(self) -> list[str]:
        """Current shard runs with more requests waiting than grants on their way to them."""
        out = []
        for run_id in self._order:
            run = self._runs[run_id]
            report = run.report
            if report is None or report.status != "running":
                continue
            if report.waiting > run.granted - report.used - report.expired:
                out.append(run_id)
        return out

    def _pick(self, wanting: list[str]) -> str:
        """Round-robin over the current shard runs that want one."""
        n = len(self._order)
        run_id = min(wanting, key=lambda r: (self._order.index(r) - self._next) % n)
        self._next = (self._order.index(run_id) + 1) % n
        return run_id

    def _read_reports(self) -> None:
        for run_id, run in self._runs.items():
            path = self.channel.report(run_id)
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime == run.mtime:
                continue
            report = ShardReport.read(path)
            if report is None:
                continue
            run.mtime, run.report = mtime, report
            self._settle(run, report)

    def _settle(self, run: _Run, report: ShardReport) -> None:
        """Release the leases whose requests came back (or expired); all once a run ended."""
        new_429 = max(0, report.rate_limited - run.seen_429)
        run.seen_429 = report.rate_limited
        self.rate_limited += new_429
        if report.status != "running":
            self._release_all(run)
            return
        settle = report.settled - run.settled
        run.settled += settle
        for i in range(min(settle, len(run.leases))):
            limited = i < new_429
            self.budget.release(run.leases.popleft(),
                                outcome="rate_limited" if limited else "ok",
                                retry_after=report.retry_after if limited else None)

    def _release_all(self, run: _Run) -> None:
        while run.leases:
            self.budget.release(run.leases.popleft(), outcome="ok")

    def _write_grants(self) -> None:
        now = time.time()
        runs = {}
        for run_id in self._order:
            run = self._runs[run_id]
            if not run.batches or run.batches[-1][1] != run.granted:
                run.batches.append((now, run.granted))
            while len(run.batches) > 1 and run.batches[0][0] < now - KEEP_BATCHES_S:
                run.batches.pop(0)
            runs[run_id] = run.batches
        write_json(self.channel.grants, {"updated": now, "runs": runs})


def grants_of(channel: Channel, run_id: str) -> list[tuple[float, int]]:
    """A shard run's recent grant batches: (issued at, cumulative granted after), oldest first."""
    value = read_json(channel.grants)
    if not isinstance(value, dict):
        return []
    return [(float(t), int(n)) for t, n in value.get("runs", {}).get(run_id, [])]
