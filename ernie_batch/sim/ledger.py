"""What the simulator bills and whom it answered: the ledger tests read back, and a call's ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LedgerEntry:
    """One billed request, as the vendor would charge it (whole credits)."""

    response_id: str
    content_sha256: str
    prompt_tokens: int
    completion_tokens: int
    credits: int
    usd: float
    delivered: bool  # the whole body was sent to a client still there
    status_code: int
    fault: str | None
    at: float
    inference_id: str = ""
    client_request_id: str | None = None
    headers_delivered: bool = True  # the headers (with the cost) were sent to the client


@dataclass(frozen=True)
class Call:
    """One request that reached the model: its ids and when it arrived."""

    arrived: float
    inference_id: str
    client_request_id: str | None
    model: str

    def headers(self) -> dict[str, str]:
        found = {"x-inference-id": self.inference_id}
        if self.client_request_id is not None:
            found["x-client-request-id"] = self.client_request_id
        return found
