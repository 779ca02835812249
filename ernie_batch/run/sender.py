"""One unit from its first request to its row: the layered retry policy, attempt by attempt.

Layered like httpx's `_send_handling_auth -> _send_handling_redirects -> _send_single_request`:

* `send` retries **invalid answers** (schema violations, cut-off JSON) at a higher
  temperature, up to `retries.answer` times, around
* `_send_handling_transport`, which retries **429s, 5xx, timeouts, resets and unreadable
  bodies** after their Retry-After or with backoff (a limit's 429 also pauses every sender:
  the budget's), up to
  `retries.transport` times, and moves the whole run to the next `response_format` when the
  endpoint refuses one with a 400, around
* `_send_single`: a budget lease, the request journaled as sent (with its
  `X-Client-Request-Id`), one HTTP call, the answer judged, the attempt recorded.

A 401/403/404 stops the whole run (`RunStop`), as does `budget.max_credits`; a unit caught
mid-way keeps the attempts it made.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ernie_batch.answers import judge, prompt
from ernie_batch.answers.verify import verify
from ernie_batch.api import request_ids, tokens
from ernie_batch.api.client import ApiClient, CallResult
from ernie_batch.api.limits import RequestBudget
from ernie_batch.config import JobConfig
from ernie_batch.errors import BudgetStopped
from ernie_batch.intake.content import parts_sha256
from ernie_batch.intake.units import PageUnit
from ernie_batch.run.recorder import RunRecorder
from ernie_batch.run.rows import RowMaker
from ernie_batch.store import AttemptRow
from ernie_batch.vocab import AttemptOutcome, RunOutcome, UnitStatus


@dataclass
class RunStop:
    """Why the run stopped dispatching (the first reason wins); stopping stops the budget too."""

    budget: RequestBudget | None = None
    reason: RunOutcome | None = None
    error: str | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)  # set with the reason
    # told the reason once it is set (a shard run raises its coordinator's stop flag)
    listeners: list[Callable[[RunOutcome, str | None], None]] = field(default_factory=list)

    def set(self, reason: RunOutcome, error: str | None) -> None:
        if self.reason is None:
            self.reason, self.error = reason, error
            self.stopped.set()
            if self.budget is not None:
                self.budget.stop()
            for listener in self.listeners:
                listener(reason, error)


@dataclass
class _Try:
    """One unit's way through the layers: its attempts so far and where it stands."""

    unit: PageUnit
    key: str
    temperature: float
    attempts: list[AttemptRow] = field(default_factory=list)
    transport_failures: int = 0
    answer_failures: int = 0
    status: UnitStatus = UnitStatus.API_ERROR
    error: str | None = "not sent"
    verdict: judge.Verdict | None = None
    last: CallResult | None = None
    mode: str = ""
    not_sent: bool = False
    est_tokens: int | None = None  # the first request's prompt-token estimate (the row keeps it)


def _lease_outcome(outcome: AttemptOutcome) -> str:
    if outcome == AttemptOutcome.OK:
        return "ok"
    return "rate_limited" if outcome == AttemptOutcome.RATE_LIMITED else "error"


