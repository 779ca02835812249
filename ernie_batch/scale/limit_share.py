"""One API limit for every run that uses the same endpoint and key, through the Prefect server.

Shard runs of a pool, and single runs on a shared Prefect server, are **members**
of the key's limit: each keeps a Prefect Variable `ernie_limit_<digest>_<run id>` alive and
paces itself with its own `RequestBudget` at its share. The digest is of the base URL and of
a sha256 of the key: never the key. Each member writes only its own variable, so members
never race on a write; how shares follow demand and change hands safely is
`ernie_batch.scale.shares`.

Every `REFRESH_S` a member reads the others, works out everyone's share by demand, lowers
its own at once or raises it after a check, counts the others' tails, and writes what it
now holds, needs and sent. A member alone starts at once; a newcomer among others starts
as soon as one of them has lowered its share for it (a second or two), while they go on
using the limit. A member sends only while its variable lives: each write renews it for
`LEASE_S`, and its budget admits for `LEASE_S - LEASE_MARGIN_S` only, so one that stalls stops
sending before the others count it out, and on coming back joins again with no share. One
that leaves says so, with its sends of the last window: the others take its share at once
and count its tail until it leaves the window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from pydantic import SecretStr

from ernie_batch.scale.shares import EPS, Member, Sent, allocate, held, portion, tails

REFRESH_S = 1.0  # how often a member reads the others and writes its state
LEASE_S = 15.0  # how long a member's variable lives after each write
LEASE_MARGIN_S = 5.0  # its budget stops admitting this long before the variable lapses
DEMAND_S = 4.0  # a member not waiting needs what it sent in this long (at most a window)
PREFIX = "ernie_limit_"

Check = Callable[[Any], Awaitable[None]]  # told the Prefect client before each step


def limit_digest(base_url: str, key: SecretStr) -> str:
    """What names one limit: the endpoint and the key, the key only as a hash."""
    key_hash = hashlib.sha256(key.get_secret_value().encode()).hexdigest()
    return hashlib.sha256(f"{base_url.rstrip('/')}\0{key_hash}".encode()).hexdigest()[:16]


class Paced(Protocol):
    """What a member paces: its `RequestBudget`."""

    def set_share(self, fraction: float) -> None: ...
    def hold(self, seconds: float) -> None: ...  # send nothing that long (inf: until told)
    def renew(self, seconds: float) -> None: ...  # send for that long only
    def sent(self) -> list[tuple[float, float]]: ...  # its last window: (wall time, tokens)
    def set_others(self, room: float, requests: list[tuple[float, float]],
                   tokens: list[tuple[float, float]]) -> None: ...
    def snapshot(self) -> dict[str, float]: ...  # "waiting": requests waiting now


class LimitShare:
    """A run's membership of a shared limit; `async with` it while the run sends.

    `limits` are the configured (whole) requests and tokens per window; `checks` run before
    every step with the Prefect client (a shard run watches for its stop there)."""

    def __init__(self, base_url: str, key: SecretStr, member: str, window_s: float,
                 paced: Paced, limits: tuple[float | None, float | None], *,
                 checks: Sequence[Check] = ()) -> None:
        self.prefix = f"{PREFIX}{limit_digest(base_url, key)}_"
        self.name = self.prefix + member.lower()
        self.window_s = window_s
        self.paced = paced
        self.full = limits
        self.checks = list(checks)
        self.share = 0.0  # applied: what the budget paces at
        self.expires = 0.0
        self._joined = time.time()
        # (since when, share): ours of the last window, the current one last
        self._history: collections.deque[tuple[float, float]] = collections.deque(
            [(self._joined, 0.0)])
        self._said: tuple[float, float | None, float] | None = None  # share, want, when written
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LimitShare:
        from prefect.client.orchestration import get_client

        self._apply(0.0)
        async with get_client() as client:
            await self._write(client, 0.0, hungry=True)  # about to send; seen before we look
            await self._step(client)
        self._task = asyncio.create_task(self._refresh())
        return self

    async def __aexit__(self, *exc: object) -> None:
        from prefect.client.orchestration import get_client

        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._apply(0.0)  # gone: nothing more is sent on our share
        with contextlib.suppress(Exception):  # unreachable server: it lapses by itself
            async with get_client() as client:
                await self._write(client, 0.0, left=True)

    async def _refresh(self) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            while True:
                await asyncio.sleep(REFRESH_S)
                try:
                    if time.time() > self.expires:  # we stalled and were counted out
                        self._apply(0.0)
                        await self._write(client, 0.0)
                    await self._step(client)
                except Exception:  # noqa: BLE001 - a server hiccup: the lease bounds the rest
                    continue

    async def _step(self, client: Any) -> None:
        """Read the others, take the share demand gives us (a raise only once checked),
        count their tails, say what we hold."""
        for check in self.checks:
            await check(client)
        others = await self._others(client)
        now = time.time()
        wants = {m.name: m.want for m in others if m.live(now)} | {self.name: self._want(now)}
        target = allocate(wants, sum(m.share for m in others if m.binds(now) and
                                     not m.live(now)))[self.name]
        if target < self.share - EPS:
            self._apply(target, others, now)
        elif (target := min(target, 1.0 - held(others, now))) > self.share + EPS:
            await self._write(client, target)  # our claim first, then look again
            others = await self._others(client)
            now = time.time()
            if held(others, now) + target <= 1.0 + EPS:
                self._apply(target, others, now)
        self._count_others(others, now)
        if self._news(time.time()):
            await self._write(client, self.share)

    def _news(self, now: float) -> bool:
        """Whether our variable is worth writing: a share or a demand the others have not seen,
        or a lease to renew. Our sends since we last wrote are within our cap: the others
        need not see them (`shares`)."""
        if self._said is None:
            return True
        share, want, at = self._said
        new_want = self._want(now)
        return (share != self.share or now - at > REFRESH_S + (LEASE_S - LEASE_MARGIN_S) / 3
                or (want is None) != (new_want is None)
                or (want is not None and new_want is not None and abs(new_want - want) > 0.05))

    def _want(self, now: float) -> float | None:
        """None while requests wait (or, just joined, before the first one could); else the
        part of the limit we used lately."""
        horizon = min(DEMAND_S, self.window_s)
        sent = self.paced.sent()
        if (self.paced.snapshot().get("waiting", 0.0) > 0
                or (not sent and now - self._joined < horizon)):
            return None
        recent = [cost for at, cost in sent if at > now - horizon]
        used = (len(recent), sum(recent))  # requests, tokens
        return max((n * self.window_s / horizon / full
                    for n, full in zip(used, self.full, strict=True) if full), default=0.0)

    def _apply(self, share: float, others: list[Member] | None = None,
               now: float = 0.0) -> None:
        if share != self.share:
            self._history.append((time.time(), share))
        self.share = share
        if others is not None:
            self._count_others(others, now)
        if share > EPS:
            self.paced.set_share(min(1.0, share))
            self.paced.hold(0.0)
        else:
            self.paced.hold(math.inf)

    def _count_others(self, others: list[Member], now: float) -> None:
        """Our share bounds ours and our portion of the others' tails together."""
        gained = self.share - min(share for _, share in self._window_history(now))
        requests, tokens = tails(others, portion(gained, others, now))
        self.paced.set_others(self.share, requests, tokens)

    def _window_history(self, now: float) -> tuple[tuple[float, float], ...]:
        """(since when, share) of the shares we held within the last window, current last."""
        while len(self._history) > 1 and self._history[1][0] <= now - self.window_s:
            self._history.popleft()  # one that ended before the window began
        return tuple(self._history)

    async def _write(self, client: Any, share: float, left: bool = False,
                     hungry: bool = False) -> None:
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        now = time.time()
        expires = now if left else now + LEASE_S
        caps = tuple(full * share if full else None for full in self.full)
        want = None if left or hungry else self._want(now)
        member = Member(self.name, expires, share, caps, want,  # type: ignore[arg-type]
                        self.window_s, Sent.of(self.paced.sent(), self.window_s, now), left,
                        self._window_history(now))  # applied shares, never an unchecked claim
        try:
            await client.create_variable(VariableCreate(name=self.name, value=member.json()))
        except ObjectAlreadyExists:
            await client.update_variable(VariableUpdate(name=self.name, value=member.json()))
        self.expires, self._said = expires, (share, want, now)
        if not left:
            self.paced.renew(LEASE_S - LEASE_MARGIN_S - (time.time() - now))

    async def _others(self, client: Any) -> list[Member]:
        """The other members whose share or tail still counts (the older are deleted)."""
        response = await client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": self.prefix + "%"}}, "limit": 200})
        response.raise_for_status()
        now = time.time()
        found = [m for m in map(Member.of, response.json()) if m is not None
                 and m.name.startswith(self.prefix) and m.name != self.name]
        for m in found:
            if m.expires + m.window_s + LEASE_S < now:
                with contextlib.suppress(Exception):  # another member may be at it too
                    await client.delete_variable_by_name(m.name)
        return [m for m in found if m.expires + m.window_s >= now]


def configured_limits(cfg: Any) -> tuple[float | None, float | None]:
    """The config's whole limits per window (requests, tokens); None: not limited."""
    limits, per_window = cfg.limits, cfg.limits.window_s / 60.0
    return (limits.rpm * per_window or None, limits.tpm * per_window or None)


def membership(cfg: Any, key: SecretStr, run_id: str, budget: Any, *,
               checks: Sequence[Check] = ()) -> LimitShare:
    """A run's membership of its key's limit, pacing `budget`."""
    return LimitShare(cfg.api.base_url, key, run_id, cfg.limits.window_s, budget,
                      configured_limits(cfg), checks=checks)


def run_membership(cfg: Any, key: SecretStr, run_id: str,
                   budget: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    """A single run's membership: when a Prefect server others use too (configured, or the
    home's) is there to share through and the run has a limit to share (`limits.rpm` or
    `limits.tpm`); else nothing."""
    from ernie_batch.prefect_server import shared_server

    limits = cfg.limits
    if not (limits.rpm > 0 or limits.tpm > 0) or not shared_server():
        return contextlib.nullcontext()
    return membership(cfg, key, run_id, budget)
