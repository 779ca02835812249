"""The async pipeline: discover -> prepare (process pool) -> send (rate-limited) -> record.

No Prefect in here: flows call `Pipeline` in batches, and so do tests and library users
(`run_job`). One `Pipeline` is one run: one lock, one journal, one rate limiter shared by
every request, one set of commits to the tables and one manifest row. Its parts each have
a room: `earlier.EarlierWork` decides what to skip, `duplicates.SameContent` sends content
once, `sender.UnitSender` owns the retry policy, `recorder.RunRecorder` the rows, progress
and manifest, `selected.SelectedUnits` what the run selected, `recovery` what killed runs left.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.answers import prompt
from ernie_batch.answers.documents import DocumentSpec, build_documents
from ernie_batch.answers.judge import answer_fields
from ernie_batch.api.client import ApiClient
from ernie_batch.api.limits import RequestBudget
from ernie_batch.config import JobConfig
from ernie_batch.intake.discover import discover
from ernie_batch.intake.prepare import PreparePool, prep_fingerprint
from ernie_batch.intake.units import DiscoveryStats, Document, PageUnit, Prepared, UnitFailure
from ernie_batch.location import Location
from ernie_batch.run import interrupt
from ernie_batch.run.duplicates import SameContent
from ernie_batch.run.earlier import EarlierWork
from ernie_batch.run.recorder import RunInfo, RunRecorder
from ernie_batch.run.recovery import recover_journals
from ernie_batch.run.rows import RowMaker
from ernie_batch.run.selected import SelectedUnits
from ernie_batch.run.sender import RunStop, UnitSender
from ernie_batch.run.staged import recover_staged
from ernie_batch.run.subset import Subset
from ernie_batch.run.summary import Progress, RunSummary
from ernie_batch.store import DocumentDecision, UnitDecision
from ernie_batch.vocab import RUN_EXIT, RunOutcome

# a progress callback set by whoever starts the run (the CLI), seen through Prefect's flow call
PROGRESS_OBSERVER: contextvars.ContextVar[Callable[[Progress], None] | None] = (
    contextvars.ContextVar("ernie_batch_progress", default=None))
# (sources, documents, stats) the caller found (the CLI, before Prefect): not walked again
FOUND: contextvars.ContextVar[tuple[list[str] | None, list[Document], DiscoveryStats] | None] = (
    contextvars.ContextVar("ernie_batch_found", default=None))


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
        self.root = cfg.output.root()
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
        self.pool: Preparer = pool or PreparePool(cfg.images, cfg.pdf, cfg.prepare,
                                                  text=cfg.prompt.evidence,
                                                  storage_options=cfg.sources.storage_options)
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
            flush_rows=cfg.output.flush_rows, commit_every_s=cfg.output.commit_every_s,
            stage_every_s=cfg.output.stage_every_s,
            on_progress=self.opts.on_progress or PROGRESS_OBSERVER.get(),
            on_page=lambda row: self.same.note_answer(row))
        self.progress.rate_limit_per_s = limits.rpm / 60.0 if limits.rpm else None
        prep_fp = prep_fingerprint(cfg.images, cfg.pdf, cfg.prepare)
        self.rows = RowMaker(self.run_id, self.fp, cfg.api.model,
                             answer_fields(cfg.resolved.schema), prep_fp)
        self.stop = RunStop(self.budget)
        self.sender = UnitSender(cfg, self.fp, self.client, self.budget, self.recorder, self.rows,
                                 self.stop)
        self.discovery = DiscoveryStats()
        self.earlier = EarlierWork(self.root, self.fp, prep_fp, cfg.pdf, force=self.opts.force,
                                   retry_failed=self.opts.retry_failed)
        self.done = self.earlier.done
        self._indexed: set[str] = set()  # content the done-index has read rows for
        self.startup_s = 0.0  # entry to locks held and recovery done, plus the done-index reads
        self.subset = Subset(self.opts.select) if self.opts.select is not None else None
        self.selected = SelectedUnits(cfg, self.earlier, self.subset)
        # same content at several paths of this selection: sent once, for the first path
        self.same = SameContent(self.rows, self.recorder, self.done, self.subset)
        self.recovered: list[str] = []
        self._lock = store.OutputLock(self.root, self.run_id)  # one top-level run at a time
        self._data_lock = store.data_lock(self.root, exclusive=False)  # no rewrite meanwhile
        self._own_lock = store.run_id_lock(self.root, self.run_id)  # our files are ours
        self._docs_seen: set[str] = set()
        self._crash: Exception | None = None  # a worker's unexpected error: the run ends with it
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
        store.check_layout(self.root)
        store.check_writable(self.root)
        if self.opts.parent_run_id is None:  # a shard run's coordinator holds it
            await asyncio.to_thread(self._lock.acquire, self.opts.wait_lock_s)
            loop = asyncio.get_running_loop()
            self._lock.when_lost(lambda: loop.call_soon_threadsafe(
                self.stop.set, RunOutcome.INTERRUPTED, f"the lease on output {self.root} was "
                "lost (not renewed in time, then taken over): stopped dispatching"))
        try:
            if not await asyncio.to_thread(self._data_lock.acquire, self.opts.wait_lock_s):
                raise store.LockedError(f"output folder {self.root} is being rewritten (compact "
                                        "or a rebuild holds it); use --wait to queue behind it")
            self._own_lock.try_acquire()
            self.recovered = recover_journals(self.root, self.pages_schema, skip_run=self.run_id)
            if self.opts.parent_run_id is None:  # we hold the run lease: the others are dead
                self.recovered += recover_staged(self.root, self.pages_schema, self.run_id)
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
        gc.freeze()  # what exists now outlives the run: no collection need scan it again
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

    def discover(self, sources: Iterable[str | Path | Location] | None = None) -> list[Document]:
        opts = self.cfg.sources
        if sources:
            opts = opts.model_copy(update={"paths": list(sources)})
        found, key = FOUND.get(), [str(s) for s in sources] if sources else None
        # objects on object storage whose (URL, ETag) the output knows are not read again
        docs, stats = found[1:] if found and found[0] == key else discover(
            opts, known=functools.partial(store.known_objects, self.root))
        self.selected.handed(docs)
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
        self.earlier.index(shas)
        self._indexed |= shas
        self.startup_s += time.perf_counter() - started

    # ------------------------------------------------------------ processing

    async def process(self, docs: list[Document]) -> None:
        """Prepare and send every unit of `docs` not done before; returns when all are recorded.

        A stop (fatal error, budget, interrupt) ends the feeding at once; requests in flight
        finish, or on an interrupt are abandoned once its grace is over.
        """
        self.selected.handed(docs)
        if self.stop.reason:
            return
        self._index(docs)
        queue: asyncio.Queue[PageUnit | None] = asyncio.Queue(maxsize=self.cfg.limits.concurrency)
        # twice the requests in flight: a unit waiting out its Retry-After (or a backoff)
        # holds a worker but no request slot, and the others go on filling the slots
        workers = [asyncio.create_task(self._worker(queue))
                   for _ in range(2 * self.cfg.limits.concurrency)]
        try:
            await interrupt.until(self.stop.stopped, self._feed(docs, queue))
        finally:
            for _ in workers:
                await queue.put(None)  # once stopped, workers drain the queue at once
            await interrupt.join(workers, self._hurry)
            self.recorder.maybe_commit()
        if self._crash is not None:
            raise self._crash

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
        every = prepared
        if self.subset is not None:
            prepared = [p for p in prepared
                        if self.subset.wants(doc, p.page, p.page_last, p.page_count)]
        self.selected.prepared(doc, every, len(prepared))
        self.progress.units_known += len(prepared)
        for item in prepared:
            if isinstance(item, UnitFailure):
                self._count_document(doc)
                if self.earlier.failure_done(doc, item):
                    self.progress.already_done += 1  # recorded, or given up on, earlier
                else:
                    self.recorder.page(self.rows.unit_row(
                        doc, item.page, item.page_last, item.page_count, item.status, item.error))
                continue
            decision = self.earlier.unit(doc, item.page, item.page_last)
            if decision == UnitDecision.SEND:
                await queue.put(item)
            elif decision == UnitDecision.DUPLICATE:
                of = self.done.answered_by(doc.sha256, self.fp, item.page, item.page_last)
                self.same.record(doc, item.page, item.page_last, item.page_count, *of)
            else:
                self.progress.already_done += 1

    def _needs_preparing(self, doc: Document) -> bool:
        """False when earlier runs answered every unit of this content (then no work, or duplicates)."""
        if self.subset is not None and doc not in self.subset:
            self.progress.documents_ready += 1  # outside the run, as if not found
            self.selected.add(doc, 0)
            return False
        self._count_document(doc)
        if self.subset is not None and not self.subset.whole(doc):  # decided unit by unit
            decision = DocumentDecision(prepare=True)
        else:
            decision = self.earlier.document(doc)
        for page, last, of_path, of_run in decision.duplicates:
            self.same.record(doc, page, last, decision.page_count, of_path, of_run)
        self.progress.already_done += decision.already_done
        if not decision.prepare:
            self.progress.documents_ready += 1
            self.progress.units_known += decision.already_done + len(decision.duplicates)
            self.selected.add(doc, decision.already_done + len(decision.duplicates))
            return False
        if self.same.follows(doc):  # answered once, for the first path: see finish()
            self.progress.documents_ready += 1
            return False
        return True

    def _count_document(self, doc: Document) -> None:
        if str(doc.path) not in self._docs_seen:
            self._docs_seen.add(str(doc.path))
            self.progress.documents += 1

    async def _worker(self, queue: asyncio.Queue[PageUnit | None]) -> None:
        """Sends units until the end; an unexpected error stops the run (the feeder would
        otherwise wait for room in the queue forever) and is raised once the others finish."""
        while (unit := await queue.get()) is not None:
            if self._crash is not None:
                continue  # drained, not sent: the run is ending
            try:
                await self.sender.send(unit)
            except Exception as exc:  # noqa: BLE001 - raised by process() when the others finish
                self._crash = exc
                self.stop.set(RunOutcome.INTERRUPTED, f"stopped by an internal error: {exc!r}")

    # ------------------------------------------------------------ the end

    async def finish(self, outcome: RunOutcome | None = None) -> RunSummary:
        """Write the last parts and the manifest, release everything; idempotent."""
        if self._finished is not None:
            return self._finished
        self._signals.close()  # from here on a signal aborts, as before the run
        gc.unfreeze()  # what was frozen at the start is collected again, as before the run
        own_client, own_pool = self._owned
        try:
            if own_pool:
                await self.pool.aclose()
        finally:
            if own_client:
                await self.client.aclose()
        p = self.progress
        # the rest of the followers' units: those their leaders did not answer in this run
        p.followers_unanswered += (self.selected.followers(self.same.followers)
                                   - self.same.record_followers())
        await asyncio.to_thread(self.selected.unreached, p, self.same.followers)
        # every selected unit is in one count: what none holds was not sent (the run stopped)
        not_sent = self.selected.units - (p.units.ok + p.units.failed + p.units.skipped
                                          + p.units.duplicate + p.followers_unanswered
                                          + p.already_done)
        if outcome is None:
            outcome = self.stop.reason or (RunOutcome.PARTIAL if p.units.failed
                                           else RunOutcome.COMPLETED)
        # the last round of attempts and pages, the manifest journaled, documents (built from
        # the committed pages), the manifest committed last: killed anywhere in between, the
        # journal stays and the run that folds it commits what is missing
        version = self.recorder.end_rows()
        finished = datetime.now(UTC)
        # the budget tells the 429s apart (a shard's stand-in leaves it to its coordinator)
        sporadic = (min(p.rate_limited, self.budget.refusals[1])
                    if isinstance(self.budget, RequestBudget) else 0)
        manifest = self.recorder.manifest(
            finished_at=finished, documents=p.documents, outcome=outcome, error=self.stop.error,
            not_sent=not_sent, selected=self.selected.units, refused_sporadic=sporadic)
        self.recorder.note_manifest(manifest)
        built = build_documents(self.root, self.recorder.touched, self.document_spec,
                                run_id=self.run_id, date=self.date, version=version,
                                fresh=self.done.unrecorded(self._indexed))
        self.recorder.close(manifest)
        self._release_locks()
        self._finished = RunSummary(
            run_id=self.run_id, kind=self.opts.kind, outcome=outcome,
            exit_code=(self._graceful.exit_code if outcome == RunOutcome.INTERRUPTED
                       and self._graceful and self._graceful.signum else RUN_EXIT[outcome]),
            error=self.stop.error, documents=p.documents,
            units_ok=p.units.ok, units_failed=p.units.failed, units_skipped=p.units.skipped,
            units_duplicate=p.units.duplicate + p.followers_unanswered,
            units_not_sent=not_sent, units_already_done=p.already_done,
            units_selected=self.selected.units, requests=p.requests,
            rate_limited=p.rate_limited - sporadic, refused_sporadic=sporadic,
            credits=self.recorder.credits, usd=self.recorder.usd,
            duration_s=(finished - self.started_at).total_seconds(), output=str(self.root),
            files_passed_over=dict(self.discovery.skipped),
            still_growing=[str(p) for p in self.discovery.still_growing],
            settle_s=self.cfg.sources.settle_seconds,
            top_errors=self.recorder.errors.most_common(5), recovered_runs=self.recovered,
            documents_built=built.documents, documents_complete=built.complete,
            still_unreadable=sorted(self.earlier.unreadable),
            unreadable_since=min(self.earlier.unreadable.values(), default=None),
        )
        return self._finished


def batches(docs: list[Document], size: int) -> list[list[Document]]:
    return [docs[i:i + size] for i in range(0, len(docs), size)]


async def run_pipeline(cfg: JobConfig, key: SecretStr, opts: RunOptions | None = None,
                       sources: list[str | Path | Location] | None = None) -> RunSummary:
    """The whole run without Prefect: library use and tests."""
    async with Pipeline(cfg, key, opts) as run:
        await run.process(run.discover(sources))
        return await run.finish()


def run_job(cfg: JobConfig, key: SecretStr, opts: RunOptions | None = None,
            sources: list[str | Path | Location] | None = None) -> RunSummary:
    return asyncio.run(run_pipeline(cfg, key, opts, sources))
