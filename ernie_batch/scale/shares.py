"""How the members of one API limit share it: shares by demand, and a hand-over that needs no
wait. Pure functions over what members publish (`limit_share` carries it through Prefect).

Each member publishes its **share** (a fraction of the limit), its **caps** at that share
(requests and tokens per window), its **demand** (None while requests wait in its budget:
it takes what it gets; else the fraction it used lately) and what it **sent** in its last
window (a histogram). Safety rests on two rules, not on timing:

* a member lowers its share at once and says so after; it raises one only after writing
  the higher share and reading every other's again: of two members raising at once, one
  sees the other's claim (the server orders writes and reads), so the published shares
  never add up to more than the whole;
* whatever a member admits, its own requests of the window plus every other member's
  requests above that member's cap (its sends under an earlier, higher share) fit in the
  room the others' caps leave (`RequestBudget.set_others`). A member that left has cap 0:
  its whole tail counts until it leaves the window, and the others take the rest at once.

Tails are paid by whoever took the share they were sent under, in proportion: each member
publishes its shares of the last window, so the others know what it released, and a
member that raised its share within the window counts the part of every tail it took
(`portion`: what it gained over what all the others released). Two members that split a
leaver's share thus each count half its tail, not all of it: together they stay within the
limit (`RequestBudget.set_others` checks ours plus our portion of the tails against our
share) and still use all of it while the tail leaves the window.

A member that lapsed (its variable expired: stalled, killed) keeps its share and its tail
for one more window: it stopped sending before it expired, but the server still counts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SLOTS = 60  # a window's sends in 60 slots: a few hundred characters in a Prefect Variable
HEADROOM = 1.25  # a member not waiting gets what it used lately, and this much more
FLOOR = 0.02  # ... and at least this much of the limit, so demand that comes back is seen
EPS = 1e-6


@dataclass(frozen=True)
class Sent:
    """A member's sends of its last window: per slot (newest first) requests and tokens, each
    slot's sends counted at its end (later than they were: they leave the window later)."""

    end: float  # wall clock: the end of slot 0
    slot_s: float
    requests: tuple[int, ...]
    tokens: tuple[int, ...]

    @classmethod
    def of(cls, sent: list[tuple[float, float]], window_s: float, now: float) -> Sent:
        """From `RequestBudget.sent()`: (wall time, tokens) of each request of the window."""
        slot_s = window_s / SLOTS
        requests, tokens = [0] * SLOTS, [0.0] * SLOTS
        for at, cost in sent:
            k = min(SLOTS - 1, max(0, int((now - at) / slot_s)))
            requests[k] += 1
            tokens[k] += cost
        return cls(now, slot_s, tuple(requests), tuple(math.ceil(t) for t in tokens))

    def entries(self, kind: str, above: float | None) -> list[tuple[float, float]]:
        """(wall time, cost) of the `requests` or `tokens` sent beyond the newest `above`
        (None: none beyond: nothing binds a member without that limit)."""
        if above is None:
            return []
        out, skip = [], above
        for k, cost in enumerate(getattr(self, kind)):
            taken = min(skip, cost)
            skip -= taken
            if cost - taken > 0:
                out.append((self.end - k * self.slot_s, float(cost - taken)))
        return out

    def json(self) -> dict[str, Any]:
        return {"end": self.end, "slot": self.slot_s, "n": _trim(self.requests),
                "tok": _trim(self.tokens)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Sent:
        def full(xs: list[int]) -> tuple[int, ...]:
            return tuple([*map(int, xs), *[0] * (SLOTS - len(xs))][:SLOTS])
        return cls(float(value["end"]), float(value["slot"]), full(value["n"]),
                   full(value["tok"]))


def _trim(xs: tuple[int, ...]) -> list[int]:
    out = list(xs)
    while out and not out[-1]:
        out.pop()
    return out


@dataclass(frozen=True)
class Member:
    """What a member's variable says (wall-clock seconds)."""

    name: str
    expires: float
    share: float  # of the limit: what it may use now (or is about to, once checked)
    caps: tuple[float | None, float | None]  # (requests, tokens) per window at that share
    want: float | None  # None: requests wait in its budget; else the fraction it needs
    window_s: float
    sent: Sent | None = None
    left: bool = False
    history: tuple[tuple[float, float], ...] = ()  # (since when, share) of its last window

    def released(self, now: float) -> float:
        """The share it gave up within the window before `now`: the highest it held in it,
        less what it holds (nothing, once it left)."""
        ends = [since for since, _ in self.history[1:]] + [self.expires if self.left else now]
        peak = max((share for (_, share), end in zip(self.history, ends, strict=True)
                    if end > now - self.window_s), default=0.0)
        return max(0.0, peak - (0.0 if self.left else self.share))

    def live(self, now: float) -> bool:
        return not self.left and self.expires > now

    def binds(self, now: float) -> bool:
        """Its share still counts: live, or lapsed less than a window ago."""
        return not self.left and self.expires + self.window_s > now

    def tail(self) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Its sends the others must count beside its cap: those above its caps (all of a
        member that left)."""
        if self.sent is None:
            return [], []
        caps = (0.0, 0.0) if self.left else self.caps
        return self.sent.entries("requests", caps[0]), self.sent.entries("tokens", caps[1])

    def json(self) -> dict[str, Any]:
        return {"expires": self.expires, "share": self.share, "caps": list(self.caps),
                "want": self.want, "window_s": self.window_s, "left": self.left,
                "history": [[round(t, 2), round(x, 6)] for t, x in self.history],
                "sent": self.sent.json() if self.sent is not None else None}

    @classmethod
    def of(cls, variable: dict[str, Any]) -> Member | None:
        """From a Prefect Variable (`name`, `value`); None when it is not one of ours."""
        value = variable.get("value")
        if not isinstance(value, dict):
            return None
        try:
            caps = value["caps"]
            sent = value.get("sent")
            want = value.get("want")
            return cls(str(variable["name"]), float(value["expires"]), float(value["share"]),
                       (_num(caps[0]), _num(caps[1])), _num(want), float(value["window_s"]),
                       Sent.from_json(sent) if sent else None, bool(value.get("left", False)),
                       tuple((float(t), float(x)) for t, x in value.get("history") or ()))
        except (KeyError, IndexError, TypeError, ValueError):
            return None


def _num(x: Any) -> float | None:
    return None if x is None else float(x)


def allocate(wants: dict[str, float | None], reserved: float = 0.0) -> dict[str, float]:
    """Max-min fair shares of `1 - reserved` by demand: a member that needs less than an even
    split gets what it needs (`need`); those that wait for requests split the rest evenly;
    what nobody needs is spread evenly on top. Deterministic: every member computes the same."""
    left = max(0.0, 1.0 - reserved)
    needs = {m: need(w) for m, w in wants.items()}
    out: dict[str, float] = {}
    open_ = sorted(needs)
    while open_:
        fair = left / len(open_)
        sated = [m for m in open_ if needs[m] is not None and needs[m] <= fair]  # type: ignore[operator]
        if not sated:
            out.update({m: fair for m in open_})
            return out
        for m in sated:
            out[m] = needs[m]  # type: ignore[assignment]
            left -= out[m]
        open_ = [m for m in open_ if m not in sated]
    spare = left / len(out) if out else 0.0
    return {m: share + spare for m, share in out.items()}


def need(want: float | None) -> float | None:
    """What a member is given for its demand (None: as much as it can get)."""
    return None if want is None else min(1.0, want * HEADROOM + FLOOR)


def held(others: list[Member], now: float) -> float:
    """The part of the limit the others' shares hold (live, or lapsed within a window)."""
    return sum(m.share for m in others if m.binds(now))


def portion(gained: float, others: list[Member], now: float) -> float:
    """The part of the others' tails a member pays: what it `gained` (its share over its
    lowest of the last window) over what they released; all of them when they released
    nothing it could have taken (a tail is never left unpaid)."""
    released = sum(m.released(now) for m in others)
    return 1.0 if released <= EPS else min(1.0, max(0.0, gained) / released)


def tails(others: list[Member], part: float = 1.0,
          ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """`part` of every other member's sends above its cap: (requests, tokens) entries."""
    requests: list[tuple[float, float]] = []
    tokens: list[tuple[float, float]] = []
    for m in others:
        r, t = m.tail()
        requests += [(at, n * part) for at, n in r]
        tokens += [(at, n * part) for at, n in t]
    return requests, tokens
