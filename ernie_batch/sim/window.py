"""The RPM/TPM limiter: a sliding window of the requests and prompt tokens admitted, and Retry-After.

Limits are given per minute and scaled to the window (`rpm * window_s / 60` per window), so a
short window compresses time for benchmarks. A request that does not fit is answered 429 with
Retry-After, the seconds until it would fit.
"""

from __future__ import annotations

import math
from collections import deque


class SlidingWindow:
    """Requests and prompt tokens accepted in the last `window_s` seconds."""

    def __init__(self, rpm: float, tpm: float, window_s: float) -> None:
        scale = window_s / 60.0
        # At least one per window, or a low rate with a short window would admit nothing.
        self.req_cap = max(1, math.floor(rpm * scale + 1e-9)) if rpm > 0 else 0
        self.tok_cap = max(1, math.floor(tpm * scale + 1e-9)) if tpm > 0 else 0
        self.window_s = window_s
        self.entries: deque[tuple[float, int]] = deque()
        self.tokens_used = 0

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.window_s:
            self.tokens_used -= self.entries.popleft()[1]

    def try_admit(self, now: float, prompt_tokens: int) -> float | None:
        """Record the request and return None, or return seconds until it would fit."""
        self._expire(now)
        waits: list[float] = []
        if self.req_cap and len(self.entries) >= self.req_cap:
            waits.append(self.entries[len(self.entries) - self.req_cap][0] + self.window_s - now)
        if self.tok_cap and self.entries and self.tokens_used + prompt_tokens > self.tok_cap:
            # A request larger than a whole window's budget is admitted into an empty window.
            excess, freed = self.tokens_used + prompt_tokens - self.tok_cap, 0
            for at, n in self.entries:
                freed += n
                if freed >= excess:
                    waits.append(at + self.window_s - now)
                    break
            else:
                waits.append(self.entries[-1][0] + self.window_s - now)
        if waits:
            return max(0.001, max(waits))
        self.entries.append((now, prompt_tokens))
        self.tokens_used += prompt_tokens
        return None

    def headers(self, now: float) -> dict[str, str]:
        if not self.req_cap:
            return {}
        self._expire(now)
        return {
            "x-ratelimit-limit-requests": str(self.req_cap),
            "x-ratelimit-remaining-requests": str(max(0, self.req_cap - len(self.entries))),
        }


def retry_after(seconds: float) -> str:
    return f"{max(0.001, seconds):.3f}"
