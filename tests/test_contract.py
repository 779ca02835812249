"""The wire contract: what the client sends validates against the vendor's request schema,
and what the simulator answers validates against the vendor's response schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from ernie_batch.answers.prompt import FORMAT_MODES, build_body
from ernie_batch.config import load_config
from ernie_batch.intake.discover import discover
from ernie_batch.intake.prepare import prepare_document
from ernie_batch.intake.units import PageUnit
from tests.conftest import PROJECT, SAMPLES, TEST_KEY, VENDOR

SPEC = VENDOR / "aimlapi-ernie-4.5-vl-424b-a47b.openapi.json"
BALANCE_SPEC = VENDOR / "aimlapi-billing-balance-v1.openapi.json"
pytestmark = pytest.mark.skipif(not SPEC.exists(), reason=f"vendor OpenAPI files absent: {SPEC}")


def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 -> JSON Schema: `nullable: true` becomes a null alternative."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items()
           if k not in ("nullable", "example", "x-codeSamples")}
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def operation(spec_path: Path, path: str, method: str) -> dict[str, Any]:
    return json.loads(spec_path.read_text())["paths"][path][method]


def request_validator() -> Draft202012Validator:
    op = operation(SPEC, "/v1/chat/completions", "post")
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator(openapi_to_jsonschema(schema))


def response_validator(spec: Path, path: str, method: str) -> Draft202012Validator:
    schema = operation(spec, path, method)["responses"]["200"]["content"]["application/json"]
    return Draft202012Validator(openapi_to_jsonschema(schema["schema"]))


def sample_units(cfg) -> list[PageUnit]:
    docs, _ = discover(cfg.sources)
    units = []
    for doc in docs:
        units += [u for u in prepare_document(doc, cfg.images, cfg.pdf) if isinstance(u, PageUnit)]
    return units


@pytest.mark.parametrize("mode", FORMAT_MODES)
@pytest.mark.parametrize("system_message", [False, True])
def test_requests_validate_against_the_vendor_schema(mode, system_message):
    cfg = load_config(PROJECT / "configs" / "demo.toml", {
        "sources.paths": [str(SAMPLES)], "request.system_message": system_message,
        "request.seed": 7, "request.top_p": 0.9})
    validator = request_validator()
    units = sample_units(cfg)
    assert {u.parts[0].is_pdf for u in units} == {True, False}  # PDFs and images both covered
    for unit in units:
        body = build_body(cfg, unit, mode, temperature=0.4)
        errors = [e.message for e in validator.iter_errors(body)]
        assert not errors, errors[:3]


def test_simulator_responses_validate_against_the_vendor_schema(sim_factory):
    sim = sim_factory()
    cfg = load_config(PROJECT / "configs" / "demo.toml", {"sources.paths": [str(SAMPLES)]})
    unit = sample_units(cfg)[0]
    body = build_body(cfg, unit, "json_schema", 0.0)
    res = httpx.post(sim.url + "/chat/completions", json=body,
                     headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=30)
    assert res.status_code == 200
    payload = res.json()
    validator = response_validator(SPEC, "/v1/chat/completions", "post")
    errors = [e.message for e in validator.iter_errors(payload)]
    assert not errors, errors[:3]
    usage = payload["meta"]["usage"]
    assert usage["usd_spent"] == pytest.approx(usage["credits_used"] / 2e6, rel=1e-9)


def test_simulator_balance_validates_against_the_vendor_schema(sim_factory):
    sim = sim_factory(balance_credits=5000.0)
    res = httpx.get(sim.url + "/billing/balance",
                    headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=30)
    assert res.status_code == 200
    paths = json.loads(BALANCE_SPEC.read_text())["paths"]
    path = next(iter(paths))
    validator = response_validator(BALANCE_SPEC, path, "get")
    assert not [e.message for e in validator.iter_errors(res.json())]
