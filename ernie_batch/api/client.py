"""The AI/ML API client: one keep-alive httpx.AsyncClient, every response classified.

`complete()` never raises for anything the server or the network does: it returns a
`CallResult` whose `outcome` tells the dispatcher what to do (retry, fall back, stop).
The key lives only in the client's default headers; no repr, error or log carries it.
Each request carries its `X-Client-Request-Id`; the response's headers are read before its
body, so the cost headers (`x-aimlapi-credits-used`) still count when the body is then lost.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from ernie_batch.api.retry_after import parse_retry_after
from ernie_batch.config import CREDITS_PER_USD, whole_credits
from ernie_batch.errors import ConfigError, one_line
from ernie_batch.vocab import AttemptOutcome, CreditsSource

FATAL_CODES = {401: "invalid or missing API key", 403: "out of credits or forbidden",
               404: "wrong endpoint or base URL"}
REQUEST_ID_HEADER = "X-Client-Request-Id"


@dataclass(slots=True)
class CallResult:
    outcome: AttemptOutcome
    status_code: int | None
    started_at: datetime
    latency_s: float
    content: str | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    credits: float = 0.0
    usd: float = 0.0
    retry_after: float | None = None
    error: str | None = None  # one line
    unreachable: bool = False  # the host did not resolve or refused the connection
    inference_id: str | None = None  # x-inference-id: what the vendor's logs know it by
    credits_source: CreditsSource | None = None  # None: no cost known
    cost_mismatch: bool | None = None  # body and header both known and different


@dataclass(frozen=True, slots=True)
class HeaderCost:
    """The tracing and cost headers of one response (each None when not sent)."""

    inference_id: str | None
    credits: float | None
    usd: float | None

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> HeaderCost:
        return cls(headers.get("x-inference-id") or None,
                   _number(headers.get("x-aimlapi-credits-used")),
                   _number(headers.get("x-aimlapi-usd-spent")))

    def apply(self, res: CallResult) -> CallResult:
        """Stamp the inference id on `res`; its cost from these headers unless its body gave one."""
        res.inference_id = self.inference_id
        if self.credits is None:
            return res
        if res.credits_source == CreditsSource.BODY:
            res.cost_mismatch = whole_credits(res.credits) != whole_credits(self.credits)
        else:
            res.credits, res.credits_source = self.credits, CreditsSource.HEADER
            res.usd = self.usd if self.usd is not None else self.credits / CREDITS_PER_USD
        return res


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class Probe:
    """What the balance call said before a run: a problem that must stop it, or the balance."""

    problem: str | None = None  # one line: unreachable host, rejected key
    balance: float | None = None  # credits, when the endpoint tells


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str, allow_insecure_http: bool) -> None:
    """Refuse to send the key in clear text to another machine unless explicitly allowed."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"api.base_url: not an http(s) URL: {base_url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_insecure_http:
        raise ConfigError(
            f"api.base_url: refusing to send the API key over plain HTTP to {parts.hostname} "
            "(use https, or set api.allow_insecure_http = true)"
        )


def api_message(response: httpx.Response) -> str:
    """The one line an API error response says (its JSON `message`, else its text)."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text or response.reason_phrase)
    if isinstance(body, dict):
        msg = body.get("message") or body.get("error") or body
        if isinstance(msg, dict):
            msg = msg.get("message") or json.dumps(msg)
        return one_line(str(msg))
    return one_line(str(body))


def parse_completion(
        body: Any) -> tuple[str, str | None, str | None, int, int, float | None, float | None]:
    """(content, finish_reason, id, prompt, completion tokens, credits, usd); ValueError if malformed.

    Credits are None when the body carries no `meta.usage.credits_used` (usd then too).
    """
    if not isinstance(body, dict):
        raise ValueError("response is not a JSON object")
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("response has no choices[0].message.content") from None
    if content is None:
        content = ""
    if not isinstance(content, str):
        content = json.dumps(content)
    usage = body.get("usage") or {}
    meta = (body.get("meta") or {}).get("usage") or {}
    used = meta.get("credits_used")
    credits = float(used) if used is not None else None
    usd_spent = meta.get("usd_spent")
    usd = (float(usd_spent) if usd_spent is not None
           else credits / CREDITS_PER_USD if credits is not None else None)
    return (
        content,
        choice.get("finish_reason"),
        body.get("id"),
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        credits,
        usd,
    )


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verifying context, made once a process: loading the CA bundle costs
    0.05-0.15 s of CPU, and a run makes a client for its probe, then one for its requests."""
    return httpx.create_ssl_context()


class ApiClient:
    """POST /chat/completions and GET /billing/balance on one pooled connection set."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_connections: int = 16,
        allow_insecure_http: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the network (tests mount the simulator with httpx.ASGITransport)."""
        check_base_url(base_url, allow_insecure_http)
        self.base_url = base_url.rstrip("/")
        # the pool never makes a request wait: one connection per request in flight
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=None)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key.get_secret_value()}"},
            limits=limits,
            timeout=timeout,
            transport=transport,
            verify=tls_context() if transport is None else True,
        )

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r}, api_key='**********')"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, body: dict[str, Any], request_id: str | None = None) -> CallResult:
        """One chat-completions request; `request_id` goes out as `X-Client-Request-Id`."""
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        try:
            async with self._http.stream("POST", "/chat/completions", json=body,
                                         headers=headers) as response:
                cost = HeaderCost.of(response.headers)
                try:
                    await response.aread()
                except httpx.HTTPError as exc:  # the headers arrived, the body did not
                    error = f"body lost after the headers ({type(exc).__name__}: {exc})"
                    return cost.apply(self._fail(AttemptOutcome.TRANSPORT_ERROR,
                                                 response.status_code, started, t0, error))
        except httpx.TimeoutException as exc:
            error = f"timeout ({type(exc).__name__})"
            return self._fail(AttemptOutcome.TRANSPORT_ERROR, None, started, t0, error)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            result = self._fail(AttemptOutcome.TRANSPORT_ERROR, None, started, t0, error)
            result.unreachable = isinstance(exc, httpx.ConnectError)
            return result
        return cost.apply(self._classify(response, started, t0))

    def _fail(self, outcome: AttemptOutcome, code: int | None, started: datetime, t0: float,
              error: str, retry_after: float | None = None) -> CallResult:
        return CallResult(outcome, code, started, time.perf_counter() - t0,
                          error=one_line(error), retry_after=retry_after)

    def _classify(self, response: httpx.Response, started: datetime, t0: float) -> CallResult:
        code = response.status_code
        if code == 200:
            try:
                content, finish, rid, pt, ct, credits, usd = parse_completion(response.json())
            except ValueError as exc:
                return self._fail(AttemptOutcome.TRANSPORT_ERROR, code, started, t0,
                                  f"unreadable 200 response: {exc}")
            res = CallResult(AttemptOutcome.OK, code, started, time.perf_counter() - t0,
                             content=content, finish_reason=finish, response_id=rid,
                             prompt_tokens=pt, completion_tokens=ct)
            if credits is not None:
                res.credits, res.usd, res.credits_source = credits, usd or 0.0, CreditsSource.BODY
            return res
        message = api_message(response)
        if code == 429:
            return self._fail(AttemptOutcome.RATE_LIMITED, code, started, t0, f"HTTP 429: {message}",
                              parse_retry_after(response.headers))
        if code in FATAL_CODES:
            return self._fail(AttemptOutcome.FATAL, code, started, t0,
                              f"HTTP {code} ({FATAL_CODES[code]}): {message}")
        if 400 <= code < 500:
            return self._fail(AttemptOutcome.BAD_REQUEST, code, started, t0, f"HTTP {code}: {message}")
        return self._fail(AttemptOutcome.SERVER_ERROR, code, started, t0, f"HTTP {code}: {message}",
                          parse_retry_after(response.headers))

    async def probe(self) -> Probe:
        """One balance call before a run: is the host there, and does it take the key?"""
        host = urlsplit(self.base_url).hostname
        try:
            response = await self._http.get("/billing/balance")
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return Probe(problem=f"cannot reach {host} ({self.base_url}): "
                                 f"{one_line(exc, 160)}")
        except httpx.HTTPError:
            return Probe()  # reachable or not, nothing certain: the run's retries will tell
        if response.status_code in (401, 403):
            return Probe(problem=f"key rejected by {host} (HTTP {response.status_code}): "
                                 f"{api_message(response)}")
        if response.status_code != 200:
            return Probe()  # 404: no balance endpoint here (vLLM, Ollama): balance unknown
        try:
            value = response.json().get("balance")
        except (ValueError, AttributeError):
            return Probe()
        return Probe(balance=float(value) if isinstance(value, int | float) else None)
