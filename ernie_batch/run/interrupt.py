"""Stopping a run as a command-line user expects: Ctrl-C (SIGINT) or SIGTERM, once, then maybe twice.

The first signal stops dispatching at once; requests already in flight get `grace_s`
seconds to come back (a second signal ends the grace at once); then they are abandoned,
what arrived is written, and the run ends with outcome `interrupted` and exit code 130
(SIGINT) or 143 (SIGTERM). Before a run has started (Prefect still starting) a signal
simply aborts, as Python's default would, but exits with the same code and no traceback.

Signal handlers run in the main thread; the run's event loop is told through
`call_soon_threadsafe`. Prefect's flow engine installs its own SIGTERM handler around a flow
run, so a run re-installs this one for as long as it works (`Graceful.handling()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ernie_batch.vocab import ExitCode

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# set by the CLI for the run it starts; a Pipeline that finds one stops gracefully on signals
GRACEFUL: contextvars.ContextVar[Graceful | None] = contextvars.ContextVar(
    "ernie_batch_graceful", default=None)


class Graceful:
    """One command's signal policy: who to tell, how long the grace lasts, which signal came."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.hurried = False  # a second signal: no more grace
        self._runs: list[tuple[asyncio.AbstractEventLoop, Callable[[bool], None]]] = []

    @property
    def exit_code(self) -> int:
        return ExitCode.SIGTERM if self.signum == signal.SIGTERM else ExitCode.SIGINT

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        else:
            self.hurried = True
        if not self._runs:  # nothing to stop gracefully yet: abort like Python's default
            raise KeyboardInterrupt
        for loop, notify in list(self._runs):
            with contextlib.suppress(RuntimeError):  # a loop that has closed meanwhile
                loop.call_soon_threadsafe(notify, not first)

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Our handlers for SIGINT and SIGTERM while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def subscribe(self, notify: Callable[[bool], None]) -> Callable[[], None]:
        """Tell `notify(hurry)` in the running loop about signals; returns the unsubscriber.

        A signal that came before the run subscribed is delivered at once.
        """
        entry = (asyncio.get_running_loop(), notify)
        self._runs.append(entry)
        if self.signum is not None:
            notify(self.hurried)
        return lambda: self._runs.remove(entry) if entry in self._runs else None


async def until(event: asyncio.Event, work: Any) -> None:
    """Await the coroutine `work`, cancelling it when `event` is set first (a stopping run
    must not wait for a slow document to finish preparing)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()  # its own exception, if it raised one


async def join(workers: list[asyncio.Task[None]], hurry: asyncio.Event | None) -> int:
    """Wait for `workers`; once `hurry` is set, cancel those still working (their requests are
    abandoned). Returns how many were cancelled."""
    gathered = asyncio.gather(*workers)
    if hurry is None:
        await gathered
        return 0
    waiter = asyncio.ensure_future(hurry.wait())
    try:
        await asyncio.wait({gathered, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if gathered.done():
        gathered.result()
        return 0
    busy = [w for w in workers if not w.done()]
    for worker in busy:
        worker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gathered
    return len(busy)
