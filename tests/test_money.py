"""Structured answers and money, run by the engine against the simulator on loopback:
response_format fall-back, invalid answers retried, every billed attempt counted, budgets."""

from __future__ import annotations

import math

import pandas as pd
from pydantic import SecretStr

from ernie_batch.run.engine import run_job
from ernie_batch.sim import FaultRates
from tests.conftest import TEST_KEY, job_config


def delivered_credits(sim) -> float:
    return math.fsum(e["credits"] for e in sim.ledger()["entries"] if e["delivered"])


def run(sim, tmp_path, **overrides):
    cfg = job_config(sim.url, tmp_path, **overrides)
    return run_job(cfg, SecretStr(TEST_KEY)), tmp_path


def test_response_format_falls_back_once_and_is_remembered(sim_factory, tmp_path):
    sim = sim_factory(reject_response_formats=("json_schema", "json_object"))
    summary, out = run(sim, tmp_path, **{"limits.concurrency": 1})
    pages = pd.read_parquet(out / "pages")
    attempts = pd.read_parquet(out / "attempts").sort_values("started_at")
    assert summary.outcome == "completed"
    assert set(pages["status"]) == {"ok"}
    rejected = attempts[attempts["status_code"] == 400]
    # one rejection per mode, for the whole run: json_schema, then json_object
    assert len(rejected) == 2
    assert rejected["outcome"].eq("bad_request").all()
    assert (attempts["outcome"] == "ok").sum() == len(pages)
    # in text mode the schema travels in the prompt, and answers still validate
    assert pages["answer_title"].notna().all()


def test_invalid_answers_are_retried_warmer_and_every_billed_attempt_counts(sim_factory,
                                                                             tmp_path):
    sim = sim_factory(faults=FaultRates(invalid_answer=0.4, length=0.1, fenced=0.3), seed=3)
    summary, out = run(sim, tmp_path, **{"retries.answer": 3})
    pages = pd.read_parquet(out / "pages")
    attempts = pd.read_parquet(out / "attempts")
    assert set(pages["status"]) <= {"ok", "invalid_answer"}
    assert (pages["status"] == "ok").sum() >= len(pages) - 1
    invalid = attempts[attempts["outcome"] == "invalid_answer"]
    assert len(invalid) > 0
    assert (invalid["credits"] > 0).all()  # billed although the answer was unusable
    retried = attempts.groupby("key")["temperature"].apply(list)
    for temps in retried:
        assert temps == sorted(temps)
        assert temps[0] == 0.0
    assert max(len(t) for t in retried) > 1
    total = delivered_credits(sim)
    assert math.fsum(pages["credits"]) == total
    assert math.fsum(attempts["credits"]) == total
    assert summary.credits == total


def test_usd_is_derived_when_the_api_reports_only_credits(sim_factory, tmp_path):
    sim = sim_factory(send_usd=False)
    _, out = run(sim, tmp_path)
    attempts = pd.read_parquet(out / "attempts")
    for credits, usd in zip(attempts["credits"], attempts["usd"], strict=True):
        assert usd == credits / 2_000_000


def test_budget_stops_dispatch_within_the_in_flight_bound(sim_factory, tmp_path):
    sim = sim_factory(latency_s=0.05)
    concurrency = 2
    summary, out = run(sim, tmp_path, **{"budget.max_credits": 5000.0,
                                         "limits.concurrency": concurrency})
    pages = pd.read_parquet(out / "pages")
    assert summary.outcome == "budget_stopped"
    assert summary.exit_code == 4
    assert summary.units_not_sent > 0
    spent = delivered_credits(sim)
    assert summary.credits == spent
    # overshoot at most what was already in flight when dispatch stopped
    worst_request = max(e["credits"] for e in sim.ledger()["entries"])
    assert spent <= 5000.0 + concurrency * worst_request
    assert (pages["status"] == "ok").sum() == len(sim.ledger()["entries"])


def test_the_budget_counts_the_header_credits_of_bodies_lost_in_transfer(sim_factory, tmp_path):
    sim = sim_factory(faults=FaultRates(truncated=1.0))  # every body is cut off after its headers
    concurrency = 2
    summary, out = run(sim, tmp_path, **{"budget.max_credits": 3000.0,
                                         "limits.concurrency": concurrency,
                                         "retries.backoff_base_s": 0.01})
    book = sim.ledger()["entries"]
    assert all(e["headers_delivered"] and not e["delivered"] for e in book)
    attempts = pd.read_parquet(out / "attempts")
    assert (attempts["credits_source"] == "header").all()
    assert summary.outcome == "budget_stopped" and summary.units_ok == 0
    spent = math.fsum(e["credits"] for e in book)
    assert summary.credits == spent > 0
    worst_request = max(e["credits"] for e in book)
    assert spent <= 3000.0 + concurrency * worst_request
