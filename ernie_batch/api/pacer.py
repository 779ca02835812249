"""One rate limit paced like a sliding-window server: a window log plus a small token bucket.

See `ernie_batch.api.limits` for why the request budget paces this way.
"""

from __future__ import annotations

import heapq
from collections import deque


class Pacer:
    """One limit: a sliding-window log (never more than `limit` per span) plus a small bucket.

    The bucket refills at `rate` per span (`rate <= limit`): after a 429 the rate drops at
    once while the log keeps the cap the server is known to accept, so sending slows down
    instead of stopping until the log has drained to the new rate. With `limit=None` it only
    keeps the log, so the achieved rate can still be measured. Log entries are
    `[time, cost, alive]` lists so a lease can correct its own cost later.
    """

    BURST_COSTS = 2.0  # the bucket holds at least two typical requests

    def __init__(self, window_s: float, margin: float, limit: float | None) -> None:
        self.window = window_s
        self.typical_cost = 1.0  # recent largest cost, decaying
        self.span = window_s * (1.0 + margin)
        self.limit: float | None = None
        self.rate = 0.0
        self.level = 0.0
        self.last: float | None = None
        self.log: deque[list[float]] = deque()
        self.total = 0.0
        # a member of a shared limit: what others sent that still binds us, and the room for
        # ours and theirs together (`set_others`); None: no such bound
        self.room: float | None = None
        self.others: deque[tuple[float, float]] = deque()
        self.others_total = 0.0
        self.set_limit(limit, limit, None)

    @property
    def capacity(self) -> float:
        """About a second's worth (1/60 of a window), and at least two typical requests.

        Two, so that a wake-up that comes a little late (a busy event loop, compressed
        time) is caught up instead of lost; the log still caps every window.
        """
        return max(self.BURST_COSTS * self.typical_cost, self.rate / 60.0)

    def set_limit(self, limit: float | None, rate: float | None, now: float | None) -> None:
        """Cap the log at `limit` per span and refill the bucket at `rate` (<= limit)."""
        if now is not None:
            self._refill(now)
        self.limit = limit
        if limit is None:
            self.rate, self.last = 0.0, None
            return
        self.rate = min(limit, rate if rate is not None else limit)
        if self.last is None:
            self.level = self.capacity  # a fresh bucket starts with its (small) burst
        else:
            self.level = min(self.level, self.capacity)

    def _refill(self, now: float) -> None:
        if self.limit is None:
            return
        if self.last is None:
            self.last, self.level = now, self.capacity
            return
        self.level = min(self.capacity, self.level + (now - self.last) * self.rate / self.span)
        self.last = max(self.last, now)

    def _prune(self, now: float) -> None:
        cutoff = now - self.span
        while self.log and self.log[0][0] <= cutoff:
            entry = self.log.popleft()
            self.total -= entry[1]
            entry[2] = 0.0
        if not self.log:
            self.total = 0.0  # no float drift left behind
        while self.others and self.others[0][0] <= cutoff:
            self.others_total -= self.others.popleft()[1]
        if not self.others:
            self.others_total = 0.0

    def delay(self, now: float, cost: float) -> float:
        """Seconds until `cost` may be taken (0 = now)."""
        self._prune(now)
        if self.limit is None:
            return 0.0
        self._refill(now)
        need = min(cost, self.capacity)
        wait = 0.0 if self.level >= need else (need - self.level) * self.span / self.rate
        if self.log and self.total + cost > self.limit + 1e-9:
            # Wait for the oldest entries to leave the span; a cost above the whole
            # limit goes alone, once the log is empty.
            excess = min(self.total + cost - self.limit, self.total)
            freed = 0.0
            for t, c, _ in self.log:
                freed += c
                if freed >= excess - 1e-9:
                    wait = max(wait, t + self.span - now)
                    break
        if self.room is not None:
            wait = max(wait, self._room_wait(now, cost))
        return wait

    def _room_wait(self, now: float, cost: float) -> float:
        """Seconds until ours and the others' entries leave room for `cost` (oldest first; a
        cost above the whole room goes alone, as in `delay`)."""
        held = self.total + self.others_total
        excess = min(held + cost - self.room, held)  # type: ignore[operator]
        if excess <= 1e-9:
            return 0.0
        freed = 0.0
        for t, c in heapq.merge(((e[0], e[1]) for e in self.log), self.others):
            freed += c
            if freed >= excess - 1e-9:
                return max(0.0, t + self.span - now)
        return 0.0  # float drift: everything held is less than the excess

    def take(self, now: float, cost: float) -> list[float]:
        self.typical_cost = max(cost, 0.95 * self.typical_cost, 1.0)
        if self.limit is not None:
            self._refill(now)
            self.level -= cost
        entry = [now, float(cost), 1.0]
        self.log.append(entry)
        self.total += cost
        return entry

    def set_others(self, room: float | None, entries: list[tuple[float, float]]) -> None:
        """Bound ours and others' together: whatever we take, our log's entries and `entries`
        (others' costs at moments past, which the server counts until they leave the span)
        stay within `room` (None: no bound). Replaces what was set before."""
        self.room = room
        self.others = deque(sorted((float(t), float(c)) for t, c in entries))
        self.others_total = sum(c for _, c in self.others)

    def adjust(self, entry: list[float], cost: float) -> None:
        """Correct an earlier charge to what it really cost (refund or extra debt)."""
        delta = cost - entry[1]
        entry[1] = float(cost)
        if entry[2]:
            self.total += delta
        if self.limit is not None:
            self.level = min(self.capacity, self.level - delta)

    def count_within(self, now: float) -> int:
        """Entries in the last `window` seconds (the log keeps a little more: the margin).

        The log is in time order, so only its head, the margin's few entries, is walked:
        without a limit it holds a whole window, and counting it all on every acquire
        cost O(requests per window) each (0.4 ms at 1,000 a window).
        """
        self._prune(now)
        cutoff = now - self.window
        older = 0
        for t, _, _ in self.log:
            if t > cutoff:
                break
            older += 1
        return len(self.log) - older
