"""How a simulated endpoint behaves: its key, models, limits, balance, faults and prices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ernie_batch.sim.faults import FaultRates

DEFAULT_MODEL = "baidu/ernie-4.5-vl-424b-a47b"


@dataclass
class SimSettings:
    """How the simulated endpoint behaves: key, models, limits, balance, faults, prices."""

    api_key: str
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    rpm: float = 0.0  # 0 = no limit; at most rpm * window_s / 60 accepted per window
    tpm: float = 0.0  # 0 = no limit; prompt tokens accepted per window, scaled the same way
    window_s: float = 60.0  # shorter windows compress time for benchmarks
    max_concurrency: int = 0  # 0 = no limit
    balance_credits: float | None = None  # None = unlimited
    faults: FaultRates = field(default_factory=FaultRates)
    # Retry-After of the sporadic 429s (`faults.rate_limited`); None: drawn from 0.5-2 s
    # (times window_s / 60 when the window is shorter than a minute)
    sporadic_retry_after_s: float | None = None
    seed: int = 0
    slow_s: float = 30.0
    reject_response_formats: tuple[str, ...] = ()
    reject_system_role: bool = False
    credits_per_prompt_token: float = 0.882
    credits_per_completion_token: float = 2.625
    send_usd: bool = True
    has_balance: bool = True  # False: GET /v1/billing/balance is a 404 (as on vLLM, Ollama)
    # tests script answers: content_sha256 of a request's media -> the answer to give (any
    # JSON value, valid or not); other requests get generated answers; faults still apply
    scripted: dict[str, Any] = field(default_factory=dict)
    # scripted answers as the truth a prompt version misreads: version (json_schema.name, or
    # a marker its prompt carries) -> field -> rate; seeded, see sim/misreads.py
    error_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    usage_logs: bool = True  # False: no GET /v2/logs (404), as on vLLM or Ollama
    logs_lag_s: float = 0.0  # seconds from a charge to its row in GET /v2/logs
    logs_limit: int = 200  # GET /v2/logs calls accepted per logs_window_s (then 429)
    logs_window_s: float = 60.0
    body_credits_offset: float = 0.0  # added to the body's credits_used only (not billed)
