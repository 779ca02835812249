"""Benchmark scenarios for `ernie-batch bench`.

Each scenario module exposes `run(scale: float = 1.0) -> dict` returning one JSON-able
object: `scenario`, the headline `ratio` (measured against a baseline in the same run),
its `goal`, and the other figures by name. Never wall-clock limits: ratios.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

SCENARIOS = ("intake", "rate", "adaptive", "overhead")


def scenario(name: str) -> Callable[[float], dict[str, Any]]:
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    return importlib.import_module(f"ernie_batch.bench.{name}").run
