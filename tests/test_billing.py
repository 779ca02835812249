"""Billing that stays true: a vendor row whose request id names a run of this output is that
run's, whichever runs a reconcile selected, and a later reconcile fixes what an earlier one
attributed wrongly (the `billing` table is append-only; its current row per `inference_id`
is the newest written). Runs in process against the simulator on loopback; `reconcile` and
`report` as a user runs them (subprocesses, stdout a pipe)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.api.usage_logs import UsageRow
from ernie_batch.config import load_config
from ernie_batch.money import billing
from ernie_batch.money.reconcile import reconcile_runs
from ernie_batch.run.engine import RunOptions, run_job
from ernie_batch.run.selection import RunSelection
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY


@pytest.fixture
def run_then_eval(sim_factory, tmp_path):
    """`run`, then an eval run of another prompt version into the same output: (config path,
    the run, the eval, the simulator)."""
    sim = sim_factory()
    src = tmp_path / "in"
    chaos.make_corpus(src, images=5, pdf_pages=2, seed=71)
    config = chaos.write_config(tmp_path / "job.toml", src, tmp_path / "out", sim.url,
                                concurrency=4, lag_s=0)
    first = run_job(load_config(config), SecretStr(TEST_KEY), RunOptions(kind="run"))
    v2 = load_config(config, {"prompt.template": "Read $file_name.", "prompt.template_file": None})
    evaluated = run_job(v2, SecretStr(TEST_KEY), RunOptions(kind="eval"))
    assert first.requests == 7 and evaluated.requests == 7
    return config, first, evaluated, sim


def cli(config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args, "-c", str(config),
                           "--json"], cwd=PROJECT, env=chaos.cli_env(chaos.prefect_home()),
                          capture_output=True, text=True, timeout=120)


def current_billing(out):
    return store.read_table(out, "billing", current=True).to_pandas()


def billed(sim, run_id: str) -> int:
    return sum(e["credits"] for e in sim.ledger()["entries"]
               if e["client_request_id"].startswith(f"eb:{run_id}:"))


def test_run_eval_default_reconcile_then_since_leaves_the_run_exact_with_its_requests(
        run_then_eval):
    config, first, evaluated, sim = run_then_eval
    out = config.parent / "out"
    default = cli(config, "reconcile")
    assert default.returncode == 0, default.stderr
    figures = json.loads(default.stdout.splitlines()[-1])
    assert f"newest run with pages: {first.run_id} (run, 7 units)" in default.stderr
    assert figures["vendor_requests"] == first.requests and figures["exact"]
    assert figures["foreign_requests"] == 0  # the eval's requests are this output's
    since = cli(config, "reconcile", "--since", "2000-01-01")
    assert since.returncode == 0, since.stderr
    both = json.loads(since.stdout.splitlines()[-1])
    assert both["vendor_requests"] == first.requests + evaluated.requests and both["exact"]
    assert both["vendor_credits"] == first.credits + evaluated.credits
    current = current_billing(out)
    assert current["run_id"].notna().all() and current["matched"].all()
    mine = current[current["run_id"] == first.run_id]
    assert len(mine) == first.requests and mine["cost_credits"].sum() == billed(sim, first.run_id)
    report = cli(config, "report", "--run", first.run_id)
    (row,) = json.loads(report.stdout.splitlines()[-1])["runs"]
    assert row["vendor_credits"] == row["recorded_credits"] == first.credits


def test_a_later_reconcile_fixes_rows_an_earlier_one_left_unattributed(run_then_eval):
    config, first, evaluated, sim = run_then_eval
    out = config.parent / "out"
    cfg = load_config(config)
    # what a reconcile of the eval alone wrote before request ids named their run: the
    # first run's rows with no run, unmatched
    wrong = [{"inference_id": e["inference_id"], "request_id": None,
              "client_request_id": e["client_request_id"], "created": datetime.now(UTC),
              "status": "succeeded", "model": cfg.api.model, "origin": "api",
              "cost_credits": e["credits"], "cost_usd": None, "tokens_input": None,
              "tokens_output": None, "tokens_total": None, "run_id": None, "key": None,
              "attempt": None, "matched": False, "recorded_credits": None,
              "reconcile_id": "old"} for e in sim.ledger()["entries"]
             if e["client_request_id"].startswith(f"eb:{first.run_id}:")]
    assert billing.add_rows(out, wrong, "20000101T000000Z-0ld000") == first.requests
    assert current_billing(out)["run_id"].isna().sum() == first.requests

    result = asyncio.run(reconcile_runs(cfg, SecretStr(TEST_KEY),
                                        RunSelection((evaluated.run_id,))))
    assert result.figures.vendor_requests == evaluated.requests and result.figures.exact
    assert result.figures.foreign_requests == 0
    assert result.others[first.run_id].vendor_requests == first.requests
    assert result.added == first.requests + evaluated.requests
    current = current_billing(out)
    assert current["run_id"].notna().all() and current["inference_id"].is_unique
    by_run = current.groupby("run_id")["cost_credits"].sum().to_dict()
    assert by_run == {first.run_id: billed(sim, first.run_id),
                      evaluated.run_id: billed(sim, evaluated.run_id)}
    everything = store.read_table(out, "billing").to_pandas()  # append-only: both kept
    assert len(everything) == 2 * first.requests + evaluated.requests
    again = asyncio.run(reconcile_runs(cfg, SecretStr(TEST_KEY), RunSelection(since="2000-01-01")))
    assert again.added == 0 and again.figures.exact  # nothing new to say: nothing written
    # the README's DuckDB query reads the current rows, as report does
    duckdb = pytest.importorskip("duckdb")
    section = (PROJECT / "README.md").read_text().split("## Reconciliation", 1)[1]
    query = section.split("```sql\n", 1)[1].split("```", 1)[0]
    got = duckdb.sql(query.replace("data/output", str(out))).df()
    assert dict(zip(got["run_id"], got["vendor_credits"], strict=True)) == by_run


def test_a_row_attributed_once_is_never_unattributed_by_a_reconcile_that_knows_less(tmp_path):
    row = UsageRow(inference_id="inf-1", request_id="r", client_request_id="eb:x:k:1",
                   created=datetime.now(UTC), status="succeeded", model="m", origin="api",
                   cost_credits=10, cost_usd=None, tokens_input=None, tokens_output=None,
                   tokens_total=None)
    from ernie_batch.money.reconcile import match

    known = match([row], [], ["x"], None, "20000101T000000Z-aaaaaa").rows
    assert known[0]["run_id"] == "x" and billing.add_rows(tmp_path, known, "r1") == 1
    unknown = match([row], [], ["y"], None, "20000101T000001Z-bbbbbb").rows
    assert unknown[0]["run_id"] is None and billing.add_rows(tmp_path, unknown, "r2") == 0
    assert current_billing(tmp_path)["run_id"].tolist() == ["x"]
