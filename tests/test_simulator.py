"""The AI/ML API simulator, exercised over real HTTP on loopback (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from PIL import Image
from pypdf import PdfWriter

from ernie_batch.api import tokens
from ernie_batch.intake.content import content_sha256
from ernie_batch.sim import (
    DEFAULT_MODEL,
    FaultRates,
    SimServer,
    SimSettings,
    SlidingWindow,
    generate_value,
)

KEY = "sim-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "kind": {"type": "string", "enum": ["invoice", "letter", "form"]},
        "issued": {"type": "string", "format": "date"},
        "pages": {"type": "integer", "minimum": 1, "maximum": 9},
        "total": {"type": ["number", "null"], "minimum": 0},
        "paid": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
        "party": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 20}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["title", "kind", "issued", "pages", "total", "paid", "tags", "party", "note"],
    "additionalProperties": False,
}
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def png(color: tuple[int, int, int] = (200, 20, 20), size: tuple[int, int] = (60, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "BMP")
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (90, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def pdf(pages: int = 2) -> bytes:
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=200, height=300)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(data)}"}}


def file_part(data: bytes) -> dict[str, Any]:
    return {"type": "file", "file": {"file_data": b64(data), "filename": "doc.pdf"}}


def messages(*parts: dict[str, Any], text: str = "Extract the fields.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def request_body(msgs: list[dict[str, Any]], schema: dict[str, Any] | None = SCHEMA,
                 **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": msgs, **extra}
    if schema is not None and "response_format" not in extra:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "page", "schema": schema, "strict": True},
        }
    return body


def post(server: SimServer, body: Any, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> httpx.Response:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = AUTH if headers is None else headers
    return httpx.post(f"{server.url}/chat/completions", headers=headers, timeout=timeout, **kwargs)


def assert_vendor_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"message", "path", "requestId", "statusCode", "timestamp"}
    assert body["statusCode"] == status
    assert body["path"].endswith("/chat/completions") or body["path"].startswith("/")
    return body


@pytest.fixture(scope="module")
def server() -> Iterator[SimServer]:
    with SimServer(SimSettings(api_key=KEY)) as srv:
        yield srv


def run_server(**kwargs: Any) -> SimServer:
    return SimServer(SimSettings(api_key=KEY, **kwargs))


# ----------------------------------------------------------------------------- good answers


def test_good_request_answers_schema_bills_and_records(server: SimServer) -> None:
    msgs = messages(image_part(png(size=(60, 40))), file_part(pdf(2)))
    digest = content_sha256(msgs)
    r = post(server, request_body(msgs, max_tokens=512, temperature=0.0),
             headers={**AUTH, "X-Client-Request-Id": "eb:run-1:key.a_b:1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == DEFAULT_MODEL
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    answer = json.loads(content)
    jsonschema.validate(answer, SCHEMA, format_checker=CHECKER)
    assert digest[:12] in answer["title"] and digest[:12] in answer["party"]["name"]
    assert all(digest[:12] in tag for tag in answer["tags"])

    text_len = len("Extract the fields.")
    prompt = tokens.prompt_tokens(text_len, [(60, 40)], 2)
    completion = tokens.completion_tokens(content)
    credits = math.floor(prompt * 0.882 + completion * 2.625 + 0.5)  # whole credits
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    assert body["meta"]["usage"] == {
        "credits_used": credits,
        "usd_spent": round(credits / 2_000_000, 10),
    }
    entries = [e for e in server.ledger()["entries"] if e["response_id"] == body["id"]]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["content_sha256"] == digest and entry["delivered"] is True
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (prompt, completion)
    assert entry["credits"] == credits and entry["status_code"] == 200 and entry["fault"] is None
    # the tracing and cost headers, sent before the body
    assert r.headers["x-aimlapi-credits-used"] == str(credits)
    assert float(r.headers["x-aimlapi-usd-spent"]) == body["meta"]["usage"]["usd_spent"]
    assert r.headers["x-inference-id"] == entry["inference_id"]
    assert r.headers["x-client-request-id"] == entry["client_request_id"] == "eb:run-1:key.a_b:1"
    assert entry["headers_delivered"] is True


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "é".encode(), "a/b", "a,b"])
def test_a_client_request_id_outside_the_rule_is_dropped_silently(server: SimServer,
                                                                   bad: str | bytes) -> None:
    r = post(server, request_body(messages(image_part(png((9, 9, len(bad) % 250))))),
             headers={**AUTH, "X-Client-Request-Id": bad})
    assert r.status_code == 200  # still answered and billed, but nothing correlates it
    assert "x-client-request-id" not in r.headers and r.headers["x-inference-id"]
    entry = next(e for e in server.ledger()["entries"] if e["response_id"] == r.json()["id"])
    assert entry["client_request_id"] is None


def test_answers_are_deterministic_by_content(server: SimServer) -> None:
    first = messages(image_part(png((1, 2, 3))))
    again = messages(image_part(png((1, 2, 3))), text="other words, same image")
    other = messages(image_part(png((9, 9, 9))))

    def content(msgs: list[dict[str, Any]]) -> str:
        r = post(server, request_body(msgs))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    assert content(first) == content(again)
    assert content(first) != content(other)


def test_schema_from_fenced_prompt_or_default(server: SimServer) -> None:
    schema = {"type": "object", "properties": {"vendor": {"type": "string"}}}
    prompt = f"Answer with JSON following this schema:\n```json\n{json.dumps(schema)}\n```\n"
    msgs = messages(image_part(jpeg(), "image/jpeg"), text=prompt)
    r = post(server, request_body(msgs, schema=None, response_format={"type": "json_object"}))
    assert r.status_code == 200, r.text
    assert set(json.loads(r.json()["choices"][0]["message"]["content"])) == {"vendor"}

    r = post(server, request_body(messages(image_part(png())), schema=None))
    answer = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(answer) == {"title", "language", "summary"}


def test_max_tokens_cuts_the_answer(server: SimServer) -> None:
    r = post(server, request_body(messages(image_part(png())), max_tokens=5))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"]) == 20
    assert r.json()["usage"]["completion_tokens"] == 5


def test_generated_values_follow_schema_features() -> None:
    schema = {
        "$defs": {
            "money": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
            "node": {"type": "object", "properties": {
                "label": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            }, "required": ["label", "children"]},
        },
        "type": "object",
        "properties": {
            "amount": {"$ref": "#/$defs/money"},
            "code": {"type": "string", "minLength": 30, "maxLength": 31},
            "count": {"type": "integer", "minimum": 5, "maximum": 5},
            "items": {"type": "array", "items": {"oneOf": [{"type": "integer"}, {"type": "null"}]}},
            "tree": {"$ref": "#/$defs/node"},
            "maybe": {"type": ["null", "string"], "enum": ["x", None]},
            "fixed": {"const": 42},
            "both": {"allOf": [{"properties": {"a": {"type": "boolean"}}}, {"required": ["b"]}]},
        },
    }
    value = generate_value(schema, "ab" * 32)
    jsonschema.validate(value, schema, format_checker=CHECKER)
    assert value["count"] == 5 and value["fixed"] == 42 and set(value["both"]) == {"a", "b"}
    assert value == generate_value(schema, "ab" * 32)


# ----------------------------------------------------------------------------- errors


def test_wrong_key_is_401(server: SimServer) -> None:
    r = post(server, request_body(messages()), headers={"Authorization": "Bearer nope"})
    assert_vendor_error(r, 401)
    assert_vendor_error(post(server, request_body(messages()), headers={}), 401)


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("not json", b"{not json"),
        ("unknown model", request_body(messages(), model="baidu/ernie-9")),
        ("no messages", request_body([])),
        ("bad role", request_body([{"role": "robot", "content": "hi"}])),
        ("bad base64", request_body(messages(
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notbase64"}}))),
        ("undecodable image", request_body(messages(image_part(b"\x89PNG\r\n\x1a\n" + b"x" * 50)))),
        ("unsupported image", request_body(messages(image_part(bmp(), "image/bmp")))),
        ("non-pdf file", request_body(messages(file_part(b"hello, not a pdf at all")))),
        ("bad response_format", request_body(messages(), schema=None,
                                              response_format={"type": "xml"})),
        ("bad temperature", request_body(messages(), temperature=3)),
        ("bad detail", request_body(messages(
            {"type": "image_url", "image_url": {"url": "data:,", "detail": "ultra"}}))),
    ],
)
def test_bad_requests_are_400(server: SimServer, case: str, body: Any) -> None:
    before = len(server.ledger()["entries"])
    assert_vendor_error(post(server, body), 400)
    assert len(server.ledger()["entries"]) == before  # 400s are not billed


def test_rejected_system_role_and_response_format() -> None:
    with run_server(reject_system_role=True, reject_response_formats=("json_schema",)) as srv:
        msgs = [{"role": "system", "content": "Be terse."}, *messages()]
        err = assert_vendor_error(post(srv, request_body(msgs, schema=None)), 400)
        assert err["message"] == (
            "Unsupported value: 'messages[0].role' does not support 'system' with this model."
        )
        err = assert_vendor_error(post(srv, request_body(messages())), 400)
        assert "response_format" in err["message"] and "not supported" in err["message"]
        json_object = {"type": "json_object"}
        ok = post(srv, request_body(messages(), schema=None, response_format=json_object))
        assert ok.status_code == 200


def test_out_of_credits_is_403_and_balance_endpoint() -> None:
    with run_server(balance_credits=1.0, send_usd=False) as srv:
        first = post(srv, request_body(messages(image_part(png()))))
        assert first.status_code == 200
        assert set(first.json()["meta"]["usage"]) == {"credits_used"}
        assert_vendor_error(post(srv, request_body(messages(image_part(png())))), 403)
        bal = httpx.get(f"{srv.url}/billing/balance", headers=AUTH).json()
        assert set(bal) == {"balance", "lowBalance", "lowBalanceThreshold", "lastUpdated",
                            "autoDebitStatus", "status", "statusExplanation"}
        assert bal["balance"] == pytest.approx(1.0 - first.json()["meta"]["usage"]["credits_used"])
        assert bal["lowBalance"] is True
        assert httpx.get(f"{srv.url}/billing/balance").status_code == 401


def test_unknown_path_is_vendor_404(server: SimServer) -> None:
    r = httpx.post(f"{server.url}/completions", headers=AUTH, json={})
    assert_vendor_error(r, 404)


# ----------------------------------------------------------------------------- limits


async def _burst(url: str, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/chat/completions", json=body, headers=AUTH) for _ in range(n))
        )


def test_rpm_window_rejects_exactly_the_excess() -> None:
    with run_server(rpm=600, window_s=1.0) as srv:
        responses = asyncio.run(_burst(srv.url, 30, request_body(messages())))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * 10 + [429] * 20
        for r in responses:
            if r.status_code == 429:
                assert_vendor_error(r, 429)
                wait = float(r.headers["Retry-After"])
                assert 0 < wait <= 1.0 and len(r.headers["Retry-After"].split(".")[1]) == 3
                assert r.headers["x-ratelimit-limit-requests"] == "10"
                assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert len(srv.ledger()["entries"]) == 10


def test_concurrency_cap() -> None:
    with run_server(max_concurrency=2, latency_s=0.3) as srv:
        responses = asyncio.run(_burst(srv.url, 5, request_body(messages())))
        assert sorted(r.status_code for r in responses) == [200, 200, 429, 429, 429]


def test_sliding_window_tokens() -> None:
    window = SlidingWindow(rpm=0, tpm=600, window_s=1.0)  # 10 tokens per window
    assert window.try_admit(0.0, 6) is None
    assert window.try_admit(0.2, 4) is None
    assert window.try_admit(0.5, 1) == pytest.approx(0.5)  # waits for the first entry to leave
    assert window.try_admit(1.0, 5) is None
    assert window.try_admit(2.5, 50) is None  # larger than a window: admitted when empty


# ----------------------------------------------------------------------------- faults


def _only(kind: str) -> SimServer:
    return run_server(faults=FaultRates(**{kind: 1.0}), slow_s=0.6)


@pytest.mark.parametrize("kind", ["reset", "truncated"])
def test_connection_faults_break_the_transport(kind: str) -> None:
    with _only(kind) as srv:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            post(srv, request_body(messages(image_part(png()))))
        data = srv.ledger()
        if kind == "reset":
            assert data["entries"] == [] and data["stats"]["reset"] == 1
        else:
            (entry,) = data["entries"]
            assert entry["delivered"] is False and entry["fault"] == "truncated"
            assert data["totals"]["credits_delivered"] == 0.0 and data["totals"]["credits"] > 0


def test_rejecting_faults_are_not_billed() -> None:
    body = request_body(messages(image_part(png())))
    with _only("rate_limited") as srv:
        r = post(srv, body)
        assert_vendor_error(r, 429)
        assert float(r.headers["Retry-After"]) > 0
        assert srv.ledger()["entries"] == []
    with _only("server_error") as srv:
        assert post(srv, body).status_code in (500, 502, 503, 504)
        assert srv.ledger()["entries"] == []
    with _only("non_json") as srv:
        r = post(srv, body)
        assert r.status_code == 200
        with pytest.raises(ValueError):
            r.json()
        assert srv.ledger()["entries"] == []


def test_sporadic_429s_come_apart_from_the_limit_with_their_own_retry_after() -> None:
    """An upstream shedding load: a 429 whatever the rate, its Retry-After as set, and
    counted in the limit's window (the limit's own 429s are not) but never billed."""
    body = request_body(messages(image_part(png())))
    settings = {"faults": FaultRates(rate_limited=1.0), "sporadic_retry_after_s": 1.0,
                "rpm": 2 * 60 / 4.0, "window_s": 4.0}
    with run_server(**settings) as srv:
        first, second, third = (post(srv, body) for _ in range(3))
        assert first.status_code == second.status_code == third.status_code == 429
        assert float(first.headers["Retry-After"]) == 1.0  # the sporadic ones
        assert "x-ratelimit-remaining-requests" not in first.headers
        assert third.headers["x-ratelimit-remaining-requests"] == "0"  # the limit's
        stats = srv.ledger()["stats"]
        assert stats["fault_rate_limited"] == 2 and stats["rate_limited"] == 1
        assert srv.ledger()["entries"] == []


def test_billed_answer_faults() -> None:
    msgs = messages(image_part(png()))
    with _only("length") as srv:
        choice = post(srv, request_body(msgs)).json()["choices"][0]
        assert choice["finish_reason"] == "length"
        with pytest.raises(ValueError):
            json.loads(choice["message"]["content"])
        assert srv.ledger()["entries"][0]["fault"] == "length"
    with _only("invalid_answer") as srv:
        content = post(srv, request_body(msgs)).json()["choices"][0]["message"]["content"]
        answer = json.loads(content)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, SCHEMA)
        assert len(srv.ledger()["entries"]) == 1
    with _only("fenced") as srv:
        content = post(srv, request_body(msgs)).json()["choices"][0]["message"]["content"]
        assert not content.startswith("{") and "```json" in content
        inner = content.split("```json", 1)[1].split("```", 1)[0]
        jsonschema.validate(json.loads(inner), SCHEMA, format_checker=CHECKER)
        assert len(srv.ledger()["entries"]) == 1


def test_slow_answer_is_billed_but_not_delivered_after_timeout() -> None:
    with _only("slow") as srv:
        with pytest.raises(httpx.ReadTimeout):
            post(srv, request_body(messages(image_part(png()))), timeout=0.2)
        for _ in range(100):  # the server bills once it notices the client has gone
            entries = srv.ledger()["entries"]
            if entries:
                break
            time.sleep(0.02)
        (entry,) = entries
        assert entry["fault"] == "slow" and entry["delivered"] is False
        r = post(srv, request_body(messages(image_part(png()))), timeout=5)
        assert r.status_code == 200
        assert srv.ledger()["entries"][-1]["delivered"] is True


# ----------------------------------------------------------------------------- ledger


def test_ledger_totals_and_reset() -> None:
    with run_server() as srv:
        for color in [(1, 1, 1), (2, 2, 2), (3, 3, 3)]:
            assert post(srv, request_body(messages(image_part(png(color))))).status_code == 200
        data = srv.ledger()
        credits = [e["credits"] for e in data["entries"]]
        assert data["totals"]["credits"] == math.fsum(credits)
        assert data["totals"]["credits_delivered"] == math.fsum(credits)
        assert data["totals"]["usd"] == math.fsum(e["usd"] for e in data["entries"])
        assert data["totals"]["requests"] == 3
        assert data["stats"]["ok"] == 3 and data["stats"]["requests"] == 3
        assert httpx.post(f"http://127.0.0.1:{srv.port}/_sim/reset").status_code == 200
        assert srv.ledger()["entries"] == [] and srv.simulator.stats == {}
    assert not [t for t in threading.enumerate() if t.name == f"sim-{srv.port}"]
