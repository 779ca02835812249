"""`GET /v2/logs`: what the client asks checked against the vendor's OpenAPI file, what the
simulator answers checked against it too, and the endpoint's rules (window, status, paging,
lag, rate limit) as both sides keep them, over HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from jsonschema import Draft202012Validator
from pydantic import SecretStr

from ernie_batch.api.usage_logs import UsageLogsClient, UsageRow, logs_url, windows
from ernie_batch.errors import NoUsageLogs, UsageLogsError
from ernie_batch.sim.usage_logs import LogRow
from tests.conftest import TEST_KEY, VENDOR
from tests.test_contract import openapi_to_jsonschema

SPEC = VENDOR / "aimlapi-usage-logs-v2.openapi.json"
pytestmark = pytest.mark.skipif(not SPEC.exists(), reason=f"vendor OpenAPI file absent: {SPEC}")
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
MODEL = "baidu/ernie-4.5-vl-424b-a47b"


def spec_operation() -> dict:
    return json.loads(SPEC.read_text())["paths"]["/v2/logs"]["get"]


def root(sim) -> str:
    return sim.url.removesuffix("/v1")


def seed_rows(sim, n: int, *, start: float, step: float = 1.0, model: str = MODEL,
              status: str = "succeeded", lag: float = 0.0) -> list[LogRow]:
    rows = [LogRow(created=start + i * step, visible_at=time.time() + lag, status=status,
                   model=model, credits=100 + i, usd=(100 + i) / 2e6, tokens_input=10,
                   tokens_output=i, request_id=f"req-{i}", inference_id=f"inf-{start}-{i}",
                   client_request_id=None) for i in range(n)]
    for row in rows:
        sim.simulator.logs.add(row)
    return rows


def get(sim, **params) -> httpx.Response:
    return httpx.get(root(sim) + "/v2/logs", params=params, headers=AUTH, timeout=10)


def fetch(sim, start: datetime, end: datetime, *, transport=None, **kwargs):
    async def go():
        async with UsageLogsClient(root(sim) + "/v2/logs", SecretStr(TEST_KEY),
                                   transport=transport, **kwargs) as client:
            return await client.rows(start, end, [MODEL]), client

    return asyncio.run(go())


class Recording(httpx.AsyncHTTPTransport):
    """The real transport, keeping each request's URL (for the contract checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        return await super().handle_async_request(request)


# ---------------------------------------------------------------- the contract


def test_the_clients_requests_follow_the_vendors_parameters(sim_factory):
    sim = sim_factory()
    now = time.time()
    seed_rows(sim, 230, start=now - 500)
    declared = {p["name"]: p for p in spec_operation()["parameters"]}
    rec = Recording()
    start = datetime.fromtimestamp(now - 1000, UTC)
    rows, _ = fetch(sim, start, datetime.fromtimestamp(now, UTC), transport=rec)
    assert len(rows) == 230 and len(rec.urls) == 3  # 100 + 100 + 30
    offsets = []
    for url in rec.urls:
        params = parse_qsl(urlsplit(url).query)
        names = [k for k, _ in params]
        assert set(names) <= set(declared), names
        assert "period" not in names and names.count("start") == names.count("end") == 1
        values = dict(params)
        lo = datetime.fromisoformat(values["start"].replace("Z", "+00:00"))
        hi = datetime.fromisoformat(values["end"].replace("Z", "+00:00"))
        assert values["start"].endswith("Z") and lo <= hi <= lo + timedelta(days=92)
        statuses = [v for k, v in params if k == "status"]
        assert sorted(statuses) == sorted(declared["status"]["schema"]["enum"])  # both, repeated
        limit = declared["limit"]["schema"]
        assert int(values["limit"]) == limit["maximum"] >= limit["minimum"]
        assert [v for k, v in params if k == "model"] == [MODEL]
        offsets.append(int(values["offset"]))
    assert offsets == [0, 100, 200]


def test_the_simulators_answers_follow_the_vendors_response_schema(sim_factory):
    sim = sim_factory()
    seed_rows(sim, 3, start=time.time() - 60)
    seed_rows(sim, 1, start=time.time() - 30, status="failed")
    res = get(sim, period="1h", limit=2)
    assert res.status_code == 200
    schema = spec_operation()["responses"]["200"]["content"]["application/json"]["schema"]
    errors = [e.message for e in Draft202012Validator(openapi_to_jsonschema(schema))
              .iter_errors(res.json())]
    assert not errors, errors
    body = res.json()
    assert body["pagination"] == {"limit": 2, "offset": 0, "total": 4, "has_more": True}
    created = [r["created"] for r in body["data"]]
    assert created == sorted(created, reverse=True)  # newest first