class UnitSender:
    """Sends units of one run; shares its response_format fallback and credits in flight.

    A host that never answers (DNS failure, refused connections) for the first
    `UNREACHABLE_AFTER_S` of sending stops the run as fatal; once it has answered once,
    such errors are retried like any other transport error.
    """

    UNREACHABLE_AFTER_S = 60.0

    def __init__(self, cfg: JobConfig, fingerprint: str, client: ApiClient,
                 budget: RequestBudget, recorder: RunRecorder, rows: RowMaker, stop: RunStop,
                 rng: random.Random | None = None) -> None:
        self.cfg, self.fp = cfg, fingerprint
        self.client, self.budget, self.recorder, self.rows, self.stop = (
            client, budget, recorder, rows, stop)
        self.format_mode = cfg.request.response_format
        self._completion = prompt.expected_completion_tokens(cfg)
        self._credits_in_flight = 0.0
        self._rng = rng or random.Random()
        self._first_call: float | None = None
        self._reached = False  # the host answered something, once

    async def send(self, unit: PageUnit) -> None:
        """Send the unit until answered or given up on, then record its row."""
        progress = self.recorder.progress
        if self.stop.reason:
            progress.not_sent += 1
            return
        t = _Try(unit, prompt.unit_key(unit.doc.sha256, unit.page, unit.page_last, self.fp),
                 self.cfg.request.temperature)
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        try:
            await self._send_handling_answers(t)
        except asyncio.CancelledError:  # abandoned by an interrupt: sent next time
            progress.abandoned += 1
            raise
        if t.not_sent:
            progress.not_sent += 1
            return
        progress.finish_times.append(time.monotonic())
        checked = None
        if self.cfg.prompt.evidence and t.status == UnitStatus.OK and t.verdict is not None:
            assert t.verdict.value is not None
            checked = verify(t.verdict.value, t.verdict.quotes, self.cfg.resolved.schema, unit.text)
        self.recorder.page(self.rows.answered_row(
            unit, parts_sha256(unit.parts), t.status, t.error, t.verdict, t.last, t.attempts,
            started, time.perf_counter() - t0, checked, t.est_tokens))

    async def _send_handling_answers(self, t: _Try) -> None:
        while await self._send_handling_transport(t):
            assert t.verdict is not None
            if t.verdict.value is not None:
                t.status, t.error = UnitStatus.OK, None
                return
            t.answer_failures += 1
            t.status, t.error = UnitStatus.INVALID_ANSWER, t.verdict.error
            if t.answer_failures > self.cfg.retries.answer:
                return
            t.temperature = min(2.0, t.temperature + self.cfg.retries.temperature_step)

    async def _send_handling_transport(self, t: _Try) -> bool:
        """True once a 200 answer arrived (judged in `t.verdict`); False when given up or stopped."""
        while True:
            res = await self._send_single(t)
            if res is None:
                return False
            if res.outcome == AttemptOutcome.OK:
                return True
            if res.outcome == AttemptOutcome.BAD_REQUEST and self._fall_back(t.mode, res):
                continue
            t.status, t.error = UnitStatus.API_ERROR, res.error
            if res.outcome == AttemptOutcome.FATAL:
                self.stop.set(RunOutcome.FATAL_API_ERROR, res.error)
                return False
            if res.outcome == AttemptOutcome.BAD_REQUEST:
                return False
            t.transport_failures += 1
            if t.transport_failures > self.cfg.retries.transport:
                return False
            # a 429 waits its own Retry-After too: the budget pauses every sender only for
            # a limit's, and a sporadic one (an upstream shedding load) is this request's alone
            await asyncio.sleep(self._backoff(t.transport_failures, res.retry_after))

    async def _send_single(self, t: _Try) -> CallResult | None:
        """One request under a budget lease, its answer judged and recorded; None if stopped."""
        t.mode = self.format_mode
        body = prompt.build_body(self.cfg, t.unit, t.mode, t.temperature)
        est_tokens, est_credits = self._estimate(t.unit, body)
        if t.est_tokens is None:
            t.est_tokens = est_tokens
        if self._over_budget(est_credits):
            self.stop.set(RunOutcome.BUDGET_STOPPED, "max_credits reached: stopped dispatching")
        while True:
            if self.stop.reason:
                if t.attempts:
                    t.error = f"run stopped ({self.stop.reason}) before this unit finished"
                else:
                    t.not_sent = True
                return None
            try:
                lease = await self.budget.acquire(est_tokens)
            except BudgetStopped:  # stopped by this run (reason set) or by its owner
                self.stop.set(RunOutcome.INTERRUPTED, "the request budget was stopped")
                continue
            break
        if t.mode != self.format_mode:  # another unit fell back while this one waited
            t.mode = self.format_mode
            body = prompt.build_body(self.cfg, t.unit, t.mode, t.temperature)
        n = len(t.attempts) + 1
        request_id = request_ids.build(self.rows.run_id, t.key, n)
        self.recorder.sent(t.key, n, request_id, t.temperature)  # journaled before it goes out
        self._credits_in_flight += est_credits
        try:
            res = await self.client.complete(body, request_id=request_id)
        except BaseException:  # cancelled: free the slot, or the run stalls at the cap
            self.budget.release(lease, outcome="error")
            self.recorder.lost(t.key, n, "cancelled while the request was in flight")
            raise
        finally:
            self._credits_in_flight -= est_credits
        self.budget.release(lease, outcome=_lease_outcome(res.outcome),
                            actual_tokens=res.prompt_tokens or None, retry_after=res.retry_after)
        self._check_reachable(res)
        if not self.recorder.awaiting(t.key, n):  # abandoned meanwhile: its `lost` row stands
            t.not_sent = not t.attempts
            t.error = "abandoned in flight when the run was interrupted"
            return None
        t.last = res
        t.verdict = (judge.judge(res.content, res.finish_reason, self.cfg.resolved.sent_schema,
                                 self.cfg.prompt.evidence)
                     if res.outcome == AttemptOutcome.OK else None)
        row = self.rows.attempt_row(t.key, n, res, t.temperature, t.verdict, request_id)
        t.attempts.append(row)
        self.recorder.attempt(row)
        return res

    def _check_reachable(self, res: CallResult) -> None:
        now = time.monotonic()
        if self._first_call is None:
            self._first_call = now
        if not res.unreachable:
            self._reached = True
        elif not self._reached and now - self._first_call >= self.UNREACHABLE_AFTER_S:
            self.stop.set(RunOutcome.FATAL_API_ERROR,
                          f"no answer from {self.client.base_url} for "
                          f"{self.UNREACHABLE_AFTER_S:g} s: {res.error}")

    def _estimate(self, unit: PageUnit, body: dict) -> tuple[int, float]:
        images = [(p.width or 0, p.height or 0) for p in unit.parts if not p.is_pdf]
        pdf_pages = sum(p.pages for p in unit.parts if p.is_pdf)
        est = tokens.prompt_tokens(tokens.text_chars(body["messages"]), images, pdf_pages)
        b = self.cfg.budget
        credits = (est * b.credits_per_prompt_token
                   + self._completion * b.credits_per_completion_token)
        return est, credits

    def _over_budget(self, est_credits: float) -> bool:
        cap = self.cfg.budget.max_credits
        if cap is None:
            return False
        spent = self.recorder.progress.credits
        return spent + self._credits_in_flight + est_credits > cap

    def _fall_back(self, mode: str, res: CallResult) -> bool:
        """A 400 rejecting response_format moves the whole run to the next mode, once."""
        text = (res.error or "").lower()
        if "response_format" not in text and "json_schema" not in text and "json_object" not in text:
            return False
        modes = prompt.FORMAT_MODES
        if mode != self.format_mode:  # another unit already fell back: just retry
            return True
        idx = modes.index(mode)
        if idx + 1 >= len(modes):
            return False
        self.format_mode = modes[idx + 1]
        return True

    def _backoff(self, n: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        r = self.cfg.retries
        return min(r.backoff_max_s, r.backoff_base_s * 2 ** (n - 1)) * (0.5 + self._rng.random())
