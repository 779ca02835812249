"""Progress for long runs: a live rich line on a terminal, a plain line now and then elsewhere.

Called from the engine on every finished unit, so it throttles itself: a terminal is
redrawn at most 4 times a second, a log (cron, CI) gets a line every `every_s` seconds.
"""

from __future__ import annotations

import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from ernie_batch.summary import Progress


def _eta(p: Progress) -> str:
    remaining = max(p.units_queued - p.units_done, 0)
    elapsed = time.monotonic() - p.started
    if not p.units_done or not remaining or p.documents < p.documents_total:
        return "?" if remaining or p.documents < p.documents_total else "0 s"
    seconds = remaining * elapsed / p.units_done
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def line(p: Progress) -> str:
    return (f"files {p.documents}/{p.documents_total}  pages {p.units_done} done "
            f"({p.units.ok} ok, {p.units.failed} failed, {p.units.skipped + p.units.duplicate} skipped)  "
            f"{p.rpm():.0f} req/min  {p.credits:,.0f} credits  ${p.usd:.4f}  ETA {_eta(p)}")


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
            self._live = Live(Text("starting…"), console=self.console, refresh_per_second=4,
                              transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
        elif self._latest is not None:
            self.console.print(line(self._latest), highlight=False)

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
