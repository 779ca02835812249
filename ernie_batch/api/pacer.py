"""One rate limit paced like a sliding-window server: a window log plus a small token bucket.

See `ernie_batch.limits` for why the request budget paces this way.
"""

from __future__ import annotations

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
        return wait

    def take(self, now: float, cost: float) -> list[float]:
        self.typical_cost = max(cost, 0.95 * self.typical_cost, 1.0)
        if self.limit is not None:
            self._refill(now)
            self.level -= cost
        entry = [now, float(cost), 1.0]
        self.log.append(entry)
        self.total += cost
        return entry

    def occupy(self, at: float, cost: float) -> None:
        """Count `cost` as taken at `at` (a moment past) by someone else: requests of a run that
        left a shared limit, which the server counts until `at + window`."""
        i = len(self.log)
        while i and self.log[i - 1][0] > at:
            i -= 1
        self.log.insert(i, [at, float(cost), 1.0])
        self.total += cost

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
