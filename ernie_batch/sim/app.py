"""The simulator's ASGI app: routes, auth, admission, billing and the ledger's entries.

It behaves like the real API (see shared/API-FACTS.md): Bearer auth, request validation with
the vendor's 400 body, RPM/TPM sliding windows and a concurrency cap answered with 429 +
Retry-After, whole credits billed per request, tracing and cost headers sent before the
body (`x-inference-id`, `x-client-request-id`, `x-aimlapi-credits-used`,
`x-aimlapi-usd-spent`), the usage logs (`GET /v2/logs`, see `usage_logs`), and faults
injected at seeded rates. Every billed request goes into a ledger that tests read back
(`GET /_sim/ledger`, `SimServer.ledger()`), which says whether its headers and its body
reached the client.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ernie_batch.api import tokens
from ernie_batch.config import CREDITS_PER_USD, whole_credits
from ernie_batch.intake.content import content_sha256
from ernie_batch.sim.answers import answer_schema, compose_answer
from ernie_batch.sim.evidence import answer_with_evidence, wants_evidence
from ernie_batch.sim.faults import (
    FAULT_KINDS,
    NON_JSON_BODY,
    DroppedResponse,
    TransportLookup,
)
from ernie_batch.sim.ledger import Call, LedgerEntry
from ernie_batch.sim.misreads import misread
from ernie_batch.sim.settings import SimSettings
from ernie_batch.sim.usage_logs import LogRow, UsageLogs
from ernie_batch.sim.validation import (
    ApiError,
    Checked,
    bad_request,
    check_structure,
    inspect_media,
)
from ernie_batch.sim.window import SlidingWindow, retry_after

LOW_BALANCE_THRESHOLD = 10_000.0
UNLIMITED_BALANCE = 1_000_000_000_000.0
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # the vendor's rule; others dropped


def error_body(status: int, message: str, path: str) -> dict[str, Any]:
    """The vendor's error body: {message, path, requestId, statusCode, timestamp}."""
    now = datetime.now(UTC)
    return {
        "message": message,
        "path": path,
        "requestId": str(uuid.uuid4()),
        "statusCode": status,
        "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def error_response(
    status: int, message: str, path: str, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(error_body(status, message, path), status_code=status, headers=headers)


class Simulator:
    """The ASGI app and its state (ledger, stats, windows, balance); no threads of its own."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.ledger: list[LedgerEntry] = []
        self.stats: dict[str, int] = {}
        self.balance = settings.balance_credits
        self.window = SlidingWindow(settings.rpm, settings.tpm, settings.window_s)
        self.in_flight = 0
        self.closing = False  # set on shutdown: slow answers stop waiting
        self.transport_lookup: TransportLookup | None = None
        self.logs = UsageLogs(settings.logs_limit, settings.logs_window_s, self.authorized)
        self._fault_rng = random.Random(settings.seed)
        self._latency_rng = random.Random(settings.seed + 1)
        self._id_rng = random.Random()  # ids unique across simulator instances
        # the API's routes only under /v1 (and /v2/logs at the root), as the real one: a base
        # URL without /v1 is a 404 there and here; /_sim/* are the simulator's own, for tests
        # and benchmarks only
        routes = [Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        if settings.has_balance:
            routes.append(Route("/v1/billing/balance", self.billing_balance, methods=["GET"]))
        if settings.usage_logs:
            routes.append(Route("/v2/logs", self.usage_logs_view, methods=["GET"]))
        routes += [Route("/_sim/ledger", self.ledger_view, methods=["GET"]),
                   Route("/_sim/reset", self.reset, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception})

    # --- bookkeeping

    def count(self, outcome: str) -> None:
        self.stats[outcome] = self.stats.get(outcome, 0) + 1

    def totals(self) -> dict[str, Any]:
        entries = list(self.ledger)
        return {
            "credits": math.fsum(e.credits for e in entries),
            "credits_delivered": math.fsum(e.credits for e in entries if e.delivered),
            "credits_headers_delivered": math.fsum(e.credits for e in entries
                                                   if e.headers_delivered),
            "usd": math.fsum(e.usd for e in entries),
            "requests": len(entries),
        }

    def bill(self, response_id: str, checked: Checked, completion: int, call: Call, *,
             delivered: bool, headers_delivered: bool, fault: str | None) -> tuple[int, float]:
        """Charge one request in whole credits: ledger entry, log row, balance; (credits, usd)."""
        s = self.settings
        credits = whole_credits(checked.prompt_tokens * s.credits_per_prompt_token
                                + completion * s.credits_per_completion_token)
        usd = round(credits / CREDITS_PER_USD, 10)
        now = time.time()
        self.ledger.append(LedgerEntry(
            response_id=response_id, content_sha256=checked.digest,
            prompt_tokens=checked.prompt_tokens, completion_tokens=completion,
            credits=credits, usd=usd, delivered=delivered, status_code=200,
            fault=fault, at=now, inference_id=call.inference_id,
            client_request_id=call.client_request_id, headers_delivered=headers_delivered,
        ))
        self.log(call, "succeeded", now, credits, usd, checked.prompt_tokens, completion)
        if self.balance is not None:
            self.balance -= credits
        return credits, usd

    def log(self, call: Call, status: str, charged_at: float, credits: int = 0, usd: float = 0.0,
            tokens_input: int = 0, tokens_output: int = 0) -> None:
        """The request's row in the usage logs, visible `logs_lag_s` after its charge."""
        self.logs.add(LogRow(
            created=call.arrived, visible_at=charged_at + self.settings.logs_lag_s,
            status=status, model=call.model, credits=credits, usd=usd,
            tokens_input=tokens_input, tokens_output=tokens_output,
            request_id=str(uuid.uuid4()), inference_id=call.inference_id,
            client_request_id=call.client_request_id,
        ))

    def new_call(self, request: Request, checked: Checked) -> Call:
        sent = request.headers.get("x-client-request-id")
        valid = sent if sent is not None and CLIENT_REQUEST_ID.fullmatch(sent) else None
        return Call(arrived=time.time(), inference_id=str(uuid.uuid4()),
                    client_request_id=valid, model=str(checked.body["model"]))

    def new_id(self) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "chatcmpl-" + "".join(self._id_rng.choices(alphabet, k=24))

    # --- checks in front of the model

    def authorized(self, request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and key.strip() == self.settings.api_key

    async def validate(self, request: Request) -> Checked:
        """Parse and check the body (400 on anything wrong); media decoded off the loop."""
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise bad_request("Request body is not valid JSON") from None
        messages = check_structure(body, self.settings)
        has_media = any(
            isinstance(m.get("content"), list)
            and any(p.get("type") in ("image_url", "file") for p in m["content"])
            for m in messages
        )
        if has_media:
            digest, images, pages = await anyio.to_thread.run_sync(inspect_media, messages)
        else:
            digest, images, pages = content_sha256(messages), [], 0
        limits = [int(body[k]) for k in ("max_tokens", "max_completion_tokens") if k in body]
        return Checked(
            body=body, messages=messages, digest=digest,
            prompt_tokens=tokens.prompt_tokens(tokens.text_chars(messages), images, pages),
            schema=answer_schema(body, messages), max_tokens=min(limits) if limits else None,
        )

    def admit(self, prompt_tokens: int) -> None:
        """RPM/TPM sliding window: record the request or raise 429 (rejections not recorded)."""
        now = time.monotonic()
        wait = self.window.try_admit(now, prompt_tokens)
        if wait is not None:
            headers = {"Retry-After": retry_after(wait), **self.window.headers(now)}
            raise ApiError(429, "Too many requests: rate limit exceeded, retry later",
                           "rate_limited", headers)

    def draw_fault(self) -> str | None:
        rates = self.settings.faults
        for kind in FAULT_KINDS:
            rate = getattr(rates, kind)
            if rate > 0 and self._fault_rng.random() < rate:
                return kind
        return None

    def fault_error(self, fault: str) -> ApiError:
        """The error answer of the rate_limited and server_error faults (not billed)."""
        if fault == "rate_limited":
            wait = self.settings.sporadic_retry_after_s
            if wait is None:
                wait = min(1.0, self.settings.window_s / 60) * self._fault_rng.uniform(0.5, 2.0)
            return ApiError(429, "Too many requests: the provider is busy, retry later",
                            "fault_rate_limited", {"Retry-After": retry_after(wait)})
        status = self._fault_rng.choice((500, 502, 503, 504))
        return ApiError(status, "Upstream provider error, please retry", "server_error")

    async def pause(self) -> None:
        s = self.settings
        delay = s.latency_s + s.latency_jitter_s * self._latency_rng.random()
        if delay > 0:
            await asyncio.sleep(delay)

    async def wait_slow(self, request: Request) -> bool:
        """Sleep slow_s (or until the client leaves); True if the client is still there.

        Approximation: delivery is judged by `is_disconnected()` just before sending, which
        sees a client that closed its socket but not bytes lost after the send.
        """
        deadline = time.monotonic() + self.settings.slow_s
        while (left := deadline - time.monotonic()) > 0 and not self.closing:
            await asyncio.sleep(min(0.05, left))
            if await request.is_disconnected():
                return False
        return not await request.is_disconnected()

    # --- endpoints

    async def chat_completions(self, request: Request) -> Response:
        self.count("requests")
        try:
            if not self.authorized(request):
                raise ApiError(401, "Unauthorized: invalid or missing API key", "unauthorized")
            if self.balance is not None and self.balance <= 0:
                raise ApiError(403, "You've run out of credits. Please top up your balance "
                               "to continue: https://aimlapi.com/app/billing", "out_of_credits")
            cap = self.settings.max_concurrency
            if cap and self.in_flight >= cap:
                wait = self.settings.latency_s + self.settings.latency_jitter_s / 2
                raise ApiError(429, f"Too many concurrent requests (limit {cap})",
                               "rate_limited", {"Retry-After": retry_after(max(0.01, wait))})
            self.in_flight += 1
            try:
                return await self.answer(request)
            finally:
                self.in_flight -= 1
        except ApiError as exc:
            self.count(exc.outcome)
            return error_response(exc.status, exc.message, request.url.path, exc.headers)

    async def answer(self, request: Request) -> Response:
        """Validate, admit, draw a fault, wait, then answer and bill.

        A request that reached the model has a usage-log row: `succeeded` when billed,
        `failed` (cost 0) when a 5xx, a reset or an HTML page ended it.
        """
        checked = await self.validate(request)
        self.admit(checked.prompt_tokens)
        call = self.new_call(request, checked)
        fault = self.draw_fault()
        # drawn whole here, before any wait: the n-th request's fault is the seed's n-th draw,
        # whatever the other requests do meanwhile
        error = self.fault_error(fault) if fault in ("rate_limited", "server_error") else None
        if error is not None and fault == "rate_limited":  # a busy provider answers at once
            raise error
        delivered = True
        if fault == "slow":
            delivered = await self.wait_slow(request)
        else:
            await self.pause()
        if fault in ("server_error", "reset", "non_json"):
            self.log(call, "failed", time.time())
        if error is not None:  # server_error
            error.headers.update(call.headers())
            raise error
        headers = self.window.headers(time.monotonic())
        if fault == "reset":
            self.count("reset")
            return DroppedResponse(self.transport_lookup)
        if fault == "non_json":
            self.count("non_json")
            return Response(NON_JSON_BODY, 200, headers, media_type="text/html")
        body, credits, usd = self.completion(checked, fault, call,
                                             delivered=delivered and fault != "truncated",
                                             headers_delivered=delivered)
        headers |= call.headers() | {"x-aimlapi-credits-used": str(credits),
                                     "x-aimlapi-usd-spent": str(usd)}
        self.count(fault or "ok")
        if fault == "truncated":
            return DroppedResponse(self.transport_lookup, self._render(body), headers)
        return JSONResponse(body, headers=headers)

    @staticmethod
    def _render(body: dict[str, Any]) -> bytes:
        return JSONResponse(body).body

    def completion(self, checked: Checked, fault: str | None, call: Call, *, delivered: bool,
                   headers_delivered: bool) -> tuple[dict[str, Any], int, float]:
        """The 200 body of the vendor's response schema, and what it was billed (credits, usd)."""
        truth = self.settings.scripted.get(checked.digest)
        if wants_evidence(checked):  # the answer and a quote per field, read from the page
            truth = answer_with_evidence(checked, truth, self.settings.error_rates,
                                         self.settings.seed)
        elif truth is not None and self.settings.error_rates:
            truth = misread(truth, checked, self.settings.error_rates, self.settings.seed)
        content, finish = compose_answer(checked, fault, truth)
        completion = tokens.completion_tokens(content)
        response_id = self.new_id()
        credits, usd = self.bill(response_id, checked, completion, call, delivered=delivered,
                                 headers_delivered=headers_delivered, fault=fault)
        offset = self.settings.body_credits_offset
        meta_usage: dict[str, float] = {"credits_used": credits + offset if offset else credits}
        if self.settings.send_usd:
            meta_usage["usd_spent"] = usd
        return {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": checked.body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": finish,
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": checked.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": checked.prompt_tokens + completion,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "meta": {"usage": meta_usage},
        }, credits, usd

    async def billing_balance(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_response(401, "Unauthorized: invalid or missing API key", request.url.path)
        balance = UNLIMITED_BALANCE if self.balance is None else self.balance
        exhausted = balance <= 0
        return JSONResponse({
            "balance": balance,
            "lowBalance": balance < LOW_BALANCE_THRESHOLD,
            "lowBalanceThreshold": LOW_BALANCE_THRESHOLD,
            "lastUpdated": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "autoDebitStatus": "disabled",
            "status": "exhausted" if exhausted else "current",
            "statusExplanation": "Balance is exhausted: top up to continue" if exhausted
            else "Balance is current and up to date",
        })

    async def ledger_view(self, request: Request) -> Response:
        return JSONResponse({
            "entries": [asdict(e) for e in list(self.ledger)],
            "totals": self.totals(),
            "stats": dict(self.stats),
        })

    async def reset(self, request: Request) -> Response:
        self.ledger.clear()
        self.stats.clear()
        self.logs.clear()
        return JSONResponse({"ok": True})

    async def usage_logs_view(self, request: Request) -> Response:
        try:
            return JSONResponse(self.logs.answer(request))
        except ApiError as exc:
            self.count(exc.outcome)
            return error_response(exc.status, exc.message, request.url.path, exc.headers)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = "Not found" if status == 404 else str(getattr(exc, "detail", "error"))
        path = request.url.path
        return error_response(status, f"{message}: {request.method} {path}", path)
