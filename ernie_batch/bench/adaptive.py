"""Benchmark `adaptive`: a limit the client is not told, found from 429s.

The same simulator and workload as `rate`, but the pipeline runs with `limits.rpm = 0`
(no limit known) and `limits.adaptive = true`: it sends unlimited until the first 429, then
paces under what the server accepted and probes upward. Headline: the rate the server saw
/ its true limit (goal 0.90), with at most 3 % of requests answered 429.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ernie_batch.bench._http import limited_run


def run(scale: float = 1.0) -> dict[str, Any]:
    """2,000 requests (x scale) against an undisclosed limit; see the module docstring."""
    figures = limited_run(scale, tell_client=False)
    share = figures["rate_limited"] / max(1, figures["requests"])
    return {"scenario": "adaptive", "ratio": figures.pop("ratio"), "goal": 0.9,
            "rate_limited_share": round(share, 4), "goal_rate_limited_share": 0.03,
            **figures}


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)))
