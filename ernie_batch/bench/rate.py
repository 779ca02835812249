"""Benchmark `rate`: how close to a known request limit the pipeline runs, without a 429.

The simulator enforces PER_WINDOW requests in any sliding WINDOW_S (time compressed: see
`_http`); the pipeline is told the limit (`limits.rpm`, `limits.window_s`). Headline: the
rate the server saw / the limit (goal 0.98), with no 429 provoked. Also `wall_ratio`: the
same over the whole run, start-up and the last answer's latency included.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ernie_batch.bench._http import limited_run


def run(scale: float = 1.0) -> dict[str, Any]:
    """2,000 requests (x scale) at the limit; see the module docstring."""
    figures = limited_run(scale, tell_client=True)
    return {"scenario": "rate", "ratio": figures.pop("ratio"), "goal": 0.98,
            "goal_rate_limited": 0, **figures}


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)))
