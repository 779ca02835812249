"""Reading the vendor's usage logs (`GET /v2/logs`): every row of a time window, page by page.

Always with explicit `start` and `end` (never `period`), both statuses, the models asked for,
`limit=100` and offsets: the list is newest first, so the caller keeps `end` at least the
vendor's recording lag in the past, or new rows would shift the pages under the offsets. A
window over 92 days is split into calls of at most 92 days. The endpoint's own limit (200
calls per 60 s) is paced on this side; a 429 is waited out (Retry-After) and asked again.
The key travels only in the client's default headers, as in `client.ApiClient`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import SecretStr

from ernie_batch.api.client import api_message, check_base_url
from ernie_batch.api.pacer import Pacer
from ernie_batch.api.retry_after import parse_retry_after
from ernie_batch.config import ApiOptions
from ernie_batch.errors import NoUsageLogs, UsageLogsError, one_line

MAX_WINDOW = timedelta(days=92)
PAGE_LIMIT = 100
CALLS_PER_WINDOW = 200  # the endpoint's limit: 200 calls per 60 s
LIMIT_WINDOW_S = 60.0
STATUSES = ("succeeded", "failed")
RETRIES = 8  # 429s and 5xx / network trouble in a row before giving up


def logs_url(api: ApiOptions) -> str:
    """`api.usage_logs_url`, or the root of `api.base_url` (its trailing `/v1` removed) + `/v2/logs`."""
    if api.usage_logs_url:
        return api.usage_logs_url
    return api.base_url.rstrip("/").removesuffix("/v1") + "/v2/logs"


def iso(at: datetime) -> str:
    """UTC, to the millisecond, as the vendor writes it: 2026-07-02T03:04:05.000Z."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def windows(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """[start, end] cut into consecutive windows of at most 92 days (one call series each)."""
    out = []
    while True:
        stop = min(end, start + MAX_WINDOW)
        out.append((start, stop))
        if stop >= end:
            return out
        start = stop


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One row of the usage logs: one request, what it was charged, the ids it is known by."""

    inference_id: str
    request_id: str | None
    client_request_id: str | None
    created: datetime
    status: str
    model: str
    origin: str | None
    cost_credits: int
    cost_usd: float
    tokens_input: int
    tokens_output: int
    tokens_total: int

    @classmethod
    def parse(cls, item: Any) -> UsageRow:
        """A row of the response's `data`; ValueError when it lacks what the vendor's schema requires."""
        try:
            cost, tokens = item["cost"] or {}, item.get("tokens") or {}
            created = datetime.fromisoformat(str(item["created"]).replace("Z", "+00:00"))
            return cls(
                inference_id=str(item["inference_id"]), request_id=item.get("request_id"),
                client_request_id=item.get("client_request_id"),
                created=created if created.tzinfo else created.replace(tzinfo=UTC),
                status=str(item["status"]), model=str(item["model"]), origin=item.get("origin"),
                cost_credits=int(cost["credits"]), cost_usd=float(cost.get("usd") or 0.0),
                tokens_input=int(tokens.get("input") or 0),
                tokens_output=int(tokens.get("output") or 0),
                tokens_total=int(tokens.get("total") or 0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a usage-log row without {exc}") from None


class UsageLogsClient:
    """`GET /v2/logs` on one pooled connection, paced to the endpoint's limit."""

    def __init__(self, url: str, api_key: SecretStr, *, timeout_s: float = 60.0,
                 allow_insecure_http: bool = False,
                 transport: httpx.AsyncBaseTransport | None = None,
                 calls_per_window: int = CALLS_PER_WINDOW, window_s: float = LIMIT_WINDOW_S,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        check_base_url(url, allow_insecure_http)
        self.url = url
        self.calls = 0  # GET requests sent (pages, and the retries of refused ones)
        self.rate_limited = 0
        self._pacer = Pacer(window_s, 0.02, float(calls_per_window))
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {api_key.get_secret_value()}"},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)), transport=transport)

    def __repr__(self) -> str:
        return f"UsageLogsClient(url={self.url!r}, api_key='**********')"

    async def __aenter__(self) -> UsageLogsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def rows(self, start: datetime, end: datetime, models: Iterable[str]) -> list[UsageRow]:
        """Every row created in [start, end] for `models`, both statuses, once each (by inference id)."""
        found: dict[str, UsageRow] = {}
        for lo, hi in windows(start, end):
            offset = 0
            while True:
                params: list[tuple[str, str | int]] = [
                    ("start", iso(lo)), ("end", iso(hi)), ("limit", PAGE_LIMIT),
                    ("offset", offset), *(("status", s) for s in STATUSES),
                    *(("model", m) for m in sorted(set(models)))]
                data, more = self._page(await self._get(params))
                for row in data:
                    found.setdefault(row.inference_id, row)
                if not more or not data:
                    break
                offset += len(data)
        return list(found.values())

    def _page(self, response: httpx.Response) -> tuple[list[UsageRow], bool]:
        try:
            body = response.json()
            rows = [UsageRow.parse(item) for item in body["data"]]
            return rows, bool(body["pagination"]["has_more"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageLogsError(f"{self.url}: unreadable usage-logs page: {one_line(exc)}") from None

    async def _get(self, params: list[tuple[str, str | int]]) -> httpx.Response:
        """One page: paced, 429s waited out, 5xx and network trouble retried; errors raised."""
        trouble = 0
        while True:
            await self._pace()
            self.calls += 1
            try:
                response = await self._http.get(self.url, params=params)
            except httpx.HTTPError as exc:
                trouble += 1
                if trouble > RETRIES:
                    raise UsageLogsError(f"{self.url}: {type(exc).__name__}: {one_line(exc)}") from None
                await self._sleep(min(30.0, 0.5 * 2 ** trouble))
                continue
            code = response.status_code
            if code == 200:
                return response
            if code == 429 or code >= 500:
                trouble += 1
                self.rate_limited += code == 429
                if trouble > RETRIES:
                    raise UsageLogsError(f"{self.url}: HTTP {code} after {RETRIES} retries")
                wait = parse_retry_after(response.headers)
                await self._sleep(wait if wait is not None else min(30.0, 0.5 * 2 ** trouble))
                continue
            message = api_message(response)
            if code == 404:
                raise NoUsageLogs(f"{self.url}: the endpoint has no usage logs (HTTP 404: "
                                  f"{message}); reconcile needs the AI/ML API's GET /v2/logs")
            raise UsageLogsError(f"{self.url}: HTTP {code}: {message}")

    async def _pace(self) -> None:
        while (wait := self._pacer.delay(time.monotonic(), 1.0)) > 0:
            await self._sleep(wait)
        self._pacer.take(time.monotonic(), 1.0)


