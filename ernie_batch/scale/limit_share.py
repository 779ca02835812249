"""One API limit for every run that uses the same endpoint and key, through the Prefect server.

A coordinator (its shard runs get their grants from it) and a single run when a Prefect
server is configured are **members** of the limit: each keeps a Prefect Variable
`ernie_limit_<digest>_<run id>` alive and paces at the limit divided by the live members,
equal shares. The digest is of the base URL and of a sha256 of the key: never the key. Each
member writes only its own variable (until when it lives, how many members its share is
for and since when, its window), so members never race.

The sliding window stays safe across changes by evidence, not timing:

* a member lowers its share as soon as it sees another, and says so in its variable;
* a member that joins while others are live sends nothing until every live one says it
  paces for at least as many members and a whole window of theirs has passed since, and a
  window has passed since any other lapsed (its requests still count in it);
* one that left said how many requests it sent in its last window and when the last: a
  newcomer counts them as its own until they leave the window, and starts at once (back to
  back runs of a key do not wait a window for each other);
* a member raises its share only one window after another left;
* a member sends only while its variable lives: each write renews it for two `REFRESH_S`
  of the three it lives, so one that stalls stops sending before the others count it out,
  and joins again (as a newcomer) when it comes back. One that leaves says when, and its
  variable stays a while for newcomers to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import SecretStr

REFRESH_S = 5.0  # how often a member says it lives and counts the others (read when used)
PREFIX = "ernie_limit_"


def limit_digest(base_url: str, key: SecretStr) -> str:
    """What names one limit: the endpoint and the key, the key only as a hash."""
    key_hash = hashlib.sha256(key.get_secret_value().encode()).hexdigest()
    return hashlib.sha256(f"{base_url.rstrip('/')}\0{key_hash}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Member:
    """What a member's variable says (wall-clock seconds)."""

    name: str
    expires: float
    members: int  # its share is 1 / members
    applied_at: float  # since when it paces at that share
    window_s: float
    left: bool = False  # said goodbye (else, once expired: lapsed, stalled or killed)
    recent: int = 0  # when it left: requests it sent in its last window
    last_sent: float | None = None  # and when the last one

    @property
    def tail_until(self) -> float:
        """Until when requests of a member that left still count in the window."""
        return (self.last_sent + self.window_s) if self.recent and self.last_sent else -math.inf

    @classmethod
    def of(cls, variable: dict[str, Any]) -> Member | None:
        value = variable.get("value")
        if not isinstance(value, dict):
            return None
        try:
            last_sent = value.get("last_sent")
            return cls(str(variable["name"]), float(value["expires"]), int(value["members"]),
                       float(value["applied_at"]), float(value["window_s"]),
                       bool(value.get("left", False)), int(value.get("recent") or 0),
                       float(last_sent) if last_sent is not None else None)
        except (KeyError, TypeError, ValueError):
            return None


def room_at(others: list[Member], members: int, now: float) -> float | None:
    """When a newcomer pacing for `members` may start (wall clock); None while a live member
    paces for fewer. A member that left is no reason to wait: its tail is counted instead
    (`LimitShare._join`)."""
    live = [m for m in others if m.expires > now]
    if any(m.members < members for m in live):
        return None
    return max([m.applied_at + m.window_s for m in live]
               + [m.expires + m.window_s for m in others if m.expires <= now and not m.left],
               default=-math.inf)


class Paced(Protocol):
    """What a member paces: a `RequestBudget`, or a coordinator's `Granter`."""

    def set_share(self, fraction: float) -> None: ...  # of the configured limit
    def hold(self, seconds: float) -> None: ...  # send nothing that long (inf: until told)
    def renew(self, seconds: float) -> None: ...  # send for that long only
    def recent(self) -> tuple[int, float | None]: ...  # sent in the last window, the last when
    def occupy(self, count: int, at_wall: float) -> None: ...  # count others' sends as ours


