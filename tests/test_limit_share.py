"""Runs that use the same endpoint and key share one limit through the Prefect server they are
configured with (`ernie_batch.scale.limit_share`, rules in `ernie_batch.scale.shares`): shares
by demand, changed without waiting a window, and two runs at once stay under it together.

Against Prefect's test harness (a real server: the Variables are real) and the simulator on
loopback; the window is compressed to seconds and the members' refresh with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.bench import max_in_any_window
from ernie_batch.bench._http import warm_server
from ernie_batch.scale import limit_share
from ernie_batch.scale.limit_share import LimitShare, limit_digest
from ernie_batch.scale.shares import FLOOR, HEADROOM, Member, Sent, allocate, portion
from tests.conftest import TEST_KEY
from tests.test_chaos import make_corpus, write_config

WINDOW_S = 2.0
PER_WINDOW = 24  # 720 a minute in the simulator's terms


class Paced:
    """A member's budget as it was told, when: shares, holds, renewals, the others' tails."""

    def __init__(self, waiting: float = 1.0, rate: float = 0.0, window_s: float = WINDOW_S) -> None:
        self.waiting = waiting  # requests waiting in it (> 0: it wants all it can get)
        self.rate, self.window_s = rate, window_s  # it sends `rate` a second, steadily
        self.shares: list[tuple[float, float]] = []  # (when, share: 0 while held)
        self.renewals: list[float] = []
        self.others: list[tuple[float, list, list]] = []

    def share(self, at: float | None = None) -> float:
        told = [s for t, s in self.shares if at is None or t <= at]
        return told[-1] if told else 0.0

    def set_share(self, fraction: float) -> None:
        self._told(fraction)

    def hold(self, seconds: float) -> None:
        if seconds == math.inf:
            self._told(0.0)

    def _told(self, share: float) -> None:
        if not self.shares or self.shares[-1][1] != share:
            self.shares.append((time.time(), share))

    def renew(self, seconds: float) -> None:
        self.renewals.append(seconds)

    def sent(self) -> list[tuple[float, float]]:
        now = time.time()
        return [(now - (i + 0.5) / self.rate, 0.0)
                for i in reversed(range(int(self.window_s * self.rate)))] if self.rate else []

    def set_others(self, room: float, requests: list, tokens: list) -> None:
        self.others.append((room, requests, tokens))

    def snapshot(self) -> dict[str, float]:
        return {"waiting": self.waiting}


def member(name: str, paced: Paced, key: str = TEST_KEY,
           per_window: float = PER_WINDOW) -> LimitShare:
    return LimitShare("http://api.test/v1", SecretStr(key), name, paced.window_s, paced,
                      (per_window, None))


def test_the_limit_is_named_by_endpoint_and_key_never_by_the_key_itself():
    a = limit_digest("https://api.aimlapi.com/v1", SecretStr(TEST_KEY))
    assert a == limit_digest("https://api.aimlapi.com/v1/", SecretStr(TEST_KEY))
    assert a != limit_digest("https://api.aimlapi.com/v1", SecretStr(TEST_KEY + "x"))
    assert a != limit_digest("https://other.example/v1", SecretStr(TEST_KEY))
    assert TEST_KEY not in member("m", Paced()).name


def test_shares_follow_demand_and_what_nobody_needs_is_spread():
    assert allocate({"a": None, "b": None}) == {"a": 0.5, "b": 0.5}
    lean = allocate({"a": 0.1, "b": None, "c": None})  # a uses a tenth: the others split the rest
    assert lean["a"] == pytest.approx(0.1 * HEADROOM + FLOOR)
    assert lean["b"] == lean["c"] == pytest.approx((1 - lean["a"]) / 2)
    idle = allocate({"a": 0.1, "b": 0.2})  # nobody waits: what is left goes to both
    assert sum(idle.values()) == pytest.approx(1.0) and idle["b"] - idle["a"] == pytest.approx(
        0.1 * HEADROOM)
    assert allocate({"b": None, "a": 0.9}) == {"a": 0.5, "b": 0.5}  # more than even: even
    assert allocate({"a": None}, reserved=0.25) == {"a": 0.75}  # a lapsed member's still counts
    assert allocate({"x": None, "y": 0.3, "z": None}) == allocate({"z": None, "y": 0.3,
                                                                   "x": None})  # same for all


def test_a_members_sends_above_its_cap_are_what_the_others_count():
    now, window_s = 1000.0, 6.0  # 60 slots of 0.1 s
    sends = [(now - 1.95, 10.0), (now - 1.05, 10.0), (now - 1.01, 0.0), (now - 0.05, 5.0)]
    sent = Sent.of(sends, window_s, now)
    assert sum(sent.requests) == 4 and sum(sent.tokens) == 25
    entries = sent.entries("requests", 0.0)  # newest first, each at its slot's end: no earlier
    assert entries == [(now, 1.0), (pytest.approx(now - 1.0), 2.0),
                       (pytest.approx(now - 1.9), 1.0)]
    assert sent.entries("requests", 2.0) == [entries[1][:1] + (1.0,), entries[2]]  # newest 2 off
    assert sent.entries("tokens", 0.0)[0] == (now, 5.0)
    assert sent.entries("tokens", None) == []  # no token limit: nothing binds
    live = Member("m", expires=now + 5, share=0.25, caps=(2.0, None), want=None,
                  window_s=window_s, sent=sent, history=((now - 9, 0.5), (now - 1, 0.25)))
    assert live.tail() == (sent.entries("requests", 2.0), [])
    left = Member("m", expires=now, share=0.0, caps=(0.0, None), want=None, window_s=window_s,
                  sent=sent, left=True, history=((now - 9, 0.5),))
    assert left.tail()[0] == entries and not left.binds(now)  # its whole tail, no share
    lapsed = Member("m", expires=now - 1, share=0.25, caps=(2.0, None), want=None,
                    window_s=window_s)
    assert lapsed.binds(now) and not lapsed.live(now)  # stopped, but counted for a window
    assert Member.of({"name": "m", "value": live.json()}) == live


def test_a_tail_is_paid_by_those_who_took_the_share_it_was_sent_under():
    """A leaver's tail is counted by the members that took its share, each for the part it
    took: two that split it count half each, and together no more than the whole."""
    now, w = 1000.0, 10.0
    leaver = Member("l", expires=now - 2, share=0.0, caps=(0.0, None), want=None, window_s=w,
                    left=True, history=((now - 30, 0.4),))
    lowered = Member("d", expires=now + 9, share=0.1, caps=(1.0, None), want=0.0, window_s=w,
                     history=((now - 30, 0.3), (now - 4, 0.1)))
    assert leaver.released(now) == pytest.approx(0.4)  # it held 0.4 until it left, 2 s ago
    assert leaver.released(now + 8.1) == 0.0  # a window after it left: nothing of it counts
    assert lowered.released(now) == pytest.approx(0.2)
    assert lowered.released(now + 6.1) == 0.0
    others = [leaver, lowered]
    assert portion(0.3, others, now) == pytest.approx(0.5)  # took half of the 0.6 released
    assert portion(0.0, others, now) == 0.0  # took nothing: pays nothing
    assert portion(0.9, others, now) == 1.0  # took more than was released: pays it all
    assert portion(0.1, [Member("x", expires=now + 9, share=0.5, caps=(5.0, None), want=None,
                                window_s=w, history=((now - 30, 0.5),))], now) == 1.0


def applied_total(members: list[Paced]) -> float:
    """The most the members' shares added up to at any moment they changed."""
    moments = sorted(t for p in members for t, _ in p.shares)
    return max((sum(p.share(t) for p in members) for t in moments), default=0.0)


