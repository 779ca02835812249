"""Slow tier: API faults and `kill -9` of real CLI runs with requests in flight, then
`ernie-batch reconcile`: the vendor's usage logs account for every credit the simulator billed.

`pytest -m slow` runs it (about two minutes: each CLI run starts Prefect's local server).
The same checks in process, with a staged kill, run in the default tier (test_reconcile.py).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from ernie_batch.sim import FaultRates, SimServer, SimSettings
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY

pytestmark = pytest.mark.slow

FAULTS = FaultRates(rate_limited=0.1, server_error=0.05, reset=0.03, truncated=0.08)
KILLS = 2


def test_faults_and_kills_then_reconcile_account_for_every_credit(tmp_path):
    env = chaos.cli_env(chaos.prefect_home())
    src, out = tmp_path / "in", tmp_path / "out"
    units = chaos.make_corpus(src, images=30, pdf_pages=4, seed=61)
    rng = random.Random(int(time.time()))
    with SimServer(SimSettings(api_key=TEST_KEY, latency_s=0.3, seed=7, faults=FAULTS)) as sim:
        cfg = chaos.write_config(tmp_path / "job.toml", src, out, sim.url, concurrency=4)
        for n in range(KILLS):
            before = len(sim.simulator.ledger)
            proc = chaos.start_cli(cfg, env, tmp_path / f"kill-{n}.log")
            deadline = time.monotonic() + 120
            while proc.poll() is None and len(sim.simulator.ledger) < before + rng.randint(4, 8):
                assert time.monotonic() < deadline, "too few requests in time"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            assert proc.poll() is None, "the run finished before its kill"
            chaos.kill_group(proc)
            chaos.wait_idle(sim)
        assert chaos.run_cli(cfg, env, tmp_path / "final.log", timeout=300) == 0
        chaos.wait_idle(sim)
        book = sim.ledger()["entries"]
        res = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "reconcile", "-c", str(cfg),
                              "--since", "2000-01-01", "--json"], cwd=PROJECT, env=env,
                             capture_output=True, text=True, timeout=120)

    assert res.returncode == 0, res.stdout + res.stderr
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    attempts = chaos.table(out, "attempts")
    pages = chaos.table(out, "pages")
    assert (pages["status"] == "ok").sum() == units and pages["key"].is_unique
    runs = chaos.table(out, "runs")
    assert sorted(runs["outcome"]) == ["completed"] + ["interrupted"] * KILLS

    vendor = sum(e["credits"] for e in book)
    assert figures["vendor_credits"] == vendor  # the vendor's logs hold every billed credit
    assert figures["recorded_credits"] + figures["unrecorded_credits"] == vendor
    assert figures["exact"] and figures["foreign_requests"] == 0
    # only the lost attempts (in flight at a kill) make up what went unrecorded
    lost = attempts[attempts["outcome"] == "lost"]
    lost_ids = set(lost["client_request_id"])
    assert figures["unrecorded_credits"] == sum(e["credits"] for e in book
                                                if e["client_request_id"] in lost_ids)
    assert 1 <= len(lost) <= KILLS * 4
    # a body cut off after its headers: recorded from its cost header (unless lost at a kill)
    truncated = [e for e in book if e["fault"] == "truncated"]
    assert truncated
    from_header = set(attempts.loc[attempts["credits_source"] == "header", "inference_id"])
    assert from_header
    for e in truncated:
        assert e["inference_id"] in from_header or e["client_request_id"] in lost_ids
    billing = chaos.table(out, "billing")
    assert billing["inference_id"].is_unique and billing["matched"].all()
    assert sorted(billing.loc[billing["status"] == "succeeded", "inference_id"]) == sorted(
        e["inference_id"] for e in book)
    print(json.dumps({"figures": figures, "requests": len(attempts), "lost": len(lost),
                      "truncated": len(truncated)}))
