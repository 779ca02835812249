"""RequestBudget behaviour: windows never over the limit, shared pauses, AIMD, stop, headers.

Pure asyncio, no HTTP. Timing tests run in real time on a compressed window (window_s of
0.5-1 s) and assert counts per window, which the budget guarantees by construction; the
throughput assertions have wide margins for a loaded CI machine. Logic tests use a frozen
or hand-advanced clock, where every acquire must complete without waiting.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from ernie_batch.api.limits import BudgetStopped, Lease, RequestBudget
from ernie_batch.api.retry_after import MAX_RETRY_AFTER_S, parse_retry_after
from ernie_batch.bench import max_in_any_window

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def now_or_fail(awaitable: Awaitable[T]) -> T:
    """With a fake clock nothing may wait: fail fast instead of hanging."""
    return await asyncio.wait_for(awaitable, 1.0)




def max_weight_in_any_window(events: list[tuple[float, float]], window: float) -> float:
    events = sorted(events)
    best, lo, total = 0.0, 0, 0.0
    for t, w in events:
        total += w
        while events[lo][0] <= t - window:
            total -= events[lo][1]
            lo += 1
        best = max(best, total)
    return best


async def hammer(budget: RequestBudget, duration: float, workers: int,
                 body: Callable[[Lease], Awaitable[None]] | None = None,
                 est_tokens: int = 0) -> list[float]:
    """Acquire as fast as the budget allows for `duration`; return the acquisition times."""
    times: list[float] = []
    deadline = time.monotonic() + duration

    async def worker() -> None:
        while time.monotonic() < deadline:
            lease = await budget.acquire(est_tokens)
            if lease.started_at >= deadline:
                budget.release(lease, outcome="ok")
                return
            times.append(lease.started_at)
            if body is None:
                budget.release(lease, outcome="ok")
            else:
                await body(lease)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return times


# ---- request rate ---------------------------------------------------------------------


def test_rpm_never_exceeded_in_any_sliding_window_and_nearly_reached() -> None:
    window, rpm, windows = 0.5, 30.0, 4

    async def main() -> list[float]:
        budget = RequestBudget(rpm=rpm, max_in_flight=0, window_s=window)
        return await hammer(budget, window * windows, workers=8)

    times = run(main())
    assert max_in_any_window(times, window) <= rpm
    assert len(times) >= 0.95 * rpm * windows  # ~0.985 by design; CI lag is absorbed


def test_rpm_with_latency_and_in_flight_cap() -> None:
    """Slow requests (latency ~ a tenth of the window) still leave the window full."""
    window, rpm = 0.5, 40.0

    async def main() -> list[float]:
        budget = RequestBudget(rpm=rpm, max_in_flight=16, window_s=window)

        async def body(lease: Lease) -> None:
            await asyncio.sleep(0.05)
            budget.release(lease, outcome="ok")

        return await hammer(budget, window * 4, workers=32, body=body)

    times = run(main())
    assert max_in_any_window(times, window) <= rpm
    assert len(times) >= 0.9 * rpm * 4


def test_burst_is_about_a_second_worth() -> None:
    """With time frozen, only the bucket's small burst goes out, not the whole window."""

    async def main() -> int:
        clock = FakeClock()
        budget = RequestBudget(rpm=600.0, max_in_flight=0, clock=clock)  # burst = 600/60 = 10
        granted = 0
        with pytest.raises(TimeoutError):
            while True:
                await asyncio.wait_for(budget.acquire(), 0.05)
                granted += 1
        return granted

    assert run(main()) == 10


# ---- token rate -----------------------------------------------------------------------


def test_tpm_respected_with_estimates_corrected_from_usage() -> None:
    """Estimates are half the truth: after the first usage report, the real tokens fit."""
    window, tpm = 0.5, 2000.0

    async def main() -> tuple[list[tuple[float, float]], float]:
        budget = RequestBudget(tpm=tpm, max_in_flight=0, window_s=window)
        events: list[tuple[float, float]] = []

        async def body(lease: Lease) -> None:
            events.append((lease.started_at, 100.0))
            budget.release(lease, outcome="ok", actual_tokens=100)

        await hammer(budget, window * 3, workers=1, body=body, est_tokens=50)
        return events, budget.snapshot()["tokens_ratio"]

    events, ratio = run(main())
    assert ratio == pytest.approx(2.0)
    assert max_weight_in_any_window(events, window) <= tpm
    assert len(events) >= 0.9 * (tpm / 100) * 3


