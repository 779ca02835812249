"""The simulator's usage logs: `GET /v2/logs` as the vendor documents it (shared/API-FACTS.md).

One row per request that reached the model (billed ones `succeeded`, failed ones at cost 0),
visible `SimSettings.logs_lag_s` after it was charged, as the vendor's are. The endpoint
checks its parameters as the vendor does (400 for `period` with `start`, a window over 92
days, a comma-separated `status`, a `limit` outside 1-100), keeps its own rate limit (200
requests per 60 s, answered 429 with Retry-After), and pages newest first.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request

from ernie_batch.sim.validation import ApiError, bad_request
from ernie_batch.sim.window import SlidingWindow, retry_after

MAX_WINDOW = timedelta(days=92)
STATUSES = ("succeeded", "failed")
_PERIOD = re.compile(r"([1-9][0-9]*)([hd])")


@dataclass(frozen=True)
class LogRow:
    """One request as the vendor's usage logs show it."""

    created: float  # epoch seconds: when the request arrived
    visible_at: float  # epoch seconds: when the row appears in the logs
    status: str
    model: str
    credits: int
    usd: float
    tokens_input: int
    tokens_output: int
    request_id: str | None
    inference_id: str
    client_request_id: str | None
    origin: str = "api"

    def as_json(self) -> dict[str, Any]:
        return {
            "created": iso_ms(self.created), "status": self.status, "origin": self.origin,
            "model": self.model, "cost": {"usd": self.usd, "credits": self.credits},
            "tokens": {"input": self.tokens_input, "output": self.tokens_output,
                       "total": self.tokens_input + self.tokens_output},
            "request_id": self.request_id, "inference_id": self.inference_id,
            "client_request_id": self.client_request_id,
        }


def iso_ms(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _instant(name: str, value: str) -> datetime:
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"{name}: not an ISO-8601 date or time: {value!r}") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # no offset: UTC


def _integer(params: Any, name: str, default: int, lo: int, hi: int | None) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name}: expected an integer, received {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise bad_request(f"{name}: must be between {lo} and {hi}" if hi is not None
                          else f"{name}: must be {lo} or more")
    return value


def window_of(params: Any, now: datetime) -> tuple[datetime, datetime]:
    """The [start, end] a query asks for: `period`, or both `start` and `end`, never both."""
    period, start, end = params.get("period"), params.get("start"), params.get("end")
    if period is not None and (start is not None or end is not None):
        raise bad_request("Provide either period or both start and end, never both")
    if period is not None:
        m = _PERIOD.fullmatch(period.strip())
        if not m:
            raise bad_request(f"period: expected a positive integer followed by h or d, "
                              f"received {period!r}")
        span = timedelta(hours=int(m.group(1))) if m.group(2) == "h" else timedelta(
            days=int(m.group(1)))
        if span > MAX_WINDOW:
            raise bad_request("period: the window must not exceed 92 days")
        return now - span, now
    if start is None or end is None:
        raise bad_request("Provide either period or both start and end")
    lo, hi = _instant("start", start), _instant("end", end)
    if hi < lo:
        raise bad_request("end: must not be earlier than start")
    if hi - lo > MAX_WINDOW:
        raise bad_request("the window must not exceed 92 days")
    return lo, hi


def _model_matches(model: str, wanted: list[str]) -> bool:
    alias = model.split("/", 1)[-1]
    return any(w == model or w == alias for w in wanted)


class UsageLogs:
    """The rows and the endpoint; `authorized` is the simulator's key check."""

    def __init__(self, limit: int, window_s: float,
                 authorized: Callable[[Request], bool]) -> None:
        self.rows: list[LogRow] = []
        self.window = SlidingWindow(limit * 60.0 / window_s, 0.0, window_s)
        self.authorized = authorized

    def add(self, row: LogRow) -> None:
        self.rows.append(row)

    def clear(self) -> None:
        self.rows.clear()

    def query(self, params: Any, now: float) -> dict[str, Any]:
        """The page a query asks for (ApiError 400 when its parameters are wrong)."""
        lo, hi = window_of(params, datetime.fromtimestamp(now, UTC))
        statuses = params.getlist("status")
        for status in statuses:
            if status not in STATUSES:
                raise bad_request(f"status: must be one of succeeded, failed; received {status!r}")
        models = params.getlist("model")
        limit = _integer(params, "limit", 50, 1, 100)
        offset = _integer(params, "offset", 0, 0, None)
        lo_s, hi_s = lo.timestamp(), hi.timestamp()
        found = [r for r in self.rows
                 if r.visible_at <= now and lo_s <= _ms(r.created) <= hi_s
                 and (not statuses or r.status in statuses)
                 and (not models or _model_matches(r.model, models))]
        found.sort(key=lambda r: r.created, reverse=True)  # newest first
        page = found[offset:offset + limit]
        return {"data": [r.as_json() for r in page],
                "pagination": {"limit": limit, "offset": offset, "total": len(found),
                               "has_more": offset + len(page) < len(found)}}

    def answer(self, request: Request) -> dict[str, Any]:
        """The endpoint's 200 body; ApiError (401, 429, 400) otherwise."""
        if not self.authorized(request):
            raise ApiError(401, "Unauthorized: invalid or missing API key", "unauthorized")
        wait = self.window.try_admit(time.monotonic(), 0)
        if wait is not None:
            raise ApiError(429, "Too many requests: rate limit exceeded, retry later",
                           "logs_rate_limited", {"Retry-After": retry_after(wait)})
        return self.query(request.query_params, time.time())


def _ms(epoch: float) -> float:
    """Epoch seconds at the millisecond the logs show (so a row's own `created` selects it)."""
    return math.floor(epoch * 1000) / 1000
