"""The engine's seams: a client, a budget and a preparer handed in, the simulator mounted in process.

These tests are about the engine's logic (retry policy, recording, ownership), not the wire,
so the simulator's ASGI app serves them through `httpx.ASGITransport`; everything about
timeouts, resets, 429 timing and money stays on the loopback server (other test files).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import SecretStr

from ernie_batch.api.client import ApiClient
from ernie_batch.api.limits import RequestBudget
from ernie_batch.run.engine import Pipeline
from ernie_batch.sim import FaultRates, SimSettings, Simulator
from ernie_batch.store import read_table
from tests.conftest import SAMPLES, TEST_KEY, job_config

BASE = "http://127.0.0.1:9/v1"  # never dialled: the transport is the app itself


def mounted(sim: Simulator) -> ApiClient:
    return ApiClient(BASE, SecretStr(TEST_KEY), transport=httpx.ASGITransport(app=sim.app))


async def one_run(cfg, client: ApiClient, budget: RequestBudget | None = None):
    async with Pipeline(cfg, SecretStr(TEST_KEY), client=client, budget=budget) as run:
        await run.process(run.discover())
        return await run.finish()


def test_invalid_answers_walk_the_answer_layer_warmer_each_time(tmp_path):
    sim = Simulator(SimSettings(api_key=TEST_KEY, faults=FaultRates(invalid_answer=1.0)))
    cfg = job_config(BASE, tmp_path / "out", [SAMPLES / "receipt-cafe-aurora.png"],
                     **{"retries.answer": 2, "retries.temperature_step": 0.25})

    async def go():
        client = mounted(sim)
        try:
            summary = await one_run(cfg, client)
            # the pipeline does not close what it was handed: the client still works
            assert (await client.probe()).balance is not None
        finally:
            await client.aclose()
        return summary

    summary = asyncio.run(go())
    assert summary.units_failed == 1 and summary.requests == 3
    attempts = read_table(tmp_path / "out", "attempts").to_pandas().sort_values("attempt")
    assert attempts["outcome"].tolist() == ["invalid_answer"] * 3
    assert attempts["temperature"].tolist() == pytest.approx([0.0, 0.25, 0.5])
    pages = read_table(tmp_path / "out", "pages").to_pandas()
    assert pages["status"].tolist() == ["invalid_answer"] and pages["attempts"].tolist() == [3]
    assert pages["credits"].iloc[0] == sum(e.credits for e in sim.ledger)


def test_a_handed_in_budget_paces_the_run(tmp_path):
    """A budget stopped before the run starts sends nothing: the pipeline uses the one it got."""
    sim = Simulator(SimSettings(api_key=TEST_KEY))
    cfg = job_config(BASE, tmp_path / "out")

    async def go():
        budget = RequestBudget(rpm=0, max_in_flight=2)
        budget.stop()
        client = mounted(sim)
        try:
            return await one_run(cfg, client, budget)
        finally:
            await client.aclose()

    summary = asyncio.run(go())
    assert summary.requests == 0 and not sim.ledger
    assert summary.units_not_sent > 0 and summary.units_ok == 0
    assert summary.outcome == "interrupted"


def test_an_unexpected_error_in_a_worker_ends_the_run_and_keeps_what_arrived(tmp_path,
                                                                           monkeypatch):
    """A bug in sending one unit must not hang the run (its feeder waiting for queue room
    forever): the run stops dispatching, what arrived is committed, the error is raised."""
    from ernie_batch.run.sender import UnitSender

    sim = Simulator(SimSettings(api_key=TEST_KEY))
    cfg = job_config(BASE, tmp_path / "out", **{"limits.concurrency": 1})
    send, sent = UnitSender.send, []

    async def send_then_fail(self, unit):
        if len(sent) == 2:
            raise RuntimeError("a bug in the third unit")
        sent.append(unit)
        await send(self, unit)

    monkeypatch.setattr(UnitSender, "send", send_then_fail)

    async def go():
        client = mounted(sim)
        try:
            async with Pipeline(cfg, SecretStr(TEST_KEY), client=client) as run:
                docs = run.discover()
                with pytest.raises(RuntimeError, match="third unit"):
                    await asyncio.wait_for(run.process(docs), timeout=120)
                return await run.finish()
        finally:
            await client.aclose()

    summary = asyncio.run(go())
    assert summary.outcome == "interrupted" and "third unit" in summary.error
    pages = read_table(tmp_path / "out", "pages").to_pandas()
    # every answer the API sent is recorded (a unit still waiting for its slot is not sent)
    assert (pages["status"] == "ok").sum() == len(sim.ledger) >= 1