def test_a_row_as_the_vendor_documents_it_parses():
    schema = spec_operation()["responses"]["200"]["content"]["application/json"]["schema"]
    item = {k: v.get("example") for k, v in schema["properties"]["data"]["items"]
            ["properties"].items()}
    props = schema["properties"]["data"]["items"]["properties"]
    item["cost"] = {k: v["example"] for k, v in props["cost"]["properties"].items()}
    item["tokens"] = {k: v["example"] for k, v in props["tokens"]["properties"].items()}
    row = UsageRow.parse(item)
    assert row.inference_id == "inf-1" and row.client_request_id == "customer-42"
    assert row.cost_credits == 500000 and row.tokens_total == 30
    assert row.created == datetime(2026, 7, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(ValueError):
        UsageRow.parse({k: v for k, v in item.items() if k != "inference_id"})


# ---------------------------------------------------------------- the endpoint's rules


@pytest.mark.parametrize("params, fragment", [
    ({"period": "7d", "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}, "never both"),
    ({"start": "2026-01-01T00:00:00Z"}, "both start and end"),
    ({"start": "2026-01-01T00:00:00Z", "end": "2026-04-03T00:00:01Z"}, "92 days"),
    ({"period": "93d"}, "92 days"),
    ({"period": "1h", "status": "succeeded,failed"}, "status"),
    ({"period": "1h", "limit": 101}, "limit"),
    ({"period": "1h", "limit": 0}, "limit"),
    ({"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "earlier"),
])
def test_the_simulator_refuses_what_the_vendor_refuses(sim_factory, params, fragment):
    sim = sim_factory()
    res = get(sim, **params)
    assert res.status_code == 400, res.text
    assert fragment in res.json()["message"]


def test_window_filters_lag_and_auth(sim_factory):
    sim = sim_factory()
    now = time.time()
    seed_rows(sim, 2, start=now - 100)
    seed_rows(sim, 1, start=now - 50, lag=0.6)  # charged, not logged yet
    seed_rows(sim, 1, start=now - 40, model="openai/gpt-5")
    assert get(sim, period="1h").json()["pagination"]["total"] == 3
    assert get(sim, period="1h", model="gpt-5").json()["pagination"]["total"] == 1
    assert get(sim, period="1h", model=MODEL).json()["pagination"]["total"] == 2
    time.sleep(0.7)
    assert get(sim, period="1h", model=MODEL).json()["pagination"]["total"] == 3
    lo = datetime.fromtimestamp(now - 60, UTC).isoformat()  # no offset: read as UTC
    assert get(sim, start=lo, end=datetime.fromtimestamp(now, UTC).isoformat()
               ).json()["pagination"]["total"] == 2
    bad = httpx.get(root(sim) + "/v2/logs", params={"period": "1h"},
                    headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401


def test_a_window_over_92_days_is_asked_in_parts():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    parts = windows(start, start + timedelta(days=200))
    assert len(parts) == 3 and parts[0][0] == start and parts[-1][1] == start + timedelta(days=200)
    assert all(hi - lo <= timedelta(days=92) for lo, hi in parts)
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    assert windows(start, start) == [(start, start)]


def test_the_client_asks_a_long_window_in_92_day_calls(sim_factory):
    sim = sim_factory()
    now = time.time()
    old = now - 150 * 86400
    seed_rows(sim, 2, start=old)
    seed_rows(sim, 2, start=now - 10)
    rows, client = fetch(sim, datetime.fromtimestamp(now - 200 * 86400, UTC),
                         datetime.fromtimestamp(now, UTC))
    assert len(rows) == 4 and client.calls == 3  # 3 windows, one page each, none refused


def test_the_client_waits_out_429s_and_paces_itself_to_the_limit(sim_factory):
    now = time.time()
    # the endpoint allows 3 calls a second; a client told 200 a minute meets its 429s
    sim = sim_factory(logs_limit=3, logs_window_s=1.0)
    seed_rows(sim, 650, start=now - 700)
    rows, client = fetch(sim, datetime.fromtimestamp(now - 800, UTC),
                         datetime.fromtimestamp(now, UTC))
    assert len(rows) == 650 and client.rate_limited >= 1
    # told the limit, the client stays under it: no 429 at all
    sim2 = sim_factory(logs_limit=3, logs_window_s=1.0)
    seed_rows(sim2, 650, start=now - 700)
    rows, client = fetch(sim2, datetime.fromtimestamp(now - 800, UTC),
                         datetime.fromtimestamp(now, UTC), calls_per_window=3, window_s=1.0)
    assert len(rows) == 650 and client.rate_limited == 0 and client.calls == 7
    assert sim2.simulator.stats.get("logs_rate_limited", 0) == 0


def test_no_usage_logs_and_a_bad_key_are_told_apart(sim_factory):
    sim = sim_factory(usage_logs=False)  # an OpenAI-compatible server without them
    now = datetime.now(UTC)
    with pytest.raises(NoUsageLogs, match="404"):
        fetch(sim, now - timedelta(hours=1), now)
    other = sim_factory(api_key="someone-else")
    with pytest.raises(UsageLogsError, match="401") as exc:
        fetch(other, now - timedelta(hours=1), now)
    assert not isinstance(exc.value, NoUsageLogs) and TEST_KEY not in str(exc.value)


def test_the_logs_url_is_the_hosts_root_unless_configured():
    from ernie_batch.config import ApiOptions

    assert logs_url(ApiOptions()) == "https://api.aimlapi.com/v2/logs"
    assert logs_url(ApiOptions(base_url="http://127.0.0.1:9/v1/")) == "http://127.0.0.1:9/v2/logs"
    assert logs_url(ApiOptions(usage_logs_url="https://x.example/logs")) == "https://x.example/logs"