async def until(condition, timeout_s: float) -> float:
    """Seconds until `condition()` held (polled), or the timeout."""
    started = time.monotonic()
    while not condition() and time.monotonic() - started < timeout_s:
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def test_members_share_by_demand_through_the_server_without_waiting_a_window(
        prefect_harness, monkeypatch):
    """At the API's 60 s window: every change of hands takes a few refreshes and server round
    trips (seconds on a busy machine), never the window that equal shares waited."""
    monkeypatch.setattr(limit_share, "REFRESH_S", 0.2)
    window_s, per_window = 60.0, 240.0
    first, second, other_key = (Paced(window_s=window_s) for _ in range(3))
    lean = Paced(waiting=0, rate=1.0, window_s=window_s)  # waits for nothing, sends 1 a second
    lean_need = 1.0 * window_s / per_window * HEADROOM + FLOOR
    took: dict[str, float] = {}

    def join(name: str, paced: Paced, key: str = TEST_KEY) -> LimitShare:
        return member(name, paced, key, per_window)

    async def go() -> None:
        async with join("first", first):
            assert first.share() == 1.0  # alone: all of it as it joins
            async with join("second", second), join("solo", other_key, key="sk-other"):
                took["join"] = await until(lambda: second.share() > 0, window_s)
                async with join("lean", lean):
                    took["lean"] = await until(
                        lambda: lean.share() == pytest.approx(lean_need, rel=0.01) and
                        first.share() == pytest.approx((1 - lean_need) / 2, rel=0.01),
                        window_s)
            took["leave"] = await until(lambda: first.share() == 1.0, window_s)

    asyncio.run(go())
    assert max(took.values()) < window_s / 2, took  # the others lowered, then it rose: no wait
    assert applied_total([first, second, lean]) <= 1.0 + 1e-6  # never more than the whole
    tail = first.others[-1][1]  # the leaver's sends count in its window until they leave it
    assert sum(n for _, n in tail) == 60
    assert [s for _, s in other_key.shares] == [0.0, 1.0, 0.0]  # another key: alone on it
    assert all(0 < s <= limit_share.LEASE_S - limit_share.LEASE_MARGIN_S
               for s in first.renewals) and len(first.renewals) > 1  # a stall stops it


