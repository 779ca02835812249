"""A lease: permission from the request budget to send one request, handed back once."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol


class Releaser(Protocol):
    """What a lease hands itself back to (the request budget, `limits.RequestBudget`)."""

    def release(self, lease: Lease, *, outcome: str, actual_tokens: int | None = None,
                retry_after: float | None = None) -> None: ...

OUTCOMES = ("ok", "rate_limited", "error")


@dataclass(eq=False)
class Lease:
    """Permission to send one request; hand it back with `RequestBudget.release` exactly once.

    Also an async context manager: leaving the block without a release releases it with
    outcome "error" if the block raised (cancellation included), else "ok".
    """

    est_tokens: int
    started_at: float
    _budget: Releaser = field(repr=False)
    _seq: int = field(repr=False)
    _window_count: int = field(repr=False)  # acquisitions in the window_s ending here
    _charged: float = field(default=0.0, repr=False)
    _token_entry: list[float] | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def released(self) -> bool:
        return self._released

    def release(self, *, outcome: str, actual_tokens: int | None = None,
                retry_after: float | None = None) -> None:
        """Shorthand for `budget.release(lease, ...)`."""
        self._budget.release(self, outcome=outcome, actual_tokens=actual_tokens,
                             retry_after=retry_after)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._released:
            self._budget.release(self, outcome="error" if exc_type is not None else "ok")
