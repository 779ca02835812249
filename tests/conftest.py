"""Shared fixtures: a private Prefect home, Prefect's test harness, the simulator on loopback."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# before anything imports prefect: a private home, no telemetry, a patient ephemeral server
_HOME = tempfile.mkdtemp(prefix="ernie-prefect-home-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
SAMPLES = PROJECT / "ernie_batch" / "demo" / "samples"  # packaged: where the demo reads them
CORPUS = PROJECT.parent / "shared" / "corpus"
VENDOR = PROJECT.parent / "shared" / "vendor"
TEST_KEY = "sk-test-DISTINCTIVE-7f3a9c1e5b"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def sim_factory():
    """Start simulators with the given settings; all are stopped after the test."""
    from ernie_batch.sim import SimServer, SimSettings

    started: list[SimServer] = []

    def start(**kwargs) -> SimServer:
        kwargs.setdefault("api_key", TEST_KEY)
        server = SimServer(SimSettings(**kwargs)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def api_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AIMLAPI_API_KEY", TEST_KEY)
    return TEST_KEY


def job_config(sim_url: str, output: Path, sources: list[Path] | None = None, **overrides):
    """The demo config pointed at a simulator, the given sources and a temporary output."""
    from ernie_batch.config import load_config

    values = {
        "api.base_url": sim_url,
        "sources.paths": [str(p) for p in (sources or [SAMPLES])],
        "output.path": str(output),
        "prepare.workers": -1,
    }
    values.update(overrides)
    return load_config(PROJECT / "configs" / "demo.toml", values)


def run_mounted(cfg, app):
    """One run of the engine in process against a simulator's ASGI app (engine logic only:
    everything about the wire stays on loopback)."""
    import asyncio

    import httpx
    from pydantic import SecretStr

    from ernie_batch.client import ApiClient
    from ernie_batch.engine import Pipeline

    async def go():
        client = ApiClient("http://127.0.0.1:9/v1", SecretStr(TEST_KEY),  # never dialled
                           transport=httpx.ASGITransport(app=app))
        try:
            async with Pipeline(cfg, SecretStr(TEST_KEY), client=client) as run:
                await run.process(run.discover())
                return await run.finish()
        finally:
            await client.aclose()

    return asyncio.run(go())
