"""Runs that use the same endpoint and key share one limit through the Prefect server they are
configured with (`ernie_batch.scale.limit_share`): two runs at once stay under it together.

Against Prefect's test harness (a real server: the Variables are real) and the simulator on
loopback; the window is compressed to seconds and the members' heartbeat with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.bench import max_in_any_window
from ernie_batch.scale import limit_share
from ernie_batch.scale.limit_share import LimitShare, Member, limit_digest, room_at
from tests.conftest import TEST_KEY
from tests.test_chaos import make_corpus, write_config

WINDOW_S = 2.0
PER_WINDOW = 24  # 720 a minute in the simulator's terms


class Paced:
    """A member's pacing as it was told, when: shares, holds and renewals, in order."""

    def __init__(self, sent: tuple[int, float | None] = (0, None)) -> None:
        self.shares: list[tuple[float, float]] = []
        self.holds: list[tuple[float, float]] = []
        self.renewals: list[tuple[float, float]] = []
        self.occupied: list[tuple[int, float]] = []
        self.sent = sent  # what it says it sent in its last window, and when the last

    def recent(self) -> tuple[int, float | None]:
        return self.sent

    def occupy(self, count: int, at_wall: float) -> None:
        self.occupied.append((count, at_wall))

    def set_share(self, fraction: float) -> None:
        self.shares.append((time.time(), fraction))

    def hold(self, seconds: float) -> None:
        self.holds.append((time.time(), seconds))

    def renew(self, seconds: float) -> None:
        self.renewals.append((time.time(), seconds))

    def fractions(self) -> list[float]:
        return [f for _, f in self.shares]

    def start(self) -> float:
        """When the last hold ends (wall clock)."""
        at, seconds = self.holds[-1]
        return at + seconds


def member(name: str, paced: Paced, base_url: str = "http://api.test/v1",
           key: str = TEST_KEY) -> LimitShare:
    return LimitShare(base_url, SecretStr(key), name, WINDOW_S, paced)


def test_the_limit_is_named_by_endpoint_and_key_never_by_the_key_itself():
    a = limit_digest("https://api.aimlapi.com/v1", SecretStr(TEST_KEY))
    assert a == limit_digest("https://api.aimlapi.com/v1/", SecretStr(TEST_KEY))
    assert a != limit_digest("https://api.aimlapi.com/v1", SecretStr(TEST_KEY + "x"))
    assert a != limit_digest("https://other.example/v1", SecretStr(TEST_KEY))
    assert TEST_KEY not in member("m", Paced()).name


def test_a_share_drops_at_once_and_rises_only_a_window_after_a_member_left():
    paced = Paced()
    share = member("m", paced)
    share.observe(3, now=100.0)
    assert paced.fractions() == [1 / 3]
    share.observe(2, now=101.0)  # one left: its requests still count in this window
    share.observe(2, now=101.0 + WINDOW_S - 0.1)
    assert paced.fractions() == [1 / 3]
    share.observe(2, now=101.0 + WINDOW_S)
    assert paced.fractions() == [1 / 3, 1 / 2]
    share.observe(1, now=200.0)
    share.observe(2, now=200.5)  # back before the window passed: nothing to raise
    share.observe(2, now=300.0)
    assert paced.fractions() == [1 / 3, 1 / 2]


def test_a_newcomer_starts_a_window_after_every_other_member_made_room():
    def other(members: int, applied_at: float, expires: float = 1e12) -> Member:
        return Member("x", expires=expires, members=members, applied_at=applied_at,
                      window_s=WINDOW_S)

    now = 100.0
    assert room_at([], 1, now) == -math.inf
    assert room_at([other(2, 50.0), other(1, 10.0)], 2, now) is None  # one has not seen us
    assert room_at([other(2, 50.0), other(3, 10.0)], 2, now) == 50.0 + WINDOW_S
    gone = other(1, 10.0, expires=99.0)  # lapsed a moment ago: its requests still count
    assert room_at([other(2, 50.0), gone], 2, now) == 99.0 + WINDOW_S
    left = dataclasses.replace(gone, left=True, recent=5, last_sent=98.5)  # said how many
    assert room_at([other(2, 50.0), left], 2, now) == 50.0 + WINDOW_S  # counted, not waited


def test_a_newcomer_counts_a_leavers_tail_and_starts_at_once():
    """Back-to-back runs of one key: the second counts the first's last window as its own
    instead of waiting it out; a tail that already left the window counts for nothing."""
    now = 100.0
    recent = Member("a", expires=99.0, members=1, applied_at=10.0, window_s=WINDOW_S,
                    left=True, recent=5, last_sent=99.5)
    old = dataclasses.replace(recent, name="b", last_sent=now - WINDOW_S - 0.1)
    silent = dataclasses.replace(recent, name="c", recent=0, last_sent=None)
    paced = Paced()
    newcomer = member("new", paced)
    newcomer._join([recent, old, silent], now)
    assert paced.occupied == [(5, 99.5)]
    assert paced.fractions() == [1.0] and paced.holds[-1][1] == 0.0  # alone: at once


def test_members_count_each_other_through_the_server_and_a_newcomer_waits_for_room(
        prefect_harness, monkeypatch):
    monkeypatch.setattr(limit_share, "REFRESH_S", 0.2)

    async def go() -> tuple[Paced, Paced, Paced]:
        first, second, other_key = Paced(), Paced(), Paced()
        async with member("first", first):
            async with member("second", second), member("solo", other_key, key="sk-other"):
                await asyncio.sleep(WINDOW_S + 1.0)  # the first sees the second, then room
            await asyncio.sleep(WINDOW_S + 2.0)  # it left: a window later, all of it again
        return first, second, other_key

    first, second, other_key = asyncio.run(go())
    assert first.holds[-1][1] == 0.0 and first.fractions() == [1.0, 0.5, 1.0]
    lowered_at, raised_at = first.shares[1][0], first.shares[2][0]
    assert second.fractions() == [0.5] and second.holds[0][1] == math.inf
    assert second.start() >= lowered_at + WINDOW_S  # not a moment before the room was there
    assert second.start() <= lowered_at + WINDOW_S + 0.5  # nor long after
    assert raised_at >= second.start() + WINDOW_S  # the leaver's window passed first
    assert other_key.holds[-1][1] == 0.0 and other_key.fractions() == [1.0]  # another limit
    assert all(0 < seconds <= 2 * 0.2 for _, seconds in first.renewals)  # a stall stops it
    assert len(first.renewals) > 10


@pytest.mark.parametrize("offset_s", [0.0, 1.5])
def test_two_runs_of_one_key_at_once_stay_under_its_limit_together(
        prefect_harness, monkeypatch, sim_factory, api_env, tmp_path, offset_s):
    from flows.ingest import ingest

    monkeypatch.setattr(limit_share, "REFRESH_S", 0.3)
    sim = sim_factory(latency_s=0.05, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
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
