"""Running the simulator: `SimServer` (uvicorn in a background thread) and `serve()` (foreground)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from ernie_batch.sim.app import Simulator
from ernie_batch.sim.faults import uvicorn_transport_lookup
from ernie_batch.sim.settings import SimSettings

log = logging.getLogger(__name__)


def _uvicorn_config(sim: Simulator, host: str, port: int, *, quiet: bool) -> uvicorn.Config:
    return uvicorn.Config(
        sim.app,
        host=host,
        port=port,
        http="h11",
        loop="asyncio",
        lifespan="off",
        access_log=False,
        # In-process: leave the host program's logging alone, show only warnings and errors.
        log_config=None if quiet else LOGGING_CONFIG,
        log_level="warning" if quiet else "info",
        timeout_graceful_shutdown=2,
    )


class SimControl:
    """The `_sim/*` routes over HTTP, for a simulator served at `url` (ending in /v1).

    Over HTTP, so a server in this process (SimServer) and one in a child process (the
    benchmarks' SimProcess) are read the same way.
    """

    url: str

    def _root(self) -> str:
        return self.url.removesuffix("/v1")

    def ledger(self) -> dict[str, Any]:
        """{entries, totals, stats} as `GET /_sim/ledger` gives them."""
        return httpx.get(self._root() + "/_sim/ledger", timeout=60).json()

    def reset(self) -> None:
        """Empty the ledger and the stats, as `POST /_sim/reset` does."""
        httpx.post(self._root() + "/_sim/reset", timeout=10).raise_for_status()


class SimServer(SimControl):
    """Runs a Simulator under uvicorn in a background thread (tests, demo, benchmarks).

    `ledger()` and `reset()` (from SimControl) work once it has started.
    """

    def __init__(self, settings: SimSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = Simulator(settings)
        self.host, self.port = host, port
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SimServer:
        # Bind here so that port 0 resolves to a real port before the thread starts. The
        # explicit IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when
        # the proto is TCP, and without it every answer waits ~40 ms on Nagle + delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(_uvicorn_config(self.simulator, self.host, self.port, quiet=True))
        self.simulator.transport_lookup = uvicorn_transport_lookup(server)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"sim-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"simulator failed to start on {self.host}:{self.port}")
            time.sleep(0.002)
        self.url = f"http://{self.host}:{self.port}/v1"
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self.simulator.closing = True
        self._server.should_exit = True
        self._thread.join(timeout=15)
        if self._thread.is_alive():
            log.warning("simulator thread on port %s did not stop in time", self.port)
        self._server = self._thread = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(settings: SimSettings, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the simulator in the foreground until interrupted (`ernie-batch sim`)."""
    sim = Simulator(settings)
    server = uvicorn.Server(_uvicorn_config(sim, host, port, quiet=False))
    sim.transport_lookup = uvicorn_transport_lookup(server)
    server.run()
