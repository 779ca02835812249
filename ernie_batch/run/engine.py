"""The async pipeline: discover -> prepare (process pool) -> send (rate-limited) -> record.

No Prefect in here: flows call `Pipeline` in batches, and so do tests and library users
(`run_job`). One `Pipeline` is one run: one lock, one journal, one rate limiter shared by
every request, one set of Parquet parts and one manifest row. Its parts each have a room:
`store.DoneIndex` decides what to skip, `sender.UnitSender` owns the retry policy,
`recorder.RunRecorder` the rows, progress and manifest, `recovery` what killed runs left.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from ernie_batch import interrupt, prompt, store
from ernie_batch.answers import answer_fields
from ernie_batch.client import ApiClient
from ernie_batch.config import JobConfig
from ernie_batch.discover import discover
from ernie_batch.documents import DocumentSpec, build_documents
from ernie_batch.limits import RequestBudget
from ernie_batch.prepare import PreparePool
from ernie_batch.recorder import RunInfo, RunRecorder
from ernie_batch.recovery import recover_journals, remove_dead_temp_files
from ernie_batch.rows import RowMaker
from ernie_batch.sender import RunStop, UnitSender
from ernie_batch.store import DocumentDecision, UnitDecision
from ernie_batch.subset import Subset
from ernie_batch.summary import Progress, RunSummary
from ernie_batch.units import DiscoveryStats, Document, PageUnit, Prepared, UnitFailure
from ernie_batch.vocab import RUN_EXIT, RunOutcome, UnitStatus

# a progress callback set by whoever starts the run (the CLI), seen through Prefect's flow call
PROGRESS_OBSERVER: contextvars.ContextVar[Callable[[Progress], None] | None] = (
    contextvars.ContextVar("ernie_batch_progress", default=None))


@dataclass
class RunOptions:
    kind: str = "run"  # ingest, backfill, run, demo, eval, shard
    force: bool = False  # re-send everything selected
    retry_failed: bool = False  # also retry input_error / skipped units
    wait_lock_s: float = 0.0
    on_progress: Callable[[Progress], None] | None = None
    # a shard run: its id given by its coordinator, who holds the folder's run lock for it
    run_id: str | None = None
    parent_run_id: str | None = None
    shard: int | None = None
    # only these documents (path -> pages; None: every page) are the run's: see subset.py
    select: Mapping[str, set[int] | None] | None = None


class Preparer(Protocol):
    """What the pipeline needs of a `PreparePool` (the overhead benchmark hands in its own)."""

    def stream(self, docs: Iterable[Document]) -> Any: ...  # async iterator of (doc, units)

    async def aclose(self) -> None: ...


class Pipeline:
    """One run over one output folder. Use as `async with Pipeline(cfg, key) as run:`.

    `client`, `budget` and `pool` may be handed in (tests, benchmarks); what is handed in is
    the caller's to close, what the pipeline makes it closes itself.
    """

    def __init__(self, cfg: JobConfig, key: SecretStr, opts: RunOptions | None = None, *,
                 client: ApiClient | None = None, budget: RequestBudget | None = None,
                 pool: Preparer | None = None) -> None:
        self.cfg = cfg
        self.opts = opts or RunOptions()
        self.root = Path(cfg.output.path)
        self.started_at = datetime.now(UTC)
        self.run_id = self.opts.run_id or store.new_run_id(self.started_at)
        self.date = f"{self.started_at:%Y-%m-%d}"
        self.fp = prompt.fingerprint(cfg)
        self.pages_schema = store.pages_schema(answer_fields(cfg.resolved.schema))
        self.document_spec = DocumentSpec.of_config(cfg, answer_fields(cfg.resolved.schema))
        limits = cfg.limits
        self._owned = [x is None for x in (client, pool)]
        self.client = client or ApiClient(
            cfg.api.base_url, key, timeout_s=cfg.api.timeout_s,
            connect_timeout_s=cfg.api.connect_timeout_s, max_connections=limits.concurrency,
            allow_insecure_http=cfg.api.allow_insecure_http)
        per_window = limits.window_s / 60.0  # the budget counts per window
        self.budget = budget or RequestBudget(
            rpm=limits.rpm * per_window, tpm=limits.tpm * per_window,
            max_in_flight=limits.concurrency, adaptive=limits.adaptive, window_s=limits.window_s)
        self.pool: Preparer = pool or PreparePool(cfg.images, cfg.pdf, cfg.prepare)
        resolved = cfg.resolved
        self.info = RunInfo(
            run_id=self.run_id, kind=self.opts.kind, started_at=self.started_at,
            fingerprint=self.fp, config_path=str(cfg.config_path) if cfg.config_path else None,
            template_path=str(resolved.template_path) if resolved.template_path else None,
            schema_path=str(resolved.schema_path) if resolved.schema_path else None,
            prompt_label=cfg.prompt.label, parent_run_id=self.opts.parent_run_id,
            shard=self.opts.shard)
        self.recorder = RunRecorder(
            self.root, self.info, self.pages_schema,
            flush_rows=cfg.output.flush_rows, flush_seconds=cfg.output.flush_seconds,
            on_progress=self.opts.on_progress or PROGRESS_OBSERVER.get(),
            on_page=self._note_answer)
        self.progress.rate_limit_per_s = limits.rpm / 60.0 if limits.rpm else None
        self.rows = RowMaker(self.run_id, self.fp, cfg.api.model,
                             answer_fields(cfg.resolved.schema))
        self.stop = RunStop(self.budget)
        self.sender = UnitSender(cfg, self.fp, self.client, self.budget, self.recorder, self.rows,
                                 self.stop)
        self.discovery = DiscoveryStats()
        self.done = store.DoneIndex(self.fp)
        self._indexed: set[str] = set()  # content the done-index has read rows for
        self.startup_s = 0.0  # entry to locks held and recovery done, plus the done-index reads
        self.subset = Subset(self.opts.select) if self.opts.select is not None else None
        self.recovered: list[str] = []
        self._lock = store.OutputLock(self.root, self.run_id)  # one top-level run at a time
        self._data_lock = store.data_lock(self.root, exclusive=False)  # no rewrite meanwhile
        self._own_lock = store.run_id_lock(self.root, self.run_id)  # our files are ours
        self._docs_seen: set[str] = set()
        # same content at several paths of this selection: sent once, for the first path
        self._leaders: dict[str, str] = {}  # sha256 -> the path sent
        self._followers: list[Document] = []
        self._answered: dict[str, list[tuple[int, int, int | None]]] = {}  # ok units, this run
        # Ctrl-C / SIGTERM: stop dispatching, give requests in flight a grace, then abandon them
        self._graceful = interrupt.GRACEFUL.get()
        self._hurry: asyncio.Event | None = asyncio.Event() if self._graceful else None
        self._signals = contextlib.ExitStack()
        self._finished: RunSummary | None = None

    @property
    def progress(self) -> Progress:
        return self.recorder.progress

    @property
    def stop_reason(self) -> RunOutcome | None:
        return self.stop.reason

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Pipeline:
        entered = time.perf_counter()
        store.check_writable(self.root)
        if self.opts.parent_run_id is None:  # a shard run's coordinator holds it
            await asyncio.to_thread(self._lock.acquire, self.opts.wait_lock_s)
        try:
            if not await asyncio.to_thread(self._data_lock.acquire, self.opts.wait_lock_s):
                raise store.LockedError(f"output folder {self.root} is being rewritten (compact "
                                        "or a rebuild holds it); use --wait to queue behind it")
            self._own_lock.try_acquire()
            store.finish_interrupted(self.root)  # a compaction cut short: completed or undone
            remove_dead_temp_files(self.root, self.run_id)
            self.recovered = recover_journals(self.root, self.pages_schema, skip_run=self.run_id)
            self.recorder.open_journal({"pages_schema": store.encode_schema(self.pages_schema),
                                        "documents": self.document_spec.header()})
            if self._graceful is not None:
                self._signals.enter_context(self._graceful.handling())
                self._signals.callback(self._graceful.subscribe(self._on_signal))
        except BaseException:
            self._signals.close()
            self._release_locks()
            raise
        self.startup_s = time.perf_counter() - entered
        return self

    def _on_signal(self, hurry: bool) -> None:
        """The first signal stops dispatching and starts the grace; a second one ends it."""
        assert self._graceful is not None and self._hurry is not None
        if hurry:
            self._hurry.set()
            return
        self.stop.set(RunOutcome.INTERRUPTED,
                      f"interrupted by {self._graceful.signal_name}: stopped dispatching")
        asyncio.get_running_loop().call_later(self._graceful.grace_s, self._hurry.set)

    def _release_locks(self) -> None:
        self._own_lock.release()
        self._data_lock.release()
        self._lock.release()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._finished is None:
            await self.finish(RunOutcome.INTERRUPTED if exc_type is not None else None)

    def discover(self, sources: Iterable[Path] | None = None) -> list[Document]:
        opts = self.cfg.sources
        if sources:
            opts = opts.model_copy(update={"paths": list(sources)})
        docs, stats = discover(opts)
        self.progress.documents_total += len(docs)
        self.discovery.found += stats.found
        for reason, n in stats.skipped.items():
            self.discovery.skipped[reason] = self.discovery.skipped.get(reason, 0) + n
        self.discovery.still_growing.extend(stats.still_growing)
        self._index(docs)
        return docs

    def _index(self, docs: list[Document]) -> None:
        """Learn what earlier runs did with these documents' content (once per content: `discover`
        covers every document of a run, `process` only those handed in without it)."""
        shas = {d.sha256 for d in docs if d.sha256 not in self._indexed}
        if self.opts.force or not shas:
            return
        started = time.perf_counter()
        self.done.add_from(self.root, shas)
        self._indexed |= shas
        self.startup_s += time.perf_counter() - started

    # ------------------------------------------------------------ processing

    async def process(self, docs: list[Document]) -> None:
        """Prepare and send every unit of `docs` not done before; returns when all are recorded.

        A stop (fatal error, budget, interrupt) ends the feeding at once; requests in flight
        finish, or on an interrupt are abandoned once its grace is over.
        """
        if self.stop.reason:
            return
        self._index(docs)
        queue: asyncio.Queue[PageUnit | None] = asyncio.Queue(maxsize=self.cfg.limits.concurrency)
        workers = [asyncio.create_task(self._worker(queue))
                   for _ in range(self.cfg.limits.concurrency)]
        try:
            await interrupt.until(self.stop.stopped, self._feed(docs, queue))
        finally:
            for _ in workers:
                await queue.put(None)  # once stopped, workers drain the queue at once
            await interrupt.join(workers, self._hurry)
            self.recorder.maybe_flush(force=True)

    async def _feed(self, docs: list[Document], queue: asyncio.Queue[PageUnit | None]) -> None:
        stream = self.pool.stream([d for d in docs if self._needs_preparing(d)])
        try:
            async for doc, prepared in stream:
                await self._dispatch(doc, prepared, queue)
                if self.stop.reason:
                    break
        finally:
            await stream.aclose()

    async def _dispatch(self, doc: Document, prepared: list[Prepared],
                        queue: asyncio.Queue[PageUnit | None]) -> None:
        self.progress.documents_ready += 1
        if self.subset is not None:
            prepared = [p for p in prepared
                        if self.subset.wants(doc, p.page, p.page_last, p.page_count)]
        self.progress.units_known += len(prepared)
        for item in prepared:
            if isinstance(item, UnitFailure):
                self._count_document(doc)
                if not self.done.failure_recorded(doc.sha256, self.fp, item.page, item.page_last,
                                                  self.opts.retry_failed):
                    self.recorder.page(self.rows.unit_row(
                        doc, item.page, item.page_last, item.page_count, item.status, item.error))
                continue
            decision = self.done.for_unit(doc.sha256, self.fp, item.page, item.page_last,
                                          str(doc.path), self.opts.retry_failed)
            if decision == UnitDecision.SEND:
                await queue.put(item)
            elif decision == UnitDecision.DUPLICATE:
                of = self.done.answered_by(doc.sha256, self.fp, item.page, item.page_last)
                self._record_duplicate(doc, item.page, item.page_last, item.page_count, *of)
            else:
                self.progress.already_done += 1

    def _needs_preparing(self, doc: Document) -> bool:
        """False when earlier runs answered every unit of this content (then no work, or duplicates)."""
        if self.subset is not None and doc not in self.subset:
            self.progress.documents_ready += 1  # outside the run, as if not found
            return False
        self._count_document(doc)
        pdf = self.cfg.pdf
        if self.subset is not None and not self.subset.whole(doc):  # decided unit by unit
            decision = DocumentDecision(prepare=True)
        else:
            decision = self.done.for_document(doc.sha256, self.fp, str(doc.path), pdf.first_page,
                                              pdf.last_page, self.opts.retry_failed)
        for page, last, of_path, of_run in decision.duplicates:
            self._record_duplicate(doc, page, last, decision.page_count, of_path, of_run)
        self.progress.already_done += decision.already_done
        if not decision.prepare:
            self.progress.documents_ready += 1
            self.progress.units_known += decision.already_done + len(decision.duplicates)
            return False
        if self._leaders.setdefault(doc.sha256, str(doc.path)) != str(doc.path):
            self._followers.append(doc)  # answered once, for the first path: see finish()
            self.progress.documents_ready += 1
            return False
        return True

    def _note_answer(self, row: dict[str, Any]) -> None:
        if row["status"] == UnitStatus.OK and row["source_sha256"] in self._leaders:
            self._answered.setdefault(row["source_sha256"], []).append(
                (row["page"], row["page_last"], row["page_count"]))

    def _record_followers(self) -> None:
        """Duplicate rows for the other paths of content sent once in this run (ok units only:
        a unit that failed is tried again, for every path, by the next run)."""
        for doc in self._followers:
            leader = self._leaders[doc.sha256]
            for page, last, count, of_path, of_run in self.done.answered_units(doc.sha256, self.fp):
                self._record_follower_duplicate(doc, page, last, count, of_path, of_run)
            for page, last, count in self._answered.get(doc.sha256, []):
                self._record_follower_duplicate(doc, page, last, count, leader, self.run_id)

    def _count_document(self, doc: Document) -> None:
        if str(doc.path) not in self._docs_seen:
            self._docs_seen.add(str(doc.path))
            self.progress.documents += 1

    def _record_follower_duplicate(self, doc: Document, page: int, last: int,
                                   count: int | None, of_path: str, of_run: str) -> None:
        if self.subset is not None and not self.subset.wants(doc, page, last, count):
            return
        self.progress.units_known += 1
        self._record_duplicate(doc, page, last, count, of_path, of_run)

    def _record_duplicate(self, doc: Document, page: int, last: int, count: int | None,
                          of_path: str, of_run: str) -> None:
        row = self.rows.unit_row(doc, page, last, count, UnitStatus.DUPLICATE,
                                 "same content already answered under another path")
        row.duplicate_of_path, row.duplicate_of_run = of_path, of_run
        self.recorder.page(row)

    async def _worker(self, queue: asyncio.Queue[PageUnit | None]) -> None:
        while (unit := await queue.get()) is not None:
            await self.sender.send(unit)

    # ------------------------------------------------------------ the end

    async def finish(self, outcome: RunOutcome | None = None) -> RunSummary:
        """Write the last parts and the manifest, release everything; idempotent."""
        if self._finished is not None:
            return self._finished
        self._signals.close()  # from here on a signal aborts, as before the run
        own_client, own_pool = self._owned
        try:
            if own_pool:
                await self.pool.aclose()
        finally:
            if own_client:
                await self.client.aclose()
        self._record_followers()
        p = self.progress
        if outcome is None:
            outcome = self.stop.reason or (RunOutcome.PARTIAL if p.units.failed
                                           else RunOutcome.COMPLETED)
        # documents after the pages are in Parquet, before the manifest: killed in between,
        # the journal stays and the run that folds it builds them
        self.recorder.maybe_flush(force=True)
        built = build_documents(self.root, self.recorder.touched, self.document_spec,
                                run_id=self.run_id, date=self.date)
        finished = datetime.now(UTC)
        self.recorder.close(self.recorder.manifest(
            finished_at=finished, documents=p.documents, outcome=outcome, error=self.stop.error,
            not_sent=p.not_sent + p.abandoned))
        self._release_locks()
        self._finished = RunSummary(
            run_id=self.run_id, kind=self.opts.kind, outcome=outcome,
            exit_code=(self._graceful.exit_code if outcome == RunOutcome.INTERRUPTED
                       and self._graceful and self._graceful.signum else RUN_EXIT[outcome]),
            error=self.stop.error, documents=p.documents,
            units_ok=p.units.ok, units_failed=p.units.failed, units_skipped=p.units.skipped,
            units_duplicate=p.units.duplicate,
            units_not_sent=p.not_sent + p.abandoned,
            units_already_done=p.already_done, requests=p.requests,
            rate_limited=p.rate_limited, credits=self.recorder.credits, usd=self.recorder.usd,
            duration_s=(finished - self.started_at).total_seconds(), output=str(self.root),
            files_passed_over=dict(self.discovery.skipped),
            still_growing=[str(p) for p in self.discovery.still_growing],
            settle_s=self.cfg.sources.settle_seconds,
            top_errors=self.recorder.errors.most_common(5), recovered_runs=self.recovered,
            documents_built=built.documents, documents_complete=built.complete,
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
