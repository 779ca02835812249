"""How long a refused request asks us to wait: `Retry-After` and the `x-ratelimit-reset-*` headers.

Read by the client from each 429 or 5xx; the request budget turns it into a pause shared
by every sender.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping

MAX_RETRY_AFTER_S = 300.0

_NUMBER = re.compile(r"\s*\+?(\d+(?:\.\d*)?|\.\d+)\s*")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_RESET_HEADERS = (("x-ratelimit-reset-requests", "x-ratelimit-remaining-requests"),
                  ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
                  ("x-ratelimit-reset", "x-ratelimit-remaining"))


def _duration(text: str) -> float | None:
    """'1.5', '250ms', '6m0s', '1h2m3.5s' -> seconds; None if it is none of those."""
    number = _NUMBER.fullmatch(text)
    if number:
        return float(number.group(1))
    text = text.strip()
    if not text:
        return None
    total, pos = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != pos:
            return None
        total += float(part.group(1)) * _UNIT_S[part.group(2)]
        pos = part.end()
    return total if pos == len(text) and pos > 0 else None


def _cap(seconds: float) -> float | None:
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait before retrying, from a 429's headers; None when they do not say.

    `Retry-After` (seconds or an HTTP date; `retry-after-ms` first where sent), else the
    `x-ratelimit-reset-*` headers ("1s", "250ms", "6m0s", "0.5", or an epoch timestamp for
    the bare `x-ratelimit-reset`), preferring the limits whose `remaining` is 0. `now` is
    epoch seconds for dates (default: the current time). Capped at 300 s.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    wall = time.time() if now is None else now

    ms = lower.get("retry-after-ms")
    if ms is not None and (m := _NUMBER.fullmatch(ms)):
        return _cap(float(m.group(1)) / 1000.0)

    value = lower.get("retry-after")
    if value is not None:
        if m := _NUMBER.fullmatch(value):
            return _cap(float(m.group(1)))
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
        if when is not None and when.tzinfo is not None:
            return _cap(when.timestamp() - wall)

    found: list[tuple[float, bool]] = []
    for reset_name, remaining_name in _RESET_HEADERS:
        raw = lower.get(reset_name)
        if raw is None:
            continue
        seconds = _duration(raw)
        if seconds is None:
            continue
        if reset_name == "x-ratelimit-reset" and seconds > 1e9:
            seconds -= wall  # an epoch timestamp (GitHub style), not a duration
        exhausted = lower.get(remaining_name, "").strip() in ("0", "0.0")
        found.append((seconds, exhausted))
    if not found:
        return None
    exhausted = [s for s, e in found if e]
    return _cap(max(exhausted or [s for s, _ in found]))