def test_token_ratio_follows_usage() -> None:
    async def main() -> list[float]:
        budget = RequestBudget(tpm=1e9, clock=FakeClock())
        ratios = []
        for actual in (300, 100, 100):
            lease = await now_or_fail(budget.acquire(100))
            budget.release(lease, outcome="ok", actual_tokens=actual)
            ratios.append(budget.snapshot()["tokens_ratio"])
        lease = await now_or_fail(budget.acquire(100))
        assert lease._charged == pytest.approx(100 * ratios[-1])
        budget.release(lease, outcome="error")
        return ratios

    ratios = run(main())
    assert ratios[0] == pytest.approx(3.0)  # the first sample replaces the guess
    assert ratios[0] > ratios[1] > ratios[2] > 1.0  # later ones move it gradually


# ---- in-flight cap --------------------------------------------------------------------


def test_in_flight_cap_and_no_head_of_line_blocking() -> None:
    async def main() -> tuple[int, int, int]:
        budget = RequestBudget(max_in_flight=3)
        peak = 0
        slow_released = asyncio.Event()
        fast_done_while_slow = 0

        async def slow() -> None:
            async with await budget.acquire():
                await asyncio.sleep(0.5)
            slow_released.set()

        async def fast() -> None:
            nonlocal peak, fast_done_while_slow
            for _ in range(20):
                async with await budget.acquire():
                    peak = max(peak, budget.in_flight)
                    await asyncio.sleep(0.001)
                if not slow_released.is_set():
                    fast_done_while_slow += 1

        slow_task = asyncio.create_task(slow())
        await asyncio.sleep(0)
        await asyncio.gather(*(fast() for _ in range(5)), slow_task)
        return peak, fast_done_while_slow, budget.in_flight

    peak, fast_done, left = run(main())
    assert peak <= 3
    assert fast_done == 100  # the slow holder kept one slot; the other two served everyone
    assert left == 0


def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def main() -> int:
        budget = RequestBudget(max_in_flight=1)
        first = await budget.acquire()
        waiter = asyncio.create_task(budget.acquire())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        budget.release(first, outcome="ok")
        second = await asyncio.wait_for(budget.acquire(), 1.0)
        budget.release(second, outcome="ok")
        return budget.in_flight

    assert run(main()) == 0


def test_lease_context_manager_and_double_release() -> None:
    async def main() -> None:
        budget = RequestBudget(max_in_flight=2)
        with pytest.raises(KeyError):
            async with await budget.acquire() as lease:
                assert budget.in_flight == 1
                raise KeyError("boom")
        assert lease.released and budget.in_flight == 0
        async with budget.lease() as lease:
            lease.release(outcome="ok")
        assert budget.in_flight == 0
        with pytest.raises(RuntimeError):
            budget.release(lease, outcome="ok")
        with pytest.raises(ValueError):
            budget.release(await budget.acquire(), outcome="maybe")

    run(main())


# ---- 429: shared pause, decrease, recovery, discovery ---------------------------------


