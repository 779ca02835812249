"""A local simulator of the AI/ML API chat-completions endpoint and its usage logs (starlette + uvicorn).

The pipeline's tests, demo and benchmarks run against it. Modules: `validation` (the 400s),
`answers` (schema-true JSON), `window` (the 429s of RPM/TPM), `faults` (injected failures),
`usage_logs` (`GET /v2/logs`), `settings` (how it behaves), `ledger` (what it billed), `app`
(the routes, billing and headers) and `server` (running it).
"""

from ernie_batch.sim.answers import generate_value
from ernie_batch.sim.app import Simulator, error_response
from ernie_batch.sim.faults import FaultRates
from ernie_batch.sim.server import SimControl, SimServer, serve
from ernie_batch.sim.settings import DEFAULT_MODEL, SimSettings
from ernie_batch.sim.window import SlidingWindow

__all__ = [
    "DEFAULT_MODEL",
    "FaultRates",
    "SimControl",
    "SimServer",
    "SimSettings",
    "Simulator",
    "SlidingWindow",
    "error_response",
    "generate_value",
    "serve",
]
