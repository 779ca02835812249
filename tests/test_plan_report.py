"""`plan` estimates before a run, `report` totals after it, both from real files."""

from __future__ import annotations

import math

import pandas as pd
from pydantic import SecretStr

from ernie_batch.engine import run_job
from ernie_batch.plan import make_plan
from ernie_batch.report import dataset_report
from ernie_batch.selection import RunSelection
from tests.conftest import SAMPLES, TEST_KEY, job_config

TOLERANCE = 0.35  # price-based estimate vs the simulator's bill: completion length is a guess


def test_plan_estimates_the_run_that_follows(sim_factory, tmp_path):
    sim = sim_factory()
    cfg = job_config(sim.url, tmp_path)
    before = make_plan(cfg)
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert before.requests == summary.requests
    assert before.pages == summary.units_ok
    assert abs(before.credits - summary.credits) <= TOLERANCE * summary.credits
    after = make_plan(cfg)
    assert after.requests == 0 and after.units_already_done == summary.requests


def test_plan_calibrates_from_earlier_runs(sim_factory, tmp_path):
    sim = sim_factory()
    out = tmp_path / "out"
    run_job(job_config(sim.url, out), SecretStr(TEST_KEY))
    # new files of the same kind: the sample PDFs with a trailing comment (new sha256)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for pdf in SAMPLES.glob("*.pdf"):
        (inbox / pdf.name).write_bytes(pdf.read_bytes() + b"\n% another scan\n")
    cfg = job_config(sim.url, out, sources=[inbox])
    plan = make_plan(cfg)
    assert plan.price_source == "median of earlier runs with this prompt"
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert plan.requests == summary.requests
    assert abs(plan.credits - summary.credits) <= 0.05 * summary.credits


def test_report_totals_match_the_parquet(sim_factory, tmp_path):
    sim = sim_factory()
    summary = run_job(job_config(sim.url, tmp_path), SecretStr(TEST_KEY))
    report = dataset_report(tmp_path)
    assert [r["run_id"] for r in report["runs"]] == [summary.run_id]
    assert report["runs"][0]["outcome"] == "completed"
    assert report["runs"][0]["credits"] == summary.credits
    pages = pd.read_parquet(tmp_path / "pages")
    docs = report["files"]
    assert len(docs) == pages["source_path"].nunique()
    assert math.fsum(d["credits"] for d in docs) == math.fsum(pages["credits"])
    assert report["statuses"] == [{"status": "ok", "units": len(pages), "units_ok": len(pages),
                                   "units_failed": 0, "requests": len(pages),
                                   "credits": summary.credits, "usd": summary.usd}]
    prompts = report["prompts"]
    assert len(prompts) == 1 and prompts[0]["template"].endswith("page.txt")


def test_report_selects_the_newest_run_or_the_runs_asked_for(sim_factory, tmp_path):
    sim = sim_factory()
    first = run_job(job_config(sim.url, tmp_path), SecretStr(TEST_KEY))
    second = run_job(job_config(sim.url, tmp_path, **{"prompt.template": "Read $file_name.",
                                                      "prompt.template_file": None}),
                     SecretStr(TEST_KEY))
    newest = RunSelection().resolve(tmp_path)
    assert newest == [second.run_id]
    both = RunSelection((first.run_id, second.run_id)).resolve(tmp_path)
    assert both == [first.run_id, second.run_id]
    assert RunSelection(since="2000-01-01").resolve(tmp_path) == both
    assert RunSelection(until="2000-01-01").resolve(tmp_path) == []
    report = dataset_report(tmp_path, newest)
    assert [r["run_id"] for r in report["runs"]] == [second.run_id]
    assert sum(r["units"] for r in report["prompts"]) == second.units_ok