def test_retry_after_pauses_every_sender() -> None:
    pause = 0.3

    async def main() -> tuple[float, list[float]]:
        budget = RequestBudget(max_in_flight=0, adaptive=False)
        completions: list[float] = []
        rate_limited_at: list[float] = []
        stop_at = time.monotonic() + 0.8

        async def worker(i: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                lease = await budget.acquire()
                completions.append(time.monotonic())
                n += 1
                await asyncio.sleep(0.005)
                if i == 0 and n == 5:
                    rate_limited_at.append(time.monotonic())
                    budget.release(lease, outcome="rate_limited", retry_after=pause)
                else:
                    budget.release(lease, outcome="ok")

        await asyncio.gather(*(worker(i) for i in range(6)))
        return rate_limited_at[0], completions

    t429, completions = run(main())
    after = [t for t in completions if t > t429]
    assert after, "senders resumed after the pause"
    assert min(after) >= t429 + pause - 1e-3  # nobody went through during the pause
    assert len([t for t in completions if t < t429]) > 6  # and they were busy before it


def test_backoff_without_retry_after_is_exponential_with_jitter() -> None:
    async def main() -> list[float]:
        clock = FakeClock()
        budget = RequestBudget(max_in_flight=0, clock=clock, rng=random.Random(7),
                               adaptive=False, window_s=60.0)
        pauses = []
        for _ in range(4):
            lease = await now_or_fail(budget.acquire())
            budget.release(lease, outcome="rate_limited")
            pauses.append(budget.snapshot()["paused_for"])
            clock.advance(pauses[-1])
        return pauses

    pauses = run(main())
    for k, p in enumerate(pauses):  # base 1 s (of a 60 s window), doubling, "equal jitter"
        assert 0.5 * 2**k <= p <= 2**k


def test_one_decrease_per_burst_then_additive_recovery_capped_at_rpm() -> None:
    rpm, window = 100.0, 1.0

    async def main() -> tuple[float, float, list[float]]:
        clock = FakeClock()
        budget = RequestBudget(rpm=rpm, max_in_flight=0, window_s=window, clock=clock)

        async def send(outcome: str) -> None:
            rate = math.floor(budget.current_rpm or rpm)  # a window holds whole requests
            clock.advance(window * 1.03 / rate)  # just slower than the budget's pace
            lease = await now_or_fail(budget.acquire())
            budget.release(lease, outcome=outcome, retry_after=0.0)

        for _ in range(150):
            await send("ok")
        clock.advance(window * 1.02 / rpm)
        stale = await now_or_fail(budget.acquire())  # in flight when the 429 burst comes
        await send("rate_limited")
        after_first = budget.current_rpm
        budget.release(stale, outcome="rate_limited", retry_after=0.0)  # same burst: ignored
        after_stale = budget.current_rpm
        clock.advance(0.05 * window)  # the window still holds the burst: let a few expire
        history = []
        for _ in range(1500):
            await send("ok")
            history.append(budget.current_rpm)
        return after_first, after_stale, history

    after_first, after_stale, history = run(main())
    assert after_first is not None
    assert 0.7 * rpm <= after_first <= 0.8 * rpm
    assert after_stale == after_first
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))  # only climbs
    assert max(history) == rpm  # back to the configured rate, never above it
    climbed = next(i for i, r in enumerate(history) if r >= 0.95 * rpm)
    assert climbed < 2 * rpm  # within about two windows of successes


def test_discovery_from_unlimited_sets_rate_from_achieved_window() -> None:
    async def main() -> tuple[float | None, float | None]:
        clock = FakeClock()
        budget = RequestBudget(max_in_flight=0, window_s=1.0, clock=clock)
        before = budget.current_rpm
        for _ in range(39):
            clock.advance(0.01)
            budget.release(await now_or_fail(budget.acquire()), outcome="ok")
        clock.advance(0.01)
        lease = await now_or_fail(budget.acquire())  # the 40th in this window: refused
        budget.release(lease, outcome="rate_limited", retry_after=0.0)
        return before, budget.current_rpm

    before, after = run(main())
    assert before is None
    assert after == pytest.approx(0.8 * 40)


def test_adaptive_discovers_an_unknown_sliding_window_limit() -> None:
    """Against a simulated server allowing `limit` per sliding window, unconfigured."""
    window, limit, latency = 0.5, 30, 0.01

    async def main() -> tuple[list[float], int, int, float | None]:
        budget = RequestBudget(max_in_flight=8, window_s=window)
        accepted: deque[float] = deque()
        ok_times: list[float] = []
        refused = 0
        deadline = time.monotonic() + 8 * window

        async def worker() -> None:
            nonlocal refused
            while time.monotonic() < deadline:
                lease = await budget.acquire()
                await asyncio.sleep(latency / 2)
                now = time.monotonic()
                while accepted and accepted[0] <= now - window:
                    accepted.popleft()
                if len(accepted) < limit:
                    accepted.append(now)
                    ok_times.append(now)
                    await asyncio.sleep(latency / 2)
                    budget.release(lease, outcome="ok")
                else:
                    refused += 1
                    await asyncio.sleep(latency / 2)
                    budget.release(lease, outcome="rate_limited",
                                   retry_after=accepted[0] + window - now)

        await asyncio.gather(*(worker() for _ in range(8)))
        return ok_times, refused, len(ok_times), budget.current_rpm

    ok_times, refused, ok, rate = run(main())
    assert rate is not None and rate <= 1.1 * limit
    assert ok >= 0.8 * limit * 8  # designed for >= 0.9; wide margin for CI
    assert refused <= 0.1 * (ok + refused)  # designed for <= 3 %; the first burst costs ~8


