"""`plan` estimates before a run, `report` totals after it, both from real files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image
from pydantic import SecretStr

from ernie_batch.money.plan import make_plan
from ernie_batch.money.report import dataset_report
from ernie_batch.run.engine import RunOptions, run_job
from ernie_batch.run.selection import RunSelection
from ernie_batch.sim.faults import FaultRates
from tests.conftest import PROJECT, SAMPLES, TEST_KEY, job_config

NO_HISTORY = 0.10  # the goals: within 10 % of the bill with no history,
ONE_RUN = 0.05  # within 5 % with one earlier run of the same prompt


def variants(src: Path, folder: Path, n: int) -> list[Path]:
    """`n` copies of an image with one pixel changed each: new content (new sha256, a new
    answer from the simulator), the same size."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.putpixel((i, i), (i * 37 % 256, 0, 0))
            path = folder / f"{src.stem}-{i}.png"
            im.save(path)
        out.append(path)
    return out


def test_plan_estimates_the_run_that_follows(sim_factory, tmp_path):
    sim = sim_factory()
    for mode in ("pdf", "image"):
        cfg = job_config(sim.url, tmp_path / mode, **{"pdf.mode": mode})
        before = make_plan(cfg)
        summary = run_job(cfg, SecretStr(TEST_KEY))
        assert before.requests == summary.requests
        assert before.pages == summary.units_ok
        assert abs(before.credits - summary.credits) <= NO_HISTORY * summary.credits, mode
        assert before.price_source == "token estimate"
        after = make_plan(cfg)
        assert after.requests == 0 and after.credits == 0
        assert after.units_already_done == summary.requests


def test_plan_learns_each_document_types_cost_from_one_earlier_run(sim_factory, tmp_path):
    """A second inbox of another mix (mostly small receipts) than the first run's (mostly PDF
    pages): a price per unit of any type would miss it by far; per document type it holds."""
    sim = sim_factory()
    out = tmp_path / "out"
    run_job(job_config(sim.url, out), SecretStr(TEST_KEY))
    inbox = tmp_path / "inbox"
    variants(SAMPLES / "receipt-cafe-aurora.png", inbox, 6)
    pdf = SAMPLES / "invoice-2026-0117.pdf"
    (inbox / pdf.name).write_bytes(pdf.read_bytes() + b"\n% another scan\n")
    cfg = job_config(sim.url, out, sources=[inbox])
    plan = make_plan(cfg)
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert plan.requests == summary.requests == 9
    assert abs(plan.credits - summary.credits) <= ONE_RUN * summary.credits
    assert plan.by_type["png"].source == "history of this prompt (1 units)"
    assert plan.by_type["pdf"].source == "history of this prompt (7 units)"


def test_plan_counts_nothing_on_a_fully_processed_inbox(sim_factory, tmp_path):
    """The issue's inbox: an unreadable PNG recorded as input_error by an earlier run is no
    request for the next run, so none for the plan either."""
    sim = sim_factory()
    inbox = tmp_path / "inbox"
    shutil.copytree(SAMPLES, inbox)
    png = (SAMPLES / "receipt-cafe-aurora.png").read_bytes()
    (inbox / "truncated.png").write_bytes(png[: len(png) // 2])  # its header reads, no more
    (inbox / "notes.txt").write_text("not a document\n")  # a skipped row, then done
    cfg = job_config(sim.url, tmp_path / "out", sources=[inbox])
    first = run_job(cfg, SecretStr(TEST_KEY))
    assert (first.units_failed, first.units_skipped, first.requests) == (1, 1, 9)
    plan = make_plan(cfg)
    again = run_job(cfg, SecretStr(TEST_KEY))
    assert again.requests == 0 and again.units_already_done == 11
    assert (plan.requests, plan.credits, plan.units_already_done) == (0, 0, 11)


def test_plan_counts_what_each_run_then_sends(sim_factory, tmp_path):
    """A sequence of runs over one inbox (a copy of a file under a second name, a second
    prompt, --retry-failed, --force): before each, the plan's counts are the run's."""
    sim = sim_factory(faults=FaultRates(invalid_answer=0.3), seed=24)
    inbox = tmp_path / "inbox"
    shutil.copytree(SAMPLES, inbox)
    shutil.copy(SAMPLES / "letter-photo.jpg", inbox / "letter-photo-copy.jpg")
    out = tmp_path / "out"
    second_prompt = {"prompt.template": "Read $file_name, page $page.", "prompt.template_file": None}
    steps = [({}, {}), ({}, {}), ({}, {"retry_failed": True}), (second_prompt, {}),
             ({}, {"force": True})]
    sent = []
    for overrides, flags in steps:
        cfg = job_config(sim.url, out, sources=[inbox], **{"retries.answer": 0, **overrides})
        plan = make_plan(cfg, **flags)
        summary = run_job(cfg, SecretStr(TEST_KEY), RunOptions(**flags))
        counted = (summary.units_ok + summary.units_failed, summary.units_already_done)
        assert (plan.requests, plan.units_already_done) == counted, (overrides, flags)
        # every unit of the copy, where the run writes duplicate rows for those answered
        assert plan.units_duplicate >= summary.units_duplicate
        sent.append(plan.requests)
    assert sent[0] == 9 and sent[1] > 0 and sent[3] == sent[4] == 9  # the copy is sent once


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


def test_plan_takes_the_flags_of_backfill_and_is_its_dry_run(sim_factory, tmp_path):
    """`plan` with backfill's file selection and prompt flags counts what that backfill then
    sends; `backfill --plan` and `run --plan` say what `plan` says, and send nothing."""
    from tests.test_cli import cli

    sim = sim_factory()
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    for day, names in (("2026-01-05", ["letter-photo.jpg", "survey-report.pdf"]),
                       ("2026-02-10", ["receipt-cafe-aurora.png", "invoice-2026-0117.pdf"])):
        (inbox / day).mkdir(parents=True)
        for name in names:
            shutil.copy(SAMPLES / name, inbox / day / name)
    v2 = tmp_path / "page-v2.txt"
    v2.write_text("Read page $page of $file_name; answer in JSON.\n")
    common = [str(inbox), "-c", str(PROJECT / "configs" / "demo.toml"), "--base-url", sim.url,
              "--output", str(out), "--json"]
    picked = ["--since", "2026-02-01", "--date-from", "path", "--prompt", str(v2)]
    env = {"AIMLAPI_API_KEY": TEST_KEY}

    def dry(*args: str) -> dict:
        res = cli(*args, env=env)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    plan = dry("plan", *common, *picked)
    assert dry("backfill", *common, *picked, "--plan") == plan
    assert dry("run", *common, "--plan")["requests"] == 9  # every file, the config's prompt
    assert sim.ledger()["entries"] == []  # a dry run sends nothing
    cfg = job_config(sim.url, out, sources=[inbox], **{
        "sources.since": "2026-02-01", "sources.date_from": "path",
        "prompt.template_file": str(v2), "prompt.template": None})
    summary = run_job(cfg, SecretStr(TEST_KEY), RunOptions(kind="backfill"))
    assert plan["requests"] == summary.requests == 4  # the receipt and the invoice's 3 pages
    assert abs(plan["credits"] - summary.credits) <= NO_HISTORY * summary.credits
    assert dry("plan", *common, *picked)["requests"] == 0
