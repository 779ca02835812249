"""`reconcile`: the selected runs' attempts against the simulator's usage logs, to the credit.

The faults, the staged kill (a run that stops journaling with requests in flight, as a
kill -9 does, and a resume that folds its journal) and the reconcile run in process against
the simulator on loopback; the command itself runs as a subprocess (exit codes, `--json`).
The same with real `kill -9`s of CLI runs is in test_chaos.py (and test_reconcile_chaos.py,
slow tier).
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.money.reconcile import reconcile_runs
from ernie_batch.run.engine import Pipeline, RunOptions, run_job
from ernie_batch.run.selection import RunSelection
from ernie_batch.sim import FaultRates
from ernie_batch.vocab import RunOutcome
from tests import test_chaos as chaos
from tests.conftest import PROJECT, SAMPLES, TEST_KEY, job_config
from tests.test_crash_safety import leave_locks_behind

FIGURES = {"vendor_requests", "vendor_credits", "recorded_credits", "unrecorded_credits",
           "unbilled_recorded", "mismatched", "pending", "foreign_requests", "foreign_credits",
           "exact"}


def reconcile(cfg, *run_ids: str):
    selection = RunSelection(tuple(run_ids))
    return asyncio.run(reconcile_runs(cfg, SecretStr(TEST_KEY), selection)).figures


def table(out: Path, name: str) -> pd.DataFrame:
    t = store.read_table(out, name)
    return t.to_pandas() if t is not None else pd.DataFrame()


def killed_with_requests_in_flight(cfg, after_sent: int) -> Pipeline:
    """A run that dies (its journal and commits stop, locks left behind) right after its
    `after_sent`-th request was journaled as sent; what was in flight goes on to the API and
    is billed, as after a kill -9, and nothing new is sent."""

    async def go() -> Pipeline:
        run = Pipeline(cfg, SecretStr(TEST_KEY), RunOptions())
        await run.__aenter__()
        rec, dead, sent = run.recorder, [], []
        journal_write, commit = rec.journal.write, rec.maybe_commit

        def write(record: dict, sync: bool = False) -> None:
            if dead:
                return
            journal_write(record, sync)
            if record["t"] == "sent":
                sent.append(record)
                if len(sent) >= after_sent:
                    dead.append(True)
                    run.stop.set(RunOutcome.INTERRUPTED, "staged kill")  # nothing new leaves

        rec.journal.write = write
        rec.maybe_commit = lambda: None if dead else commit()
        await run.process(run.discover())
        await run.pool.aclose()
        await run.client.aclose()
        rec.journal.close(delete=False)
        return run

    run = asyncio.run(go())
    leave_locks_behind(run)
    return run


def test_faults_and_a_kill_with_requests_in_flight_reconcile_to_the_credit(sim_factory, tmp_path):
    sim = sim_factory(latency_s=0.15, seed=4, faults=FaultRates(
        truncated=0.12, reset=0.05, server_error=0.05, rate_limited=0.08))
    src, out = tmp_path / "in", tmp_path / "out"
    units = chaos.make_corpus(src, images=24, pdf_pages=4, seed=21)
    cfg = job_config(sim.url, out, [src], **{
        "limits.concurrency": 4, "output.flush_rows": 4, "reconcile.lag_s": 0,
        "retries.backoff_base_s": 0.05, "retries.backoff_max_s": 0.2, "limits.adaptive": False})
    dead = killed_with_requests_in_flight(cfg, after_sent=14)
    chaos.wait_idle(sim)
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.recovered_runs == [dead.run_id] and summary.outcome == "completed"
    chaos.wait_idle(sim)
    pages = table(out, "pages")
    assert (pages["status"] == "ok").sum() == units and pages["key"].is_unique

    attempts, book = table(out, "attempts"), sim.ledger()["entries"]
    lost = attempts[attempts["outcome"] == "lost"]
    assert 1 <= len(lost) <= 4 and (lost["run_id"] == dead.run_id).all()
    assert lost["credits"].isna().all() and lost["credits_source"].isna().all()
    lost_ids = set(lost["client_request_id"])
    paid_unheard = [e for e in book if e["client_request_id"] in lost_ids]
    assert paid_unheard  # requests in flight at the kill were billed all the same
    truncated = [e for e in book if e["fault"] == "truncated"]
    assert truncated
    from_header = set(attempts.loc[attempts["credits_source"] == "header", "inference_id"])
    for e in truncated:  # cut off after its headers: cost known, unless it died with the run
        assert e["inference_id"] in from_header or e["client_request_id"] in lost_ids

    figures = reconcile(cfg, dead.run_id, summary.run_id)
    vendor = sum(e["credits"] for e in book)
    assert figures.vendor_credits == vendor  # the vendor's own count, every billed request
    assert figures.recorded_credits + figures.unrecorded_credits == vendor
    assert figures.unrecorded_credits == sum(e["credits"] for e in paid_unheard) > 0
    assert figures.recorded_credits == math.fsum(attempts["credits"].dropna())
    assert figures.vendor_requests == len(sim.simulator.logs.rows)  # billed and failed ones
    assert (figures.mismatched, figures.unbilled_recorded, figures.pending) == (0, 0, 0)
    assert (figures.foreign_requests, figures.foreign_credits) == (0, 0)
    assert figures.exact
    billing = table(out, "billing")
    assert billing["inference_id"].is_unique and len(billing) == figures.vendor_requests
    assert billing["matched"].all()  # every row has its attempt, the lost ones included
    assert set(billing["run_id"]) == {dead.run_id, summary.run_id}


def write_cli_config(tmp_path: Path, sim, out: Path, lag_s: float) -> Path:
    src = tmp_path / "in"
    if not src.exists():
        chaos.make_corpus(src, images=5, pdf_pages=1, seed=31)
    return chaos.write_config(tmp_path / "job.toml", src, out, sim.url, concurrency=4,
                              lag_s=lag_s)


def cli(config: Path, *args: str) -> tuple[int, dict | None, str]:
    env = chaos.cli_env(chaos.prefect_home())
    res = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "reconcile", "-c",
                          str(config), *args], cwd=PROJECT, env=env, capture_output=True,
                         text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    figures = json.loads(lines[-1]) if "--json" in args and lines else None
    return res.returncode, figures, res.stdout + res.stderr


def test_reconcile_twice_adds_nothing_and_what_is_pending_settles_later(sim_factory, tmp_path):
    sim = sim_factory(logs_lag_s=2.0)  # the vendor logs a charge 2 s after it
    out = tmp_path / "out"
    cfg_path = write_cli_config(tmp_path, sim, out, lag_s=2.0)
    chaos.EXTRA_OUTPUTS.append(tmp_path)
    from ernie_batch.config import load_config

    cfg = load_config(cfg_path)
    summary = run_job(cfg, SecretStr(TEST_KEY))
    early = reconcile(cfg)
    assert early.pending == summary.requests and not early.exact  # all younger than the lag
    assert early.vendor_requests == 0 and not (out / "billing").exists()
    time.sleep(2.1)
    rc, first, text = cli(cfg_path, "--json")
    assert rc == 0, text
    assert set(first) == FIGURES and first["exact"] and first["pending"] == 0
    assert first["vendor_credits"] == sum(e["credits"] for e in sim.ledger()["entries"])
    assert first["vendor_credits"] == first["recorded_credits"] == summary.credits
    rows = len(table(out, "billing"))
    assert rows == summary.requests
    rc, second, text = cli(cfg_path, "--json")
    assert rc == 0 and second == first
    billing = table(out, "billing")
    assert len(billing) == rows and billing["inference_id"].is_unique
    # without --json: the figures as a table, the same verdict
    rc, _, text = cli(cfg_path)
    assert rc == 0 and "vendor_credits" in text and "yes" in text
    # report shows the vendor's credits beside the recorded ones
    res = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "report", "-c", str(cfg_path),
                          "--json"], cwd=PROJECT, env=chaos.cli_env(chaos.prefect_home()),
                         capture_output=True, text=True, timeout=120)
    (run_row,) = json.loads(res.stdout)["runs"]
    assert run_row["vendor_credits"] == first["vendor_credits"]
    assert run_row["recorded_credits"] == summary.credits


def test_rows_of_other_outputs_and_other_programs_are_foreign_other_runs_are_theirs(
        sim_factory, tmp_path):
    sim = sim_factory()
    cfg_a = job_config(sim.url, tmp_path / "out", [tmp_path / "a"], **{"reconcile.lag_s": 0})
    cfg_b = job_config(sim.url, tmp_path / "out", [tmp_path / "b"], **{"reconcile.lag_s": 0})
    cfg_c = job_config(sim.url, tmp_path / "elsewhere", [tmp_path / "c"])  # another output
    chaos.make_corpus(tmp_path / "a", images=3, pdf_pages=1, seed=41)
    chaos.make_corpus(tmp_path / "b", images=2, pdf_pages=1, seed=42)
    chaos.make_corpus(tmp_path / "c", images=1, pdf_pages=1, seed=43)
    a = run_job(cfg_a, SecretStr(TEST_KEY))
    b = run_job(cfg_b, SecretStr(TEST_KEY))
    c = run_job(cfg_c, SecretStr(TEST_KEY))
    # another program on the same key, without a client request id
    body = {"model": cfg_a.api.model, "messages": [{"role": "user", "content": "hello"}]}
    res = httpx.post(sim.url + "/chat/completions", json=body, timeout=10,
                     headers={"Authorization": f"Bearer {TEST_KEY}"})
    other = int(res.headers["x-aimlapi-credits-used"])
    figures = reconcile(cfg_b, b.run_id)  # only b: a's and c's rows are in the window too
    assert figures.vendor_requests == b.requests and figures.vendor_credits == b.credits
    assert figures.foreign_requests == c.requests + 1  # no request of this output
    assert figures.foreign_credits == c.credits + other
    assert figures.exact
    current = table(tmp_path / "out", "billing")  # a's rows: a's, though a was not selected
    by_run = current.groupby(current["run_id"].fillna("-"))["cost_credits"].sum().to_dict()
    assert by_run == {a.run_id: a.credits, b.run_id: b.credits, "-": c.credits + other}
    assert current.loc[current["run_id"] == a.run_id, "matched"].all()


def test_a_body_that_disagrees_with_the_header_is_kept_and_flagged(sim_factory, tmp_path):
    sim = sim_factory(body_credits_offset=2.0)  # the body says 2 credits more than billed
    cfg = job_config(sim.url, tmp_path / "out", **{"reconcile.lag_s": 0})
    summary = run_job(cfg, SecretStr(TEST_KEY))
    attempts = table(tmp_path / "out", "attempts")
    assert (attempts["credits_source"] == "body").all() and attempts["cost_mismatch"].all()
    book = sim.ledger()["entries"]
    assert summary.credits == sum(e["credits"] for e in book) + 2 * len(book)  # the body's
    figures = reconcile(cfg)
    assert figures.mismatched == len(book) and not figures.exact
    assert figures.vendor_credits == sum(e["credits"] for e in book)
    config = tmp_path / "job.toml"
    config.write_text(f'[api]\nbase_url = "{sim.url}"\n[output]\npath = "{tmp_path / "out"}"\n'
                      '[reconcile]\nlag_s = 0\n')
    rc, again, text = cli(config, "--json")
    assert rc == 1 and again["mismatched"] == len(book) and not again["exact"], text


def test_decimals_in_the_body_are_no_mismatch(sim_factory, tmp_path):
    sim = sim_factory(body_credits_offset=0.3)
    cfg = job_config(sim.url, tmp_path / "out", [SAMPLES /
                                                  "receipt-cafe-aurora.png"])
    run_job(cfg, SecretStr(TEST_KEY))
    (attempt,) = table(tmp_path / "out", "attempts").itertuples()
    assert attempt.credits_source == "body" and attempt.cost_mismatch is False
    assert attempt.credits == sim.ledger()["entries"][0]["credits"] + 0.3


@pytest.mark.parametrize("settings, code, fragment", [
    ({"usage_logs": False}, 2, "no usage logs"),  # vLLM, Ollama: 404
    ({"api_key": "someone-else"}, 3, "401"),
])
def test_an_endpoint_without_logs_exits_2_and_a_refused_key_3(sim_factory, tmp_path, settings,
                                                              code, fragment):
    good = sim_factory()
    out = tmp_path / "out"
    cfg_path = write_cli_config(tmp_path, good, out, lag_s=0)
    from ernie_batch.config import load_config

    run_job(load_config(cfg_path), SecretStr(TEST_KEY))
    other = sim_factory(**settings)
    rc, _, text = cli(cfg_path, "--base-url", other.url, "--json")
    assert rc == code, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and TEST_KEY not in text
    assert not (out / "billing").exists()


def test_requests_abandoned_in_flight_end_as_lost_rows_and_reconcile(sim_factory, tmp_path):
    """An interrupt that gives up on the requests in flight (`abandon_in_flight`, one call)
    leaves a `lost` row for each, whatever comes back later: a finished run never drops a
    request it sent, and reconcile finds what the vendor billed for them."""
    sim = sim_factory(latency_s=1.0)
    src = tmp_path / "in"
    chaos.make_corpus(src, images=6, pdf_pages=1, seed=51)
    cfg = job_config(sim.url, tmp_path / "out", [src], **{"limits.concurrency": 3,
                                                          "reconcile.lag_s": 0})

    async def go():
        async with Pipeline(cfg, SecretStr(TEST_KEY)) as run:
            task = asyncio.ensure_future(run.process(run.discover()))
            while sim.simulator.in_flight < 3:
                await asyncio.sleep(0.01)
            assert run.recorder.abandon_in_flight("interrupted: stopped waiting") == 3
            run.stop.set(RunOutcome.INTERRUPTED, "interrupted")
            await task  # the answers still come, and are not recorded
            return await run.finish()

    summary = asyncio.run(go())
    chaos.wait_idle(sim)
    attempts = table(tmp_path / "out", "attempts")
    assert len(attempts) == 3 and (attempts["outcome"] == "lost").all()
    assert attempts["credits"].isna().all() and summary.requests == 3
    assert table(tmp_path / "out", "pages").empty and summary.units_not_sent >= 3
    assert not list((tmp_path / "out" / "_journal").glob("*.jsonl"))
    book = sim.ledger()["entries"]
    assert {e["client_request_id"] for e in book} == set(attempts["client_request_id"])
    figures = reconcile(cfg)
    assert figures.unrecorded_credits == figures.vendor_credits == sum(e["credits"] for e in book)
    assert figures.recorded_credits == 0 and figures.exact


# ---------------------------------------------------------------- under serve


def test_serve_adds_the_reconcile_flow_on_its_cron_with_only_the_config_path(tmp_path):
    from ernie_batch.config import load_config
    from ernie_batch.errors import ScheduleError
    from flows.deploy import maintenance_deployments
    from tests.test_serve import write_config

    schedule = {"cron": "0 * * * *", "timezone": "Europe/Berlin"}
    plain = write_config(tmp_path / "plain.toml", schedule=schedule)
    assert maintenance_deployments(load_config(plain), plain) == []
    cfg_path = write_config(tmp_path / "job.toml", schedule=schedule,
                            reconcile={"cron": "30 3 * * *"})
    (deployment,) = maintenance_deployments(load_config(cfg_path), cfg_path)
    assert deployment.flow_name == "ernie-reconcile" and deployment.name == "demo"
    assert deployment.entrypoint == "flows.reconcile.reconcile"
    assert deployment.parameters == {"config_path": str(cfg_path.resolve())}
    (scheduled,) = deployment.schedules
    assert scheduled.schedule.cron == "30 3 * * *"
    assert scheduled.schedule.timezone == "Europe/Berlin"
    assert TEST_KEY not in deployment.model_dump_json()
    bad = write_config(tmp_path / "bad.toml", schedule=schedule, reconcile={"cron": "at noon"})
    with pytest.raises(ScheduleError, match="reconcile.cron"):
        maintenance_deployments(load_config(bad), bad)


def test_the_scheduled_reconcile_logs_a_warning_when_not_exact(prefect_harness, sim_factory,
                                                               tmp_path, api_env):
    import logging

    from ernie_batch.config import load_config
    from flows.reconcile import reconcile as reconcile_flow
    from tests.test_serve import write_config

    sim = sim_factory(body_credits_offset=2.0)  # every body disagrees with the bill
    cfg_path = write_config(tmp_path / "job.toml", api={"base_url": sim.url},
                            output={"path": str(tmp_path / "out")},
                            sources={"paths": [str(SAMPLES /
                                                   "receipt-cafe-aurora.png")]},
                            prepare={"workers": -1}, reconcile={"lag_s": 0})
    run_job(load_config(cfg_path), SecretStr(TEST_KEY))
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = seen.append
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        figures = asyncio.run(reconcile_flow(config_path=str(cfg_path)))
    finally:
        logger.removeHandler(handler)
    assert not figures["exact"] and figures["mismatched"] == 1
    warnings = [r.getMessage() for r in seen if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NOT exact" in warnings[0] and "mismatched 1" in warnings[0]
    assert len(table(tmp_path / "out", "billing")) == 1


def test_a_date_that_is_no_date_is_a_usage_error(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(f'[output]\npath = "{tmp_path / "out"}"\n')
    rc, _, text = cli(config, "--since", "yesterday")
    assert rc == 2 and "error: --since: not an ISO date" in text