# ---- stop -----------------------------------------------------------------------------


def test_stop_wakes_all_waiters_and_refuses_new_acquires() -> None:
    async def main() -> None:
        budget = RequestBudget(rpm=2.0, max_in_flight=2, window_s=60.0)
        held = [await budget.acquire(), await budget.acquire()]  # slots full, bucket empty
        budget.release(held.pop(), outcome="ok")  # one slot free: next waiter sits at the gate
        waiters = [asyncio.create_task(budget.acquire()) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        budget.stop()
        results = await asyncio.wait_for(
            asyncio.gather(*waiters, return_exceptions=True), 1.0)
        assert all(isinstance(r, BudgetStopped) for r in results)
        with pytest.raises(BudgetStopped):
            await budget.acquire()
        budget.release(held.pop(), outcome="ok")  # in-flight leases still come back
        assert budget.in_flight == 0

    run(main())


# ---- configuration --------------------------------------------------------------------


def test_limits_off_and_validation() -> None:
    async def main() -> int:
        budget = RequestBudget(rpm=0, tpm=0, max_in_flight=0, clock=FakeClock())
        leases = [await now_or_fail(budget.acquire(10_000)) for _ in range(500)]
        assert budget.current_rpm is None
        return len(leases)

    assert run(main()) == 500
    with pytest.raises(ValueError):
        RequestBudget(rpm=-1)
    with pytest.raises(ValueError):
        RequestBudget(window_s=0)


# ---- Retry-After ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # already past
        ({"retry-after-ms": "250"}, 0.25),
        ({"x-ratelimit-reset-requests": "1m30s"}, 90.0),
        ({"x-ratelimit-reset-tokens": "250ms"}, 0.25),
        ({"x-ratelimit-reset": "0.5"}, 0.5),
        ({"x-ratelimit-reset": "1h0m0s"}, MAX_RETRY_AFTER_S),
        ({"x-ratelimit-reset": str(1445412480 + 20)}, 20.0),  # an epoch timestamp
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "6m0s"},
         MAX_RETRY_AFTER_S),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "0",
          "x-ratelimit-reset-tokens": "40s", "x-ratelimit-remaining-tokens": "5000"}, 2.0),
        ({"Retry-After": "999999"}, MAX_RETRY_AFTER_S),
        ({}, None),
        ({"Content-Type": "application/json"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-3"}, None),
        ({"x-ratelimit-reset-requests": "1 minute"}, None),
        ({"x-ratelimit-reset": "5x"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    # 2015-10-21 07:28:00 UTC
    got = parse_retry_after(headers, now=1445412480.0)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_an_early_429_does_not_stall_a_configured_rate() -> None:
    """A random 429 in the first window cuts the configured rate, not the few sent so far."""

    async def main() -> float | None:
        clock = FakeClock()
        budget = RequestBudget(rpm=600, max_in_flight=0, window_s=60.0, clock=clock)
        for _ in range(3):
            clock.advance(0.2)
            budget.release(await now_or_fail(budget.acquire()), outcome="ok")
        clock.advance(0.2)
        lease = await now_or_fail(budget.acquire())
        budget.release(lease, outcome="rate_limited", retry_after=0.0)
        return budget.current_rpm

    assert run(main()) == pytest.approx(0.8 * 600)


def test_a_share_of_the_limit_a_hold_and_a_lapsed_membership() -> None:
    """What a member of a key's shared limit is told (`ernie_batch.scale.limit_share`)."""
    clock = FakeClock()
    budget = RequestBudget(rpm=60, tpm=6000, max_in_flight=0, window_s=60, clock=clock)
    budget.set_share(0.5)
    assert budget.current_rpm == 30 and budget.snapshot()["configured_rpm"] == 30
    budget.set_share(1.0)  # a raise goes back to the configured limit, never above
    assert budget.current_rpm == 60
    with pytest.raises(ValueError):
        budget.set_share(0.0)

    budget.hold(math.inf)  # a newcomer: nothing until the others made room
    assert budget.try_acquire() is None
    clock.now += 3600
    assert budget.try_acquire() is None
    budget.hold(5.0)  # room in 5 s: replaces the earlier hold
    clock.now += 5.0
    assert budget.try_acquire() is not None

    budget.renew(10.0)  # sends for 10 s only, unless renewed
    clock.now += 10.0
    assert budget.try_acquire() is None
    budget.renew(10.0)
    assert budget.try_acquire() is not None


def admitted_now(budget: RequestBudget, clock, step_s: float, most: int = 20) -> int:
    """How many requests the budget admits, one every `step_s` (the bucket paces them)."""
    admitted = 0
    while admitted < most and (lease := budget.try_acquire()) is not None:
        lease.release(outcome="ok")
        admitted += 1
        clock.now += step_s
    return admitted


def test_others_sends_bind_a_member_of_a_shared_limit_until_they_leave_the_window() -> None:
    """What a member of a key's shared limit hands on (its own sends) and what it is told of
    the others (`ernie_batch.scale.shares`): its sends and theirs stay within the room their
    caps leave, and what they sent frees up as it leaves the window, not a window later."""
    clock = FakeClock()
    leaver = RequestBudget(rpm=10, tpm=6000, max_in_flight=0, window_s=60, clock=clock)
    assert leaver.sent() == []  # sent nothing: hands on nothing
    for _ in range(4):
        lease = leaver.try_acquire(est_tokens=50)
        assert lease is not None
        lease.release(outcome="ok", actual_tokens=80)  # corrected to what it cost
        clock.now += 7.0
    sent = leaver.sent()
    assert [tokens for _, tokens in sent] == [80.0] * 4
    assert abs(sent[-1][0] - (time.time() - 7.0)) < 0.5  # wall clock: what the others read

    newcomer = RequestBudget(rpm=10, max_in_flight=0, window_s=60, clock=clock)
    newcomer.set_others(1.0, [(time.time() - 10.0, 8.0)], [])  # a leaver's 8, 10 s ago
    assert admitted_now(newcomer, clock, 7.0) == 10 - 8  # they still count in this window
    clock.now += 50.0  # they left the window (60 s after they were sent)
    assert admitted_now(newcomer, clock, 7.0, most=3) == 3
    assert len(newcomer.sent()) == 3  # its own sends of the last window, never the leaver's

    shared = RequestBudget(rpm=10, max_in_flight=0, window_s=60, clock=clock)
    shared.set_others(0.5, [], [])  # the others' caps hold half the limit
    assert admitted_now(shared, clock, 7.0) == 5
    clock.now += 60.0
    shared.set_others(0.5, [(time.time() - 30.0, 3.0)], [])  # and one sent 3 above its cap
    assert admitted_now(shared, clock, 1.0) == 2
    clock.now += 30.0  # they left the window: room again
    assert shared.try_acquire() is not None


# ---- 429s that do not follow the rate (issue 30) --------------------------------------


class Flow:
    """A concurrency-bound sender on a hand-advanced clock: each lease comes back
    `in_flight * dt` s after it was taken with `answer(lease)` (outcome, retry_after); every
    `dt` a new one is taken if fewer than `in_flight` are out and the budget has one now
    (`try_acquire`, never waiting). Unpaced, that is 1 / dt a second."""

    def __init__(self, budget: RequestBudget, clock: FakeClock, in_flight: int = 20,
                 dt: float = 0.01) -> None:
        self.budget, self.clock, self.in_flight, self.dt = budget, clock, in_flight, dt
        self.flight: deque[Lease] = deque()
        self.rates: list[float | None] = []

    def run(self, steps: int, answer: Callable[[Lease], tuple[str, float | None]]) -> None:
        latency = self.in_flight * self.dt - 1e-9
        for _ in range(steps):
            self.clock.advance(self.dt)
            while self.flight and self.flight[0].started_at + latency <= self.clock.now:
                lease = self.flight.popleft()
                outcome, retry_after = answer(lease)
                self.budget.release(lease, outcome=outcome, retry_after=retry_after)
                self.rates.append(self.budget.current_rpm)
            if len(self.flight) < self.in_flight:
                lease = self.budget.try_acquire()
                if lease is not None:
                    self.flight.append(lease)


def sporadic(share: float, rng: random.Random, retry_after: float = 0.005,
             ) -> Callable[[Lease], tuple[str, float | None]]:
    def answer(lease: Lease) -> tuple[str, float | None]:
        return ("rate_limited", retry_after) if rng.random() < share else ("ok", None)
    return answer


class WindowLimit:
    """A sliding-window server (`limit` accepted per `window` s) that also refuses `share`
    of the requests it accepts into its window at random."""

    def __init__(self, limit: int, window: float, share: float, rng: random.Random) -> None:
        self.limit, self.window, self.share, self.rng = limit, window, share, rng
        self.accepted: deque[float] = deque()
        self.limited = self.total = 0

    def __call__(self, lease: Lease) -> tuple[str, float | None]:
        t = lease.started_at
        self.total += 1
        while self.accepted and self.accepted[0] <= t - self.window:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            self.limited += 1
            return "rate_limited", self.accepted[0] + self.window - t
        self.accepted.append(t)
        return ("rate_limited", 0.005) if self.rng.random() < self.share else ("ok", None)


@pytest.mark.parametrize("rpm", [0.0, 1000.0])
def test_random_refusals_cost_one_trial_then_no_rate(rpm: float) -> None:
    """15 % of requests refused at random from the second window on (100 a window sent):
    one trial, then the rate the run had and no further cut."""

    async def main() -> tuple[RequestBudget, Flow]:
        clock = FakeClock()
        budget = RequestBudget(rpm=rpm, max_in_flight=0, window_s=1.0, clock=clock)
        flow = Flow(budget, clock)
        flow.run(200, sporadic(0.0, random.Random(0)))
        flow.run(3000, sporadic(0.15, random.Random(1)))
        return budget, flow

    budget, flow = run(main())
    stats = budget.snapshot()
    limit, sporadic_refusals = budget.refusals
    assert sporadic_refusals >= 400 and limit <= 0.02 * sporadic_refusals, budget.refusals
    assert stats["congestion_events"] <= 4  # every one of ~450 used to cut the rate
    assert budget.current_rpm == (rpm or None)  # what it had before the trial
    assert flow.rates[-2000:] == [rpm or None] * 2000  # and no cut since


def test_a_first_window_refusal_is_settled_by_the_requests_sent_after_it() -> None:
    """The very first request refused, the ones in flight after it accepted: nothing has
    left the window, so the refusal was not about the count; the pause goes too."""

    async def main() -> tuple[RequestBudget, float | None, float]:
        clock = FakeClock()
        budget = RequestBudget(rpm=600, max_in_flight=0, window_s=60.0, clock=clock)
        leases = [await now_or_fail(budget.acquire()) for _ in range(5)]
        budget.release(leases[0], outcome="rate_limited", retry_after=30.0)
        cut = budget.current_rpm
        for lease in leases[1:]:
            budget.release(lease, outcome="ok")
        return budget, cut, budget.snapshot()["paused_for"]

    budget, cut, paused_for = run(main())
    assert cut == pytest.approx(0.8 * 600)  # handled as a limit's at first
    assert budget.current_rpm == 600 and paused_for == 0.0
    assert budget.refusals == (0, 1)


def test_refusals_that_rise_above_the_learnt_share_are_a_limit_again() -> None:
    """Random refusals learnt, then a limit below the rate appears (another client of the
    key, say): the rate is cut to it and the limit's own refusals become rare."""

    async def main() -> tuple[RequestBudget, WindowLimit, WindowLimit]:
        clock = FakeClock()
        budget = RequestBudget(max_in_flight=0, window_s=1.0, clock=clock)
        flow = Flow(budget, clock)
        flow.run(1000, sporadic(0.15, random.Random(2)))
        early = WindowLimit(60, 1.0, 0.15, random.Random(3))  # 100 a window sent before
        flow.run(1000, early)
        late = WindowLimit(60, 1.0, 0.15, random.Random(4))
        late.accepted = early.accepted
        flow.run(2000, late)
        return budget, early, late

    budget, early, late = run(main())
    assert early.limited > 30  # the limit was met (40 % of what was sent went over it) ...
    assert budget.current_rpm is not None and budget.current_rpm <= 1.5 * 60
    assert late.limited <= 0.1 * late.total  # ... and is held once found


def test_rate_cuts_stop_at_half_the_configured_rate() -> None:
    async def main() -> list[float | None]:
        clock = FakeClock()
        budget = RequestBudget(rpm=100, max_in_flight=0, window_s=1.0, clock=clock)
        flow = Flow(budget, clock, in_flight=5, dt=0.02)
        flow.run(400, lambda lease: ("rate_limited", 0.0))  # every request refused
        return flow.rates

    rates = run(main())
    assert min(r for r in rates if r is not None) == 50.0
    assert rates[-1] == 50.0
