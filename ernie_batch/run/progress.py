"""Progress for long runs: a live rich line on a terminal, a plain line now and then elsewhere.

Called from the engine on every finished unit, so it throttles itself: a terminal is
redrawn at most 4 times a second, a log (cron, CI) gets a line every `every_s` seconds.
Before the run starts, `status()` says what the command is waiting for (Prefect, the lock).

The ETA is what remains over the rate achieved in the last minute (the configured rate
limit until requests have finished): units still to come are counted for the documents
prepared so far, and estimated for the rest at the same units per document.
"""

from __future__ import annotations

import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from ernie_batch.run.summary import Progress

MIN_FINISHED_FOR_RATE = 5  # fewer finished units in the window: trust the configured limit


def estimated_total(p: Progress) -> int:
    """Units of the whole selection: known ones, plus the rest at the same units per document."""
    if p.documents_ready == 0 or p.documents_ready >= p.documents_total:
        return max(p.units_known, p.units_finished)
    per_doc = p.units_known / p.documents_ready
    return max(round(p.units_known + per_doc * (p.documents_total - p.documents_ready)),
               p.units_finished)


def eta_seconds(p: Progress, now: float | None = None) -> float | None:
    """Seconds left at the rate achieved (or allowed); None when there is no rate to go by."""
    remaining = estimated_total(p) - p.units_finished
    if remaining <= 0:
        return 0.0
    now = time.monotonic() if now is None else now
    recent = p.finished_within(60.0, now)
    if recent >= MIN_FINISHED_FOR_RATE:
        rate = recent / min(60.0, max(now - p.started, 1e-6))
    else:
        rate = p.rate_limit_per_s or 0.0
    return remaining / rate if rate > 0 else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def line(p: Progress) -> str:
    u = p.units
    return (f"files {p.documents}/{p.documents_total}  units {p.units_finished}/"
            f"{estimated_total(p)} (units_ok {u.ok}, units_failed {u.failed}, "
            f"units_skipped {u.skipped}, units_duplicate {u.duplicate}, "
            f"units_already_done {p.already_done})  {p.rpm():.0f} req/min  "
            f"{p.credits:,.0f} credits  ${p.usd:.4f}  ETA {_duration(eta_seconds(p))}")


class ProgressView:
    """Use as a context manager around the run; pass the instance as the progress observer."""

    def __init__(self, console: Console | None = None, every_s: float = 10.0,
                 stream: TextIO | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live_mode = self.console.is_terminal
        self.every_s = every_s
        self._last = 0.0
        self._live: Live | None = None
        self._latest: Progress | None = None

    def __enter__(self) -> ProgressView:
        if self.live_mode:
            self._live = Live(Text("starting …"), console=self.console, refresh_per_second=4,
                              transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
        elif self._latest is not None:
            self.console.print(line(self._latest), highlight=False)

    def status(self, message: str) -> None:
        """What the command waits for before the run's first progress (a line, once)."""
        if self._live is not None:
            self._live.update(Text(message))
        else:
            self.console.print(message, highlight=False)

    def note(self, message: str) -> None:
        """A recurring status (a coordinator's shards): the live line, or a line every `every_s`."""
        now = time.monotonic()
        if self._live is not None:
            self._live.update(Text(message))
        elif now - self._last >= self.every_s:
            self.console.print(message, highlight=False)
            self._last = now

    def __call__(self, p: Progress) -> None:
        self._latest = p
        now = time.monotonic()
        if self._live is not None:
            if now - self._last >= 0.25:
                self._live.update(Text(line(p)))
                self._last = now
        elif now - self._last >= self.every_s:
            self.console.print(line(p), highlight=False)
            self._last = now
