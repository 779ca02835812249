"""Injected faults: the seeded fault rates, and the responses that end an exchange at the socket.

Faults are drawn per request at seeded rates (`FaultRates`). Most are answers (a 429, a 5xx,
an HTML page, a broken answer); a dropped connection or a body cut short is done on the
connection itself, which is what `DroppedResponse` and the transport lookup are for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import uvicorn
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

# Order matters: with several rates set, the first kind whose draw hits wins.
FAULT_KINDS = (
    "rate_limited",
    "server_error",
    "slow",
    "reset",
    "truncated",
    "non_json",
    "length",
    "invalid_answer",
    "fenced",
)
BILLED_FAULTS = frozenset({"slow", "truncated", "length", "invalid_answer", "fenced"})


@dataclass
class FaultRates:
    """Probabilities per request (seeded), all 0 by default."""

    # sporadic 429 with Retry-After, whatever the rate (an aggregator's upstream shedding
    # load), apart from the RPM/TPM limit: drawn after admission, so it counts in the window
    # as the limit's own 429s do not; not billed
    rate_limited: float = 0.0
    server_error: float = 0.0  # 500/502/503/504 picked at random, not billed
    slow: float = 0.0  # answer only after SimSettings.slow_s; billed
    reset: float = 0.0  # connection dropped before any response byte; not billed
    truncated: float = 0.0  # billed, body cut short then the connection closes
    non_json: float = 0.0  # 200 with an HTML body; not billed
    length: float = 0.0  # finish_reason "length", JSON cut off mid-way; billed
    invalid_answer: float = 0.0  # 200, billed, JSON that violates the schema
    fenced: float = 0.0  # valid answer wrapped in prose + ```json fences; billed


NON_JSON_BODY = (
    b"<html><head><title>502 Bad Gateway</title></head><body>"
    b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


TransportLookup = Callable[[Scope], "asyncio.Transport | None"]


async def _wait_disconnect(receive: Receive, timeout: float = 2.0) -> None:
    """Wait until the server has seen the connection go, so it adds no 500 of its own."""
    with anyio.move_on_after(timeout):
        while (await receive())["type"] != "http.disconnect":
            pass


class DroppedResponse(Response):
    """Ends the exchange at the socket: reset before any byte, or a body cut short.

    Needs the connection's transport (SimServer provides the lookup); without one it raises,
    and the ASGI server then answers 500 or closes the connection itself.
    """

    def __init__(self, lookup: TransportLookup | None, full: bytes | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=200, headers=headers, media_type="application/json")
        self.lookup, self.full = lookup, full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = self.lookup(scope) if self.lookup else None
        if self.full is not None:
            headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
            headers.append((b"content-length", str(len(self.full)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            part = self.full[: len(self.full) // 2]
            await send({"type": "http.response.body", "body": part, "more_body": True})
        if transport is None:
            raise RuntimeError("simulated connection drop: no transport to drop")
        if self.full is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # linger 0: the close sends RST, as a dropped connection does
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()  # flushes the partial body, then FIN
        await _wait_disconnect(receive)


def uvicorn_transport_lookup(server: uvicorn.Server) -> TransportLookup:
    """Find a request's connection among the uvicorn server's (by the client's address)."""

    def lookup(scope: Scope) -> asyncio.Transport | None:
        client = tuple(scope.get("client") or ())
        for conn in list(server.server_state.connections):
            if getattr(conn, "client", None) == client:
                return getattr(conn, "transport", None)
        return None

    return lookup