class LimitShare:
    """A run's membership of a shared limit; `async with` it while the run sends."""

    def __init__(self, base_url: str, key: SecretStr, member: str, window_s: float,
                 paced: Paced) -> None:
        self.prefix = f"{PREFIX}{limit_digest(base_url, key)}_"
        self.name = self.prefix + member.lower()
        self.window_s = window_s
        self.paced = paced
        self.members = 1
        self.applied_at = 0.0
        self.expires = 0.0
        self.waiting = False  # a newcomer holding until the others made room
        self._raise_at: float | None = None  # when a higher share may apply (after a leave)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LimitShare:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            self.paced.hold(math.inf)
            await self._write(client)  # seen before we look: two joining at once see each other
            self._join(await self._others(client), time.time())
            await self._write(client)
        self._task = asyncio.create_task(self._refresh())
        return self

    async def __aexit__(self, *exc: object) -> None:
        from prefect.client.orchestration import get_client

        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # unreachable server: it lapses by itself
            async with get_client() as client:
                await self._write(client, left=True)

    def _join(self, others: list[Member], now: float) -> None:
        live = sum(1 for m in others if m.expires > now)
        self.members, self.applied_at, self._raise_at = live + 1, now, None
        self.paced.set_share(1.0 / self.members)
        for m in others:
            if m.left and m.last_sent is not None and m.tail_until > now:
                self.paced.occupy(m.recent, m.last_sent)
        self.waiting = True
        self.paced.hold(math.inf)
        self._check_room(others, now)  # alone, or room already: at once

    async def _refresh(self) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            while True:
                await asyncio.sleep(REFRESH_S)
                try:
                    others = await self._others(client)
                    now = time.time()
                    if now > self.expires:  # we stalled and were counted out: join again
                        self._join(others, now)
                    else:
                        self.observe(sum(1 for m in others if m.expires > now) + 1, now)
                        self._check_room(others, now)
                    await self._write(client)
                except Exception:  # noqa: BLE001 - a server hiccup: keep the share we have
                    continue

    def observe(self, members: int, now: float) -> None:
        """Lower the share at once; raise it only a window after the count fell."""
        if members > self.members:
            self.members, self.applied_at, self._raise_at = members, now, None
            self.paced.set_share(1.0 / members)
        elif members < self.members:
            if self._raise_at is None:
                self._raise_at = now + self.window_s
            elif now >= self._raise_at:
                self.members, self.applied_at, self._raise_at = members, now, None
                self.paced.set_share(1.0 / members)
        else:
            self._raise_at = None

    def _check_room(self, others: list[Member], now: float) -> None:
        if not self.waiting:
            return
        start = room_at(others, self.members, now)
        if start is not None:
            self.waiting = False
            self.paced.hold(max(0.0, start - now))

    async def _write(self, client: Any, left: bool = False) -> None:
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        now = time.time()
        self.expires = now if left else now + 3 * REFRESH_S
        value: dict[str, Any] = {"expires": self.expires, "members": self.members,
                                 "applied_at": self.applied_at, "window_s": self.window_s}
        if left:
            recent, last_sent = self.paced.recent()
            value |= {"left": True, "recent": recent, "last_sent": last_sent}
        try:
            await client.create_variable(VariableCreate(name=self.name, value=value))
        except ObjectAlreadyExists:
            await client.update_variable(VariableUpdate(name=self.name, value=value))
        if not left:
            self.paced.renew(self.expires - now - REFRESH_S)

    async def _others(self, client: Any) -> list[Member]:
        """The other members, live or gone less than a window ago (the older are deleted)."""
        response = await client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": self.prefix + "%"}}, "limit": 200})
        response.raise_for_status()
        now = time.time()
        found = [m for m in map(Member.of, response.json()) if m is not None
                 and m.name.startswith(self.prefix) and m.name != self.name]
        for m in found:
            if m.expires + m.window_s + 3 * REFRESH_S < now:
                with contextlib.suppress(Exception):  # another member may be at it too
                    await client.delete_variable_by_name(m.name)
        return [m for m in found if m.expires + m.window_s >= now]


def run_membership(cfg: Any, key: SecretStr, run_id: str,
                   budget: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    """A single run's membership: when a configured Prefect server is there to share through
    and the run has a limit to share (`limits.rpm` or `limits.tpm`); else nothing."""
    from ernie_batch.prefect_server import shared_server

    limits = cfg.limits
    if not (limits.rpm > 0 or limits.tpm > 0) or not shared_server():
        return contextlib.nullcontext()
    return LimitShare(cfg.api.base_url, key, run_id, limits.window_s, budget)
