"""What a run tells its watchers: live `Progress` counters while it works, a `RunSummary` at the end.

Plain values: progress displays, reports, Prefect artifacts and `--json` depend on these,
never on the engine that fills them in.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ernie_batch.vocab import Tally


@dataclass
class Progress:
    """Counters for progress displays; updated in place as units finish."""

    documents_total: int = 0  # discovered
    documents: int = 0  # considered (skipped whole, or prepared)
    documents_ready: int = 0  # whose units are all known
    units_known: int = 0  # units of the ready documents
    units_done: int = 0  # rows recorded
    units: Tally = field(default_factory=Tally)  # rows by status
    already_done: int = 0  # answered (or given up on) by earlier runs: no row, no request
    # paths whose content another path of the run carries, in units that path did not answer
    followers_unanswered: int = 0
    not_sent: int = 0  # selected but not sent because the run stopped
    abandoned: int = 0  # in flight when an interrupt's grace ran out: no row, sent next time
    rate_limit_per_s: float | None = None  # the configured request rate, for early ETAs
    finish_times: deque[float] = field(default_factory=lambda: deque(maxlen=5000))
    requests: int = 0
    rate_limited: int = 0
    credits: float = 0.0
    usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    request_times: deque[float] = field(default_factory=lambda: deque(maxlen=5000))

    @property
    def units_finished(self) -> int:
        """Units this run is through with, whatever became of them."""
        return self.units_done + self.already_done + self.not_sent + self.abandoned

    def finished_within(self, window_s: float, now: float) -> int:
        """Units finished by requests in the last `window_s` seconds."""
        return sum(1 for t in self.finish_times if now - t <= window_s)

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
    units_skipped: int = 0  # not sent by rule: unsupported type, pdf.max_pages, page range
    units_duplicate: int = 0  # same content as another path: a duplicate row, no request
    units_not_sent: int = 0  # selected, but the run stopped before sending them
    units_already_done: int = 0  # answered (or given up on) by an earlier run: no row
    units_selected: int = 0  # every unit selected: the six counts above add up to it
    documents_built: int = 0  # documents rows this run wrote (documents it touched)
    documents_complete: int = 0  # of them, every page of the configured range answered
    requests: int = 0
    rate_limited: int = 0  # 429s attributed to the limit (they cut the rate)
    refused_sporadic: int = 0  # 429s that did not follow the rate: retried, no rate cut
    credits: float = 0.0
    usd: float = 0.0
    duration_s: float = 0.0
    output: str = ""
    files_passed_over: dict[str, int] = {}  # by reason (vocab.PassedOver)
    still_growing: list[str] = []  # the files passed over as still growing, by name
    settle_s: float = 0.0  # sources.settle_seconds: what "still growing" meant
    top_errors: list[tuple[str, int]] = []
    # files no earlier run could prepare with these settings (any prompt): not tried again
    still_unreadable: list[str] = []
    unreadable_since: str | None = None  # the earliest run that could not read one of them
    recovered_runs: list[str] = []
    shard_runs: list[dict[str, Any]] = []  # a coordinator's: each shard's accepted run
    review_html: str | None = None  # the run's review page ([review] html = true)
