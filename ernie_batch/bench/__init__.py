"""Benchmark scenarios for `ernie-batch bench`.

Each scenario module exposes `run(scale: float = 1.0) -> dict` returning one JSON-able
object: `scenario`, the headline `ratio` (measured against a baseline in the same run),
its `goal`, and the other figures by name. Never wall-clock limits: ratios.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

SCENARIOS = ("intake", "rate", "adaptive", "sporadic", "overhead", "evidence",
             "startup")  # the default set
# by name only: minutes (a gigabyte of disk; a Prefect server; an S3 server, the test extra)
EXTRA = ("history", "scale", "plan", "objects")
OUTPUT_SCENARIOS = ("history",)  # take `output` after `scale`: where they write (`--output`)


def scenario(name: str) -> Callable[..., dict[str, Any]]:
    if name not in SCENARIOS + EXTRA:
        raise KeyError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS + EXTRA)})")
    return importlib.import_module(f"ernie_batch.bench.{name}").run


def max_in_any_window(times: list[float], window: float) -> int:
    """The most events inside any half-open interval [t, t + window): what a sliding-window
    limiter counts, so benchmarks and tests read a rate the way the server does."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
