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


def stop_home_servers(root: Path) -> None:
    """Stop every background Prefect server whose PREFECT_HOME is under `root` (commands leave
    one running for the next; a test's must not outlive the test)."""
    from ernie_batch.server.home import ServerHome
    from ernie_batch.server.local import stop

    for state in root.rglob("ernie-batch-server/state.json"):
        try:
            stop(ServerHome(state.parent.parent), force=True)
        except Exception:  # noqa: BLE001 - an attached one stops with its command
            pass


@pytest.fixture(scope="session", autouse=True)
def _no_server_outlives_the_session() -> Iterator[None]:
    yield
    stop_home_servers(Path(_HOME))


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None:
        stop_home_servers(tmp)


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

    from ernie_batch.api.client import ApiClient
    from ernie_batch.run.engine import Pipeline

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


S3_SECRET = "moto-secret-DISTINCTIVE-4b7e19c2"  # scanned for: never in a table, log or error


class LoopbackS3:
    """A real S3 API on loopback (moto's threaded server), and every request it answered."""

    def __init__(self) -> None:
        import logging
        import threading

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "moto-test-key-id",
                    "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
                    "AWS_ALLOW_HTTP": "true"}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), in order
        self._lock = threading.Lock()
        wsgi = self._server._server  # moto's werkzeug server: count what crosses the wire
        wsgi.app = self._recording(wsgi.app)

    def _recording(self, app):
        def record(environ, start_response):
            def start(status, headers, exc_info=None):
                with self._lock:
                    self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"],
                                          int(status.split()[0])))
                return start_response(status, headers, exc_info)
            return app(environ, start)
        return record

    def gets(self, bucket: str, prefix: str = "") -> list[str]:
        """The paths of the objects under bucket/prefix whose bytes were read (GET 200/206)."""
        under = f"/{bucket}/{prefix}"
        with self._lock:
            return [p for m, p, s in self.requests if m == "GET" and s in (200, 206)
                    and p.startswith(under) and p != f"/{bucket}/"]

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LoopbackS3]:
    """One loopback S3 per session (it starts in about a second); tests take a bucket each."""
    server = LoopbackS3()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: LoopbackS3, monkeypatch: pytest.MonkeyPatch):
    """A fresh bucket on the loopback S3, with the standard AWS environment that reaches it.

    Yields (server, bucket name); put objects with `put_object`."""
    import uuid

    import httpx

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_S3_ALLOW_UNSAFE_RENAME"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    # moto takes it unsigned; its first request loads the S3 backend (seconds under load)
    httpx.put(f"{s3_server.endpoint}/{bucket}", timeout=120).raise_for_status()
    yield s3_server, bucket


def put_object(bucket: str, key: str, data: bytes) -> str:
    """Write one object through the client the product uses; its ETag."""
    import obstore

    from ernie_batch.buckets import client, resolve_access

    return obstore.put(client(resolve_access(), "s3", bucket), key, data)["e_tag"]
