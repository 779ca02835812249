"""The request budget shared by every request of a run: RPM, TPM, in-flight cap, 429 handling.

Why it looks like this:

* **Pacing mirrors a sliding-window server.** The vendor does not publish its limiting
  algorithm, so the budget must be safe against the strictest common one: a sliding window
  allowing N requests in *any* window of `window_s`. A token bucket alone admits
  `burst + rate * window` in a window, which exceeds N. So each limit (requests, tokens) is
  a pair: a client-side sliding-window log that never holds more than N within
  `window_s * (1 + WINDOW_MARGIN)` (1.5 %: absorbs the jitter between our clock and the
  server's arrival times, a few ms that matter when tests compress a window to 1 s), and a
  token bucket at that rate whose burst is about a second's worth (`limit / 60`, one second
  of a 60 s window, scaled with `window_s`; at least 2 requests so that a late wake-up of a
  busy event loop is caught up rather than lost), which spreads requests evenly instead of
  letting the log release a whole window at once. At the limit: ~0.985 N per window.
* **Waiting cannot deadlock or starve.** An acquire first takes an in-flight slot (FIFO),
  then passes one FIFO gate where it waits, holding nothing but that slot, for the shared
  pause and both pacers; the gate never waits for a slot. A slow request holds only its
  own slot, so it never holds back the others beyond the cap.
* **Tokens are estimated, then corrected.** A lease is charged `est_tokens * ratio`; `ratio`
  follows actual/estimated from `release(actual_tokens=...)` (first sample, then a moving
  average), and the lease's log entry and the bucket are corrected to the actual count.
* **429s: one shared pause, one decrease per congestion event.** A 429 pauses every sender
  (`retry_after` when the server gives it, else exponential backoff with jitter from one
  "second" up to one window). Only a 429 of a lease acquired after the last event is a new
  event; the other 429s of the same burst only extend the pause by their own Retry-After.
* **Only refusals that follow the rate cost rate** (`refusals.RefusalJudge`): every cut is
  put on trial; when requests sent after it are refused at no smaller share, the refusals
  were sporadic (an aggregator's upstream shedding load): the rate before the trial comes
  back, the pause is lifted, and from then on such refusals cost only their own request's
  wait (the sender's), while their share stays what the learnt share explains. With
  `adaptive` off every 429 is a limit's (pause, no cut).
* **Adaptive rate (AIMD with a learnt bound, like TCP BIC).** On an event the pacing rate
  drops to `DECREASE` (0.8) times the rate achieved in the window before the refused
  request (with no limit configured, this is how the limit is discovered: unlimited until
  the first 429), and that count becomes the bound; the log keeps capping windows just under
  the bound, so sending slows down at once without stopping dead. After each run of
  successes (a tenth of a window's worth) the rate climbs half-way to just under the bound;
  there it holds for two windows, then probes above it, one step per window of successes,
  the step doubling while no 429 comes (an underestimate is recovered quickly). Never above
  the configured `rpm`, never cut below `FLOOR` of it. TPM is not adapted: a 429 slows the
  requests, hence the tokens.

"Per minute" means per `window_s` throughout, so every time constant scales when tests
compress time. Not thread-safe: use one event loop. The clock must tick in seconds (waits
are real `asyncio` timers); an injected fake clock suits tests of paths that do not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from ernie_batch.api.lease import OUTCOMES, Lease
from ernie_batch.api.pacer import Pacer
from ernie_batch.api.refusals import RefusalJudge, Verdict
from ernie_batch.api.retry_after import MAX_RETRY_AFTER_S
from ernie_batch.errors import BudgetStopped

__all__ = ["BudgetStopped", "Lease", "RequestBudget"]

class RequestBudget:
    """One per run, shared by all its requests: see the module docstring for the design."""

    WINDOW_MARGIN = 0.015  # a window's log spans 1.5 % more: safety against arrival jitter
    DECREASE = 0.8  # multiplicative decrease on a congestion event
    RUN_FRACTION = 0.1  # successes per increase step, as a fraction of the rate (per window)
    MIN_RUN = 2  # ... and at least this many
    STEP_FRACTION = 0.01  # smallest increase step, as a fraction of the rate
    MIN_STEP = 0.5  # ... and at least this many requests per window
    MIN_RATE = 1.0  # never below one request per window
    FLOOR = 0.5  # ... nor below this fraction of the configured rate
    PROBE_HOLD = 2.0  # windows of successes just under the bound before probing above it
    BACKOFF_BASE = 1.0 / 60.0  # first pause without Retry-After: one second of a 60 s window
    BACKOFF_MAX = 1.0  # longest pause without Retry-After: one whole window
    RATIO_ALPHA = 0.2  # weight of a new sample in the token-estimate correction

    def __init__(self, *, rpm: float = 0.0, tpm: float = 0.0, max_in_flight: int = 16,
                 adaptive: bool = True, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if rpm < 0 or tpm < 0 or not math.isfinite(rpm) or not math.isfinite(tpm):
            raise ValueError("rpm and tpm must be finite and >= 0 (0 = off)")
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        self._configured_rpm = float(rpm) if rpm > 0 else None
        self._tpm = float(tpm) if tpm > 0 else None
        self._full = (self._configured_rpm, self._tpm)  # before any share (set_share)
        self._cap = max_in_flight if max_in_flight > 0 else None
        self._adaptive = adaptive
        self._window = float(window_s)
        self._clock = clock
        self._rng = rng or random.Random()

        self._requests = Pacer(self._window, self.WINDOW_MARGIN, self._configured_rpm)
        self._tokens = Pacer(self._window, self.WINDOW_MARGIN, self._tpm)
        self._rate = self._configured_rpm  # the enforced rate; None = unlimited
        self._bound = self._configured_rpm  # upper bound learnt from the last 429 burst
        self._probe = 0.0
        self._successes = 0
        self._event_seq = 0  # leases with a smaller seq belong to an earlier congestion event
        self._backoff_k = 0
        self._pause_until = -math.inf
        self._held_until = -math.inf  # hold(): other runs of the key make room first
        self._valid_until = math.inf  # renew(): a shared limit's membership still holds
        self._ratio = 1.0
        self._ratio_samples = 0
        self._judge = RefusalJudge()
        self._refused_at: deque[float] = deque()  # when refused leases were admitted (a window)
        self._before_trial: tuple[float | None, float | None, float, int] | None = None

        self._seq = 0
        self._born = clock()  # a run younger than a window has sent less than its rate
        self._slots_taken = 0
        self._in_flight = 0
        # our own admissions of a window: when, and their token charge (corrected on release)
        self._sent: deque[tuple[float, list[float] | None]] = deque()
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._gate = asyncio.Lock()
        self._gate_waiting = 0
        self._waker: asyncio.Future[None] | None = None
        self._stopped = False

        self._stats = {"acquired": 0, "pauses": 0, "events": 0}

    # ---- public interface -------------------------------------------------------------

    async def acquire(self, est_tokens: int = 0) -> Lease:
        """Wait for the shared pause, an in-flight slot, the request and token pacers."""
        self._check_stopped()
        await self._take_slot()
        try:
            self._gate_waiting += 1
            try:
                async with self._gate:
                    return await self._pass_gate(max(0, int(est_tokens)))
            finally:
                self._gate_waiting -= 1
        except BaseException:
            self._free_slot()
            raise

    def try_acquire(self, est_tokens: int = 0) -> Lease | None:
        """A lease now, if nothing waits before us and the pause, the in-flight cap and both
        pacers allow one; else None (never waits). For an owner that polls, such as the
        coordinator handing out a shared limit."""
        if self._stopped or self._slot_waiters or self._gate_waiting:
            return None
        if self._cap is not None and self._slots_taken >= self._cap:
            return None
        now = self._clock()
        wait, cost = self._wait(now, est_tokens)
        if wait > 0:
            return None
        self._slots_taken += 1
        return self._admit(now, max(0, int(est_tokens)), cost)

    @contextlib.asynccontextmanager
    async def lease(self, est_tokens: int = 0) -> AsyncIterator[Lease]:
        """`async with budget.lease(n) as lease:` acquire, and release on the way out."""
        acquired = await self.acquire(est_tokens)
        async with acquired:
            yield acquired

    def release(self, lease: Lease, *, outcome: str, actual_tokens: int | None = None,
                retry_after: float | None = None) -> None:
        """Hand a lease back; the outcome steers the pause and the adaptive rate."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        if lease._budget is not self:
            raise ValueError("lease belongs to another budget")
        if lease._released:
            raise RuntimeError("lease released twice")
        lease._released = True
        self._in_flight -= 1
        self._free_slot()
        now = self._clock()

        if actual_tokens is not None and actual_tokens >= 0:
            if lease._token_entry is not None:
                self._tokens.adjust(lease._token_entry, actual_tokens)
            if outcome == "ok" and lease.est_tokens > 0:
                sample = min(20.0, max(0.05, actual_tokens / lease.est_tokens))
                self._ratio = sample if self._ratio_samples == 0 else (
                    self._ratio + self.RATIO_ALPHA * (sample - self._ratio))
                self._ratio_samples += 1

        if outcome == "ok":
            self._backoff_k = 0
            if self._judge.answered(lease._seq, False, lease.started_at):
                self._restore(now)
            self._on_success(lease)
        elif outcome == "rate_limited":
            self._judge.answered(lease._seq, True, lease.started_at)
            self._on_rate_limited(lease, now, retry_after)
            self._refused_at.append(lease.started_at)
        self._wake()

    def stop(self) -> None:
        """Every waiting and future acquire raises BudgetStopped at once."""
        self._stopped = True
        while self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_exception(BudgetStopped("the run is stopping"))
        self._wake()

    def set_share(self, fraction: float) -> None:
        """Pace at `fraction` of the configured limits: the rest is other runs' using the
        same key (`ernie_batch.scale.limit_share`), from the next admission on."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError("a share is a fraction in (0, 1]")
        now = self._clock()
        full_rpm, full_tpm = self._full
        if full_rpm is not None and self._configured_rpm is not None:
            old, new = self._configured_rpm, full_rpm * fraction
            self._configured_rpm = new
            # a bound or a rate learnt under the old limit still holds when it is lower
            self._bound = new if self._bound is None or self._bound >= old else \
                min(self._bound, new)
            rate = new if self._rate is None or self._rate >= old else min(self._rate, new)
            self._set_rate(rate, now)
        if full_tpm is not None:
            self._tpm = full_tpm * fraction
            self._tokens.set_limit(self._tpm, self._tpm, now)
        self._wake()

    def renew(self, seconds: float) -> None:
        """Admit for the next `seconds` only, unless renewed again: a member of a shared
        limit that stalls stops sending before the others count it out."""
        self._valid_until = self._clock() + seconds
        self._wake()

    def _lapsed(self, now: float) -> float:
        return math.inf if now >= self._valid_until else 0.0

    def hold(self, seconds: float) -> None:
        """Admit nothing for `seconds` from now (`math.inf`: until told again), replacing an
        earlier hold: a member of a shared limit with no share yet."""
        self._held_until = self._clock() + seconds
        self._wake()

    def sent(self) -> list[tuple[float, float]]:
        """Our own requests admitted in the last window, oldest first: (wall-clock time, tokens
        charged). What a member of a shared limit tells the others, as the server still counts
        them (`ernie_batch.scale.shares`)."""
        now = self._clock()
        self._forget_sent(now)
        wall = time.time() - now
        return [(wall + t, entry[1] if entry is not None else 0.0) for t, entry in self._sent]

    def _forget_sent(self, now: float) -> None:
        while self._sent and self._sent[0][0] <= now - self._window:
            self._sent.popleft()

    def set_others(self, room: float,
                   requests: list[tuple[float, float]], tokens: list[tuple[float, float]]) -> None:
        """Others' sends that still bind us, for a member of a shared limit: whatever we admit,
        ours and `requests` (tokens: `tokens`), (wall-clock time, cost) pairs that the server
        counts until they leave its window, stay within `room` (a fraction) of the configured
        limits. Replaces what was set before."""
        wall = time.time() - self._clock()
        full_rpm, full_tpm = self._full
        for pacer, full, entries in ((self._requests, full_rpm, requests),
                                     (self._tokens, full_tpm, tokens)):
            if full is not None:
                pacer.set_others(full * room, [(t - wall, c) for t, c in entries])
        self._wake()

    @property
    def current_rpm(self) -> float | None:
        """Requests per window now enforced; None while unlimited (nothing configured or learnt)."""
        return self._rate

    @property
    def refusals(self) -> tuple[int, int]:
        """(429s attributed to a limit, 429s that did not follow the rate) so far."""
        return self._judge.limit, self._judge.sporadic

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def stopped(self) -> bool:
        return self._stopped

    def snapshot(self) -> dict[str, float]:
        """Numbers for a progress display (current_rpm 0.0 = unlimited)."""
        return {
            "current_rpm": self._rate or 0.0,
            "configured_rpm": self._configured_rpm or 0.0,
            "in_flight": float(self._in_flight),
            "waiting": float(len(self._slot_waiters) + self._gate_waiting),
            "acquired": float(self._stats["acquired"]),
            "pauses": float(self._stats["pauses"]),
            "paused_for": max(0.0, self._pause_until - self._clock()),
            "rate_limited": float(self._judge.limit),
            "refused_sporadic": float(self._judge.sporadic),
            "congestion_events": float(self._stats["events"]),
            "tokens_ratio": self._ratio,
        }

    # ---- waiting ----------------------------------------------------------------------

    def _check_stopped(self) -> None:
        if self._stopped:
            raise BudgetStopped("the run is stopping")

    async def _take_slot(self) -> None:
        """An in-flight slot, first come first served; a freed slot is handed over directly."""
        if self._cap is None or (self._slots_taken < self._cap and not self._slot_waiters):
            self._slots_taken += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._free_slot()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._slot_waiters.remove(fut)
            raise

    def _free_slot(self) -> None:
        self._slots_taken -= 1
        while self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                self._slots_taken += 1
                fut.set_result(None)
                return

    def _wait(self, now: float, est_tokens: int) -> tuple[float, float]:
        """(seconds until a request of `est_tokens` may go: pause, hold, lapse, both pacers;
        its token cost)."""
        cost = est_tokens * self._ratio if self._tpm is not None else 0.0
        wait = max(self._pause_until - now, self._held_until - now, self._lapsed(now),
                   self._requests.delay(now, 1.0))
        if cost > 0:
            wait = max(wait, self._tokens.delay(now, cost))
        return wait, cost

    async def _pass_gate(self, est_tokens: int) -> Lease:
        """Holding the gate: wait until the pause is over and both pacers admit, then admit."""
        while True:
            self._check_stopped()
            now = self._clock()
            wait, cost = self._wait(now, est_tokens)
            if wait <= 0:
                return self._admit(now, est_tokens, cost)
            await self._sleep(min(wait, self._window))  # woken early by any change

    def _admit(self, now: float, est_tokens: int, cost: float) -> Lease:
        self._requests.take(now, 1.0)
        lease = Lease(est_tokens=est_tokens, started_at=now, _budget=self, _seq=self._seq,
                      _window_count=self._requests.count_within(now))
        self._seq += 1
        if cost > 0:
            lease._charged = cost
            lease._token_entry = self._tokens.take(now, cost)
        self._forget_sent(now)
        self._sent.append((now, lease._token_entry))
        self._in_flight += 1
        self._stats["acquired"] += 1
        return lease

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when anything changes (release, pause, rate, stop)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waker = fut
        handle = loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._waker = None

    def _wake(self) -> None:
        if self._waker is not None:
            _resolve(self._waker)

    # ---- adapting ---------------------------------------------------------------------

    def _pause(self, now: float, seconds: float) -> None:
        if now + seconds > self._pause_until:
            if self._pause_until < now:
                self._stats["pauses"] += 1
            self._pause_until = now + seconds

    def _on_rate_limited(self, lease: Lease, now: float, retry_after: float | None) -> None:
        if not self._adaptive:
            self._judge.limit += 1
        else:
            verdict = self._judge.refused(lease._seq, lease.started_at,
                                          stale=lease._seq < self._event_seq)
            if verdict is Verdict.SPORADIC:
                return
            if verdict is Verdict.RESTORE:
                self._restore(now)
                return
        if retry_after is not None and retry_after >= 0:
            self._pause(now, min(retry_after, MAX_RETRY_AFTER_S))
        if lease._seq < self._event_seq:
            return  # same burst as an event already handled
        self._event_seq = self._seq
        self._stats["events"] += 1
        if retry_after is None or retry_after < 0:
            delay = min(self.BACKOFF_MAX, self.BACKOFF_BASE * 2.0 ** self._backoff_k) * self._window
            self._pause(now, delay * (0.5 + 0.5 * self._rng.random()))  # "equal jitter"
            self._backoff_k = min(self._backoff_k + 1, 30)
        if not self._adaptive:
            return
        # requests per window achieved before the refused one. A run younger than a window
        # has not shown its rate yet: measure it against the pacing rate instead (else one
        # early 429 would cut a 600/min run to a handful a minute); when discovering from
        # unlimited, the burst it just sent is the measure
        young = lease.started_at - self._born < self._window
        # ... counting only what the server accepted: a window that held refusals says less
        count = float(lease._window_count - self._refused_within(lease.started_at))
        achieved = max(1.0, self._rate if (young and self._rate is not None) else count)
        if young and self._rate is None and self._cap is not None:
            # a few requests refused at the very start are no measure of a limit: at least
            # the in-flight cap's worth, or a random first refusal stalls a whole window
            achieved = max(achieved, float(self._cap))
        bound = achieved if self._rate is None else min(self._rate, achieved)
        # in a run's first window nothing has left it: a request sent after the refused one
        # went at a higher count, so it already tells what a higher rate does
        if self._judge.open(self._seq, now, self._window,
                            (lease._seq + 1, self._born + self._window) if young else None):
            self._before_trial = (self._rate, self._bound, self._probe, self._successes)
        floor = self.FLOOR * self._configured_rpm if self._configured_rpm else self.MIN_RATE
        self._bound = max(self.MIN_RATE, bound)
        self._set_rate(max(floor, self.MIN_RATE, self.DECREASE * bound), now)
        self._successes = 0
        self._probe = 0.0

    def _refused_within(self, at: float) -> int:
        """Refused leases admitted in the window ending at `at` (older ones forgotten)."""
        while self._refused_at and self._refused_at[0] <= self._clock() - 2 * self._window:
            self._refused_at.popleft()
        return sum(1 for t in self._refused_at if at - self._window < t <= at)

    def _restore(self, now: float) -> None:
        """The trial's cuts did not stop the refusals: back to the rate before it, no pause."""
        assert self._before_trial is not None
        self._rate, self._bound, self._probe, self._successes = self._before_trial
        self._before_trial = None
        self._pause_until = min(self._pause_until, now)
        self._backoff_k = 0
        if self._rate is None:
            self._requests.set_limit(None, None, now)
        else:
            self._set_rate(self._rate, now)

    def _on_success(self, lease: Lease) -> None:
        if not self._adaptive or self._rate is None or lease._seq < self._event_seq:
            return
        rate = self._rate
        if self._configured_rpm is not None and rate >= self._configured_rpm:
            return
        bound = self._bound if self._bound is not None else rate
        target = max(self.MIN_RATE, bound - 1.0)  # the server refused `bound`: just under it
        probing = rate >= target
        self._successes += 1
        if probing:  # hold a while at the bound before the first probe: it was just refused
            run = rate * (self.PROBE_HOLD if self._probe == 0 else 1.0)
        else:
            run = self.RUN_FRACTION * rate
        if self._successes < max(self.MIN_RUN, run):
            return
        self._successes = 0
        min_step = max(self.MIN_STEP, self.STEP_FRACTION * rate)
        if probing:
            self._probe = min(rate, max(min_step, 2.0 * self._probe))
            rate += self._probe
        else:
            rate = min(target, rate + max(min_step, (target - rate) / 2.0))
        self._set_rate(rate, self._clock())

    def _set_rate(self, rate: float, now: float) -> None:
        """Pace at `rate`; cap any window at the most the server is known to accept."""
        cap = max(rate, (self._bound or rate) - 1.0)
        if self._configured_rpm is not None:
            rate = min(rate, self._configured_rpm)
            cap = min(cap, self._configured_rpm)
        self._rate = rate
        self._requests.set_limit(cap, rate, now)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
