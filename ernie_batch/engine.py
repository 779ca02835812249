"""The async pipeline: discover -> prepare (process pool) -> dispatch (rate-limited) -> record.

No Prefect in here: flows call `Pipeline` in batches, and so do tests and library users
(`run_job`). One `Pipeline` is one run: one lock, one journal, one rate limiter shared by
every request, one set of Parquet parts and one manifest row.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from ernie_batch import answers, prompt, store, tokens
from ernie_batch.client import (
    BAD_REQUEST,
    FATAL,
    OK,
    RATE_LIMITED,
    ApiClient,
    CallResult,
)
from ernie_batch.config import JobConfig
from ernie_batch.content import parts_sha256
from ernie_batch.discover import discover
from ernie_batch.limits import BudgetStopped, RequestBudget
from ernie_batch.prepare import PreparePool
from ernie_batch.units import DiscoveryStats, Document, PageUnit, UnitFailure

# a progress callback set by whoever starts the run (the CLI), seen through Prefect's flow call
PROGRESS_OBSERVER: contextvars.ContextVar[Callable[[Progress], None] | None] = (
    contextvars.ContextVar("ernie_batch_progress", default=None))

EXIT_CODES = {"completed": 0, "partial": 1, "fatal_api_error": 3, "budget_stopped": 4,
              "interrupted": 1}


@dataclass
class RunOptions:
    kind: str = "run"  # ingest, backfill, run, demo
    force: bool = False  # re-send everything selected
    retry_failed: bool = False  # also retry input_error / skipped units
    wait_lock_s: float = 0.0
    on_progress: Callable[[Progress], None] | None = None


@dataclass
class Progress:
    """Counters for progress displays; updated in place as units finish."""

    documents_total: int = 0
    documents: int = 0
    units_queued: int = 0
    units_done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    duplicate: int = 0
    already_done: int = 0  # answered (or given up on) by earlier runs: no row, no request
    requests: int = 0
    rate_limited: int = 0
    credits: float = 0.0
    usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    request_times: deque[float] = field(default_factory=lambda: deque(maxlen=5000))

    def rpm(self, window_s: float = 60.0) -> float:
        now = time.monotonic()
        recent = [t for t in self.request_times if now - t <= window_s]
        span = min(window_s, max(now - self.started, 1e-6))
        return len(recent) * 60.0 / span


class RunSummary(BaseModel):
    run_id: str
    kind: str
    outcome: str
    exit_code: int
    error: str | None = None
    documents: int = 0
    units_ok: int = 0
    units_failed: int = 0
    units_skipped: int = 0
    units_duplicate: int = 0
    units_not_sent: int = 0
    units_already_done: int = 0
    requests: int = 0
    rate_limited: int = 0
    credits: float = 0.0
    usd: float = 0.0
    duration_s: float = 0.0
    output: str = ""
    discovery_skipped: dict[str, int] = {}
    top_errors: list[tuple[str, int]] = []
    recovered_runs: list[str] = []


class Pipeline:
    """One run over one output folder. Use as `async with Pipeline(cfg, key) as run:`."""

    def __init__(self, cfg: JobConfig, key: SecretStr, opts: RunOptions | None = None) -> None:
        self.cfg = cfg
        self._key = key
        self.opts = opts or RunOptions()
        if self.opts.on_progress is None:
            self.opts.on_progress = PROGRESS_OBSERVER.get()
        self.root = Path(cfg.output.path)
        self.started_at = datetime.now(UTC)
        self.run_id = store.new_run_id(self.started_at)
        self.date = f"{self.started_at:%Y-%m-%d}"
        self.fp = prompt.fingerprint(cfg)
        self.answer_fields = answers.answer_fields(cfg.schema_obj)
        self.pages_schema = store.pages_schema(self.answer_fields)
        self.progress = Progress()
        self.discovery = DiscoveryStats()
        self.format_mode = cfg.request.response_format
        self.stop_reason: str | None = None  # "fatal_api_error" | "budget_stopped"
        self.stop_error: str | None = None
        self.not_sent = 0
        self._docs_seen: set[str] = set()
        self._errors: Counter[str] = Counter()
        self._credits_in_flight = 0.0
        self._attempt_credits: list[float] = []
        self._attempt_usd: list[float] = []
        self._last_flush = time.monotonic()
        self._rng = random.Random()
        self.recovered: list[str] = []
        self._finished: RunSummary | None = None

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Pipeline:
        store.check_writable(self.root)
        self._lock = store.OutputLock(self.root, self.run_id)
        await asyncio.to_thread(self._lock.acquire, self.opts.wait_lock_s)
        try:
            store.remove_temp_files(self.root)
            self.recovered = store.recover_journals(
                self.root, lambda _header: self.pages_schema, skip_run=self.run_id
            )
            self.done = (store.DoneIndex() if self.opts.force
                         else store.load_done(self.root, self.fp))
            self.journal = store.Journal(self.root / "_journal" / f"{self.run_id}.jsonl", {
                "run_id": self.run_id, "date": self.date, "kind": self.opts.kind,
                "fingerprint": self.fp, "started_at": self.started_at,
                "config_path": str(self.cfg.config_path) if self.cfg.config_path else None,
                "pages_schema": store.encode_schema(self.pages_schema),
            })
            self.pages = store.TableWriter(self.root, "pages", self.pages_schema, self.run_id,
                                           self.date)
            self.attempts = store.TableWriter(self.root, "attempts", store.ATTEMPTS_SCHEMA,
                                              self.run_id, self.date)
            limits = self.cfg.limits
            self.client = ApiClient(
                self.cfg.api.base_url, self._key, timeout_s=self.cfg.api.timeout_s,
                connect_timeout_s=self.cfg.api.connect_timeout_s,
                max_connections=limits.concurrency,
                allow_insecure_http=self.cfg.api.allow_insecure_http,
            )
            per_window = limits.window_s / 60.0  # the budget counts per window
            self.budget = RequestBudget(rpm=limits.rpm * per_window, tpm=limits.tpm * per_window,
                                        max_in_flight=limits.concurrency,
                                        adaptive=limits.adaptive, window_s=limits.window_s)
            self.pool = PreparePool(self.cfg.images, self.cfg.pdf, self.cfg.prepare)
        except BaseException:
            self._lock.release()
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._finished is None:
            outcome = "interrupted" if exc_type is not None else None
            await self.finish(outcome)

    # ------------------------------------------------------------ discovery

    def discover(self, sources: Iterable[Path] | None = None) -> list[Document]:
        opts = self.cfg.sources
        if sources:
            opts = opts.model_copy(update={"paths": list(sources)})
        docs, stats = discover(opts)
        self.progress.documents_total += len(docs)
        self.discovery.found += stats.found
        for reason, n in stats.skipped.items():
            self.discovery.skipped[reason] = self.discovery.skipped.get(reason, 0) + n
        return docs

    # ------------------------------------------------------------ processing

    async def process(self, docs: list[Document]) -> None:
        """Prepare and send every unit of `docs` not done before; returns when all are recorded."""
        if self.stop_reason:
            return
        queue: asyncio.Queue[PageUnit | None] = asyncio.Queue(maxsize=self.cfg.limits.concurrency)
        workers = [asyncio.create_task(self._worker(queue))
                   for _ in range(self.cfg.limits.concurrency)]
        try:
            todo = [d for d in docs if self._needs_preparing(d)]
            stream = self.pool.stream(todo)
            try:
                async for doc, prepared in stream:
                    for item in prepared:
                        if isinstance(item, UnitFailure):
                            self._record_failure(doc, item)
                        elif self._should_send(item):
                            self.progress.units_queued += 1
                            await queue.put(item)
                    if self.stop_reason:
                        break
            finally:
                await stream.aclose()
        finally:
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
            self._maybe_flush(force=True)

    def _needs_preparing(self, doc: Document) -> bool:
        """False when earlier runs answered every page of this content (then no work, or duplicates)."""
        self._count_document(doc)
        rec = self.done.get(doc.sha256, self.fp)
        if rec is None or not self._complete(rec):
            return True
        if str(doc.path) not in rec.paths:
            for (page, last), status in sorted(rec.units.items()):
                if status == "ok":
                    self._record_duplicate(doc, page, last, rec.page_count)
            rec.paths.add(str(doc.path))
        else:
            self.progress.already_done += len(rec.units)
        return False

    def _complete(self, rec: store.DocRecord) -> bool:
        final_ok = {"ok"} if self.opts.retry_failed else {"ok", *store.FINAL}
        if not rec.units or any(s not in final_ok for s in rec.units.values()):
            return False
        if rec.page_count is None:  # a document-level failure row
            return True
        first = self.cfg.pdf.first_page
        last = min(rec.page_count, self.cfg.pdf.last_page or rec.page_count)
        covered = set()
        for page, page_last in rec.units:
            covered.update(range(page, page_last + 1))
        return all(p in covered for p in range(first, last + 1))

    def _should_send(self, unit: PageUnit) -> bool:
        rec = self.done.get(unit.doc.sha256, self.fp)
        status = rec.units.get((unit.page, unit.page_last)) if rec else None
        if status == "ok":
            if str(unit.doc.path) not in rec.paths:
                self._record_duplicate(unit.doc, unit.page, unit.page_last, unit.page_count)
            else:
                self.progress.already_done += 1
            return False
        if status in store.FINAL and not self.opts.retry_failed:
            self.progress.already_done += 1
            return False
        return True

    def _count_document(self, doc: Document) -> None:
        if str(doc.path) not in self._docs_seen:
            self._docs_seen.add(str(doc.path))
            self.progress.documents += 1

    async def _worker(self, queue: asyncio.Queue[PageUnit | None]) -> None:
        while (unit := await queue.get()) is not None:
            if self.stop_reason:
                self.not_sent += 1
                continue
            await self._send_unit(unit)

    # ------------------------------------------------------------ one unit

    def _estimate(self, unit: PageUnit, body: dict[str, Any]) -> tuple[int, float]:
        images = [(p.width or 0, p.height or 0) for p in unit.parts if not p.is_pdf]
        pdf_pages = sum(p.pages for p in unit.parts if p.is_pdf)
        est = tokens.prompt_tokens(prompt.text_chars(body), images, pdf_pages)
        b = self.cfg.budget
        credits = est * b.credits_per_prompt_token + (
            min(b.expected_completion_tokens, self.cfg.request.max_tokens)
            * b.credits_per_completion_token)
        return est, credits

    def _over_budget(self, est_credits: float) -> bool:
        cap = self.cfg.budget.max_credits
        if cap is None:
            return False
        return self.progress.credits + self._credits_in_flight + est_credits > cap

    async def _send_unit(self, unit: PageUnit) -> None:
        key = prompt.unit_key(unit.doc.sha256, unit.page, unit.page_last, self.fp)
        content_sha = parts_sha256(unit.parts)
        retries = self.cfg.retries
        attempts: list[dict[str, Any]] = []
        transport_failures = answer_failures = 0
        temperature = self.cfg.request.temperature
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        status, error, verdict, last = "api_error", "not sent", None, None
        while True:
            mode = self.format_mode
            body = prompt.build_body(self.cfg, unit, mode, temperature)
            est_tokens, est_credits = self._estimate(unit, body)
            if self._over_budget(est_credits):
                self._stop("budget_stopped", "max_credits reached: stopped dispatching")
            if self.stop_reason:
                if not attempts:
                    self.not_sent += 1
                    return
                error = f"run stopped ({self.stop_reason}) before this unit finished"
                break
            try:
                lease = await self.budget.acquire(est_tokens)
            except BudgetStopped:
                continue  # the loop top sees stop_reason
            self._credits_in_flight += est_credits
            try:
                res = await self.client.complete(body)
            except BaseException:  # cancelled: free the slot, or the run stalls at the cap
                self.budget.release(lease, outcome="error")
                raise
            finally:
                self._credits_in_flight -= est_credits
            self.budget.release(
                lease, outcome="ok" if res.outcome == OK else
                ("rate_limited" if res.outcome == RATE_LIMITED else "error"),
                actual_tokens=res.prompt_tokens or None, retry_after=res.retry_after)
            last = res
            verdict = (answers.judge(res.content, res.finish_reason, self.cfg.schema_obj)
                       if res.outcome == OK else None)
            attempts.append(self._record_attempt(key, len(attempts) + 1, res, temperature,
                                                 verdict))
            if verdict is not None:
                if verdict.value is not None:
                    status, error = "ok", None
                    break
                answer_failures += 1
                status, error = "invalid_answer", verdict.error
                if answer_failures > retries.answer:
                    break
                temperature = min(2.0, temperature + retries.temperature_step)
                continue
            if res.outcome == FATAL:
                self._stop("fatal_api_error", res.error)
                status, error = "api_error", res.error
                break
            if res.outcome == BAD_REQUEST:
                if self._fall_back(mode, res):
                    continue
                status, error = "api_error", res.error
                break
            transport_failures += 1
            status, error = "api_error", res.error
            if transport_failures > retries.transport:
                break
            if res.outcome != RATE_LIMITED:  # 429s: the budget pauses every sender already
                await asyncio.sleep(self._backoff(transport_failures, res.retry_after))
        self._record_unit(unit, key, content_sha, status, error, verdict, last, attempts,
                          started, time.perf_counter() - t0)

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

    def _stop(self, reason: str, error: str | None) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_error = reason, error
            self.budget.stop()

    # ------------------------------------------------------------ recording

    def _record_attempt(self, key: str, n: int, res: CallResult, temperature: float,
                        verdict: answers.Verdict | None) -> dict[str, Any]:
        row = {
            "run_id": self.run_id, "key": key, "attempt": n, "status_code": res.status_code,
            "outcome": res.outcome, "error": res.error, "response_id": res.response_id,
            "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "credits": res.credits, "usd": res.usd, "temperature": temperature,
            "latency_s": res.latency_s, "started_at": res.started_at,
        }
        if verdict is not None and verdict.value is None:
            row["outcome"] = "invalid_answer"
        self.journal.write({"t": "attempt", **row})
        self.attempts.add(row)
        self._attempt_credits.append(res.credits)
        self._attempt_usd.append(res.usd)
        p = self.progress
        p.requests += 1
        p.request_times.append(time.monotonic())
        p.rate_limited += res.outcome == RATE_LIMITED
        p.credits += res.credits
        p.usd += res.usd
        return row

    def _base_row(self, doc: Document, page: int, last: int, page_count: int | None,
                  status: str, error: str | None) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "run_id": self.run_id,
            "key": prompt.unit_key(doc.sha256, page, last, self.fp),
            "fingerprint": self.fp, "source_path": str(doc.path), "source_sha256": doc.sha256,
            "doc_type": doc.doc_type, "page": page, "page_last": last, "page_count": page_count,
            "content_sha256": None, "status": status, "error": error, "answer_json": None,
            "raw_answer": None, **answers.answer_columns(None, self.answer_fields),
            "response_id": None, "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "credits": 0.0, "usd": 0.0, "latency_s": None, "model": self.cfg.api.model,
            "started_at": now, "finished_at": now,
        }

    def _record_unit(self, unit: PageUnit, key: str, content_sha: str, status: str,
                     error: str | None, verdict: answers.Verdict | None, last: CallResult | None,
                     attempts: list[dict[str, Any]], started: datetime, latency: float) -> None:
        import json

        row = self._base_row(unit.doc, unit.page, unit.page_last, unit.page_count, status, error)
        value = verdict.value if (verdict and status == "ok") else None
        row.update({
            "content_sha256": content_sha,
            "answer_json": json.dumps(value, ensure_ascii=False) if value is not None else None,
            "raw_answer": last.content if last else None,
            **answers.answer_columns(value, self.answer_fields),
            "response_id": last.response_id if last else None,
            "attempts": len(attempts),
            "prompt_tokens": sum(a["prompt_tokens"] for a in attempts),
            "completion_tokens": sum(a["completion_tokens"] for a in attempts),
            "credits": store.sum_exact(a["credits"] for a in attempts),
            "usd": store.sum_exact(a["usd"] for a in attempts),
            "latency_s": latency, "started_at": started,
        })
        assert row["key"] == key
        self._emit_page(row)

    def _record_failure(self, doc: Document, item: UnitFailure) -> None:
        self._count_document(doc)
        rec = self.done.get(doc.sha256, self.fp)
        previous = rec.units.get((item.page, item.page_last)) if rec else None
        if previous in store.FINAL and not self.opts.retry_failed:
            return  # recorded by an earlier run already
        self._emit_page(self._base_row(doc, item.page, item.page_last, item.page_count,
                                       item.status, item.error))

    def _record_duplicate(self, doc: Document, page: int, last: int, count: int | None) -> None:
        self._emit_page(self._base_row(doc, page, last, count, "duplicate",
                                       "same content already answered under another path"))

    def _emit_page(self, row: dict[str, Any]) -> None:
        self.journal.write({"t": "page", **row})
        self.pages.add(row)
        p = self.progress
        p.units_done += 1
        status = row["status"]
        if status == "ok":
            p.ok += 1
        elif status == "duplicate":
            p.duplicate += 1
        elif status == "skipped":
            p.skipped += 1
        else:
            p.failed += 1
            self._errors[(row["error"] or status)[:120]] += 1
        if self.opts.on_progress:
            self.opts.on_progress(p)
        self._maybe_flush()

    def _maybe_flush(self, force: bool = False) -> None:
        out = self.cfg.output
        due = time.monotonic() - self._last_flush >= out.flush_seconds
        if force or due or len(self.pages.rows) >= out.flush_rows:
            self.attempts.flush()
            self.pages.flush()
            self._last_flush = time.monotonic()

    # ------------------------------------------------------------ the end

    async def finish(self, outcome: str | None = None) -> RunSummary:
        """Write the last parts and the manifest, release everything; idempotent."""
        if self._finished is not None:
            return self._finished
        try:
            await self.pool.aclose()
        finally:
            await self.client.aclose()
        p = self.progress
        if outcome is None:
            outcome = self.stop_reason or ("partial" if p.failed else "completed")
        finished = datetime.now(UTC)
        credits = store.sum_exact(self._attempt_credits)
        usd = store.sum_exact(self._attempt_usd)
        self._maybe_flush(force=True)
        manifest = {
            "run_id": self.run_id, "kind": self.opts.kind,
            "config_path": str(self.cfg.config_path) if self.cfg.config_path else None,
            "fingerprint": self.fp, "started_at": self.started_at, "finished_at": finished,
            "documents": p.documents, "units_ok": p.ok, "units_failed": p.failed,
            "units_skipped": p.skipped + p.duplicate, "requests": p.requests,
            "credits": credits, "usd": usd, "outcome": outcome, "error": self.stop_error,
        }
        store.write_run_row(self.root, self.date, manifest)
        self.journal.close(delete=True)
        self._lock.release()
        self._finished = RunSummary(
            run_id=self.run_id, kind=self.opts.kind, outcome=outcome,
            exit_code=EXIT_CODES.get(outcome, 1), error=self.stop_error,
            documents=p.documents, units_ok=p.ok, units_failed=p.failed,
            units_skipped=p.skipped, units_duplicate=p.duplicate, units_not_sent=self.not_sent,
            units_already_done=p.already_done,
            requests=p.requests, rate_limited=p.rate_limited, credits=credits, usd=usd,
            duration_s=(finished - self.started_at).total_seconds(), output=str(self.root),
            discovery_skipped=dict(self.discovery.skipped),
            top_errors=self._errors.most_common(5), recovered_runs=self.recovered,
        )
        return self._finished


def batches(docs: list[Document], size: int) -> list[list[Document]]:
    return [docs[i:i + size] for i in range(0, len(docs), size)]


async def run_pipeline(cfg: JobConfig, key: SecretStr, opts: RunOptions | None = None,
                       sources: list[Path] | None = None) -> RunSummary:
    """The whole run without Prefect: library use and tests."""
    async with Pipeline(cfg, key, opts) as run:
        await run.process(run.discover(sources))
        return await run.finish()


def run_job(cfg: JobConfig, key: SecretStr, opts: RunOptions | None = None,
            sources: list[Path] | None = None) -> RunSummary:
    return asyncio.run(run_pipeline(cfg, key, opts, sources))