class Board:
    """Prefect's Variables as the members use them, in memory: every read and write waits a
    random few milliseconds (so members race), and the server orders them, as it does."""

    def __init__(self, seed: int) -> None:
        self.values: dict[str, object] = {}
        self.rng = random.Random(seed)

    async def _lag(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.0, 0.03))

    async def create_variable(self, variable) -> None:
        await self._lag()
        self.values[variable.name] = variable.value

    async def update_variable(self, variable) -> None:
        await self.create_variable(variable)

    async def delete_variable_by_name(self, name: str) -> None:
        self.values.pop(name, None)

    async def request(self, method: str, path: str, json: dict):
        await self._lag()
        prefix = json["variables"]["name"]["like_"].rstrip("%")
        found = [{"name": n, "value": v} for n, v in self.values.items() if n.startswith(prefix)]
        return httpx.Response(200, json=found, request=httpx.Request(method, "http://board"))


@pytest.mark.parametrize("seed", [1, 2])
def test_members_joining_leaving_and_idling_never_exceed_the_limit_together(monkeypatch, seed):
    """The whole protocol with real budgets and real time, the server in memory: members join
    one after another, one sends a little and waits for nothing, two leave mid-way. Every
    request every member admits, counted as a sliding-window server counts them, stays
    within the limit, and the limit is used while anyone has requests waiting."""
    import prefect.client.orchestration as orchestration

    from ernie_batch.api.limits import RequestBudget

    board = Board(seed)
    monkeypatch.setattr(orchestration, "get_client", lambda: contextlib.nullcontext(board))
    monkeypatch.setattr(limit_share, "REFRESH_S", 0.1)
    window_s, per_window = 2.0, 20
    admitted: list[float] = []

    async def member_run(name: str, start: float, stop: float, pause_s: float = 0.0) -> None:
        await asyncio.sleep(start)
        budget = RequestBudget(rpm=per_window, window_s=window_s,  # per window
                               max_in_flight=0)
        async with LimitShare("http://api.test/v1", SecretStr(TEST_KEY), name, window_s,
                              budget, (float(per_window), None)):
            until_ = time.monotonic() + stop - start
            while (left := until_ - time.monotonic()) > 0:
                try:
                    lease = await asyncio.wait_for(budget.acquire(), left)
                except TimeoutError:
                    break
                admitted.append(time.monotonic())
                lease.release(outcome="ok")
                if pause_s:
                    await asyncio.sleep(pause_s)  # waits for nothing: sated

    async def go() -> float:
        began = time.monotonic()
        await asyncio.gather(member_run("a", 0.0, 4.0), member_run("b", 0.4, 7.0),
                             member_run("lean", 1.0, 7.0, pause_s=0.5),
                             member_run("c", 2.5, 7.0), member_run("d", 3.0, 5.5))
        return began

    began = asyncio.run(go())
    assert max_in_any_window(admitted, window_s) <= per_window
    busy = [t for t in admitted if 0.5 <= t - began <= 6.5]  # while someone waited
    # and not far under it (a guard, not a benchmark: the lean member's headroom goes unused)
    assert len(busy) >= 0.8 * per_window * 6.0 / window_s, len(busy)


@pytest.mark.slow  # tens of seconds: the default tier stays under 10 minutes
@pytest.mark.parametrize("offset_s", [0.0, 1.5])
def test_two_runs_of_one_key_at_once_stay_under_its_limit_together(
        prefect_harness, monkeypatch, sim_factory, api_env, tmp_path, offset_s):
    from flows.ingest import ingest

    monkeypatch.setattr(limit_share, "REFRESH_S", 0.3)
    sim = sim_factory(latency_s=0.05, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
    warm_server(sim)  # a cold one admits its first requests late: a burst in its window
    configs, units = [], 0
    for name in ("a", "b"):
        units += make_corpus(tmp_path / name / "in", images=40, pdf_pages=2, seed=ord(name))
        config = write_config(tmp_path / name / "job.toml", tmp_path / name / "in",
                              tmp_path / name / "out", sim.url, concurrency=4)
        config.write_text(config.read_text().replace(
            "rpm = 6000", f"rpm = {PER_WINDOW * 60 / WINDOW_S}\nwindow_s = {WINDOW_S}"))
        configs.append(config)

    async def both() -> list[dict]:
        async def one(config: Path, delay: float) -> dict:
            await asyncio.sleep(delay)
            return await ingest(config_path=str(config), overrides={})
        return await asyncio.gather(one(configs[0], 0.0), one(configs[1], offset_s))

    summaries = asyncio.run(both())
    assert [s["outcome"] for s in summaries] == ["completed"] * 2
    book = sim.ledger()
    times = [e["at"] for e in book["entries"]]
    assert len(times) == units and book["stats"].get("rate_limited", 0) == 0
    assert max_in_any_window(times, WINDOW_S) <= PER_WINDOW  # together, never over it
    for name in ("a", "b"):
        pages = store.read_table(tmp_path / name / "out", "pages").to_pandas()
        assert (pages["status"] == "ok").all()

