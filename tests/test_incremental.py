"""Scheduled ingestion and backfills: exactly once by content, through the real Prefect flows."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from datetime import datetime

import pandas as pd
import pytest

from ernie_batch.store import read_table
from tests.conftest import PROJECT, SAMPLES

CONFIG = str(PROJECT / "configs" / "demo.toml")


def billed(sim) -> int:
    return len(sim.ledger()["entries"])


@pytest.fixture
def inbox(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    for name in ("invoice-2026-0117.pdf", "receipt-cafe-aurora.png"):
        shutil.copy(SAMPLES / name, folder / name)
    return folder


def ingest(sim, inbox, out, **overrides):
    from flows.ingest import ingest as flow

    values = {"api.base_url": sim.url, "sources.paths": [str(inbox)], "output.path": str(out),
              "prepare.workers": -1, **overrides}
    return asyncio.run(flow(config_path=CONFIG, overrides=values))


def test_scheduled_runs_send_only_new_work(prefect_harness, sim_factory, api_env, inbox,
                                           tmp_path):
    sim = sim_factory()
    out = tmp_path / "out"
    first = ingest(sim, inbox, out)
    assert first["requests"] == 4  # 3 invoice pages + 1 receipt
    sent = billed(sim)

    again = ingest(sim, inbox, out)
    assert again["requests"] == 0 and billed(sim) == sent

    shutil.copy(SAMPLES / "letter-photo.jpg", inbox / "letter-photo.jpg")
    added = ingest(sim, inbox, out)
    assert added["requests"] == 1 and billed(sim) == sent + 1

    (inbox / "receipt-cafe-aurora.png").rename(inbox / "receipt-renamed.png")
    renamed = ingest(sim, inbox, out)
    assert renamed["requests"] == 0 and billed(sim) == sent + 1
    pages = pd.read_parquet(out / "pages")
    dup = pages[pages["status"] == "duplicate"]
    assert list(dup["source_path"]) == [str(inbox / "receipt-renamed.png")]
    original = pages[(pages["status"] == "ok") & pages["source_path"].str.endswith("cafe-aurora.png")]
    assert dup["key"].tolist() == original["key"].tolist()
    # a duplicate row says where its answer is
    assert dup["duplicate_of_path"].tolist() == original["source_path"].tolist()
    assert dup["duplicate_of_run"].tolist() == original["run_id"].tolist()

    # nothing new for a renamed file twice
    assert ingest(sim, inbox, out)["requests"] == 0
    assert len(pd.read_parquet(out / "pages")) == len(pages)


def test_the_same_content_twice_in_one_selection_is_sent_once(prefect_harness, sim_factory,
                                                              api_env, inbox, tmp_path):
    sim = sim_factory()
    out = tmp_path / "out"
    shutil.copy(inbox / "invoice-2026-0117.pdf", inbox / "invoice-copy.pdf")
    result = ingest(sim, inbox, out)
    assert result["requests"] == 4 == billed(sim)  # 3 invoice pages once + 1 receipt
    assert result["units_ok"] == 4 and result["units_duplicate"] == 3
    pages = pd.read_parquet(out / "pages")
    dup = pages[pages["status"] == "duplicate"].sort_values("page")
    assert set(dup["source_path"]) == {str(inbox / "invoice-copy.pdf")}
    assert set(dup["duplicate_of_path"]) == {str(inbox / "invoice-2026-0117.pdf")}
    assert set(dup["duplicate_of_run"]) == {result["run_id"]}
    assert dup["page"].tolist() == [1, 2, 3]
    assert dup["answer_json"].isna().all()  # as written: the answer is where they point
    resolved = read_table(out, "pages", resolve_duplicates=True).to_pandas()
    copies = resolved[resolved["status"] == "duplicate"].sort_values("page")
    originals = resolved[resolved["source_path"] == str(inbox / "invoice-2026-0117.pdf")]
    answers = [c for c in resolved.columns if c.startswith("answer_")]
    assert copies[answers].reset_index(drop=True).equals(
        originals.sort_values("page")[answers].reset_index(drop=True))
    assert copies["answer_json"].notna().all()
    runs = pd.read_parquet(out / "runs")
    row = runs.iloc[0]
    assert (row["units_ok"], row["units_duplicate"], row["units_skipped"]) == (4, 3, 0)
    assert row["units_not_sent"] == 0 and row["units_already_done"] == 0
    assert row["hostname"] and row["pid"] > 0 and row["template_path"].endswith("page.txt")
    # the next run: every path done already, nothing sent, no new rows
    again = ingest(sim, inbox, out)
    assert again["requests"] == 0 and again["units_already_done"] == 7
    assert len(pd.read_parquet(out / "pages")) == len(pages)


def test_a_changed_prompt_sends_everything_again_and_keeps_old_rows(
    prefect_harness, sim_factory, api_env, inbox, tmp_path
):
    sim = sim_factory()
    out = tmp_path / "out"
    ingest(sim, inbox, out)
    new_prompt = tmp_path / "v2.txt"
    new_prompt.write_text("Version 2. Page $page of $file_name. Answer in JSON.")
    second = ingest(sim, inbox, out, **{"prompt.template_file": str(new_prompt)})
    assert second["requests"] == 4
    pages = pd.read_parquet(out / "pages")
    assert pages["fingerprint"].nunique() == 2
    assert (pages.groupby("fingerprint").size() == 4).all()
    assert pages["key"].is_unique  # a new fingerprint makes new keys


def test_a_changed_file_is_sent_again(prefect_harness, sim_factory, api_env, inbox, tmp_path):
    sim = sim_factory()
    out = tmp_path / "out"
    ingest(sim, inbox, out)
    receipt = inbox / "receipt-cafe-aurora.png"
    receipt.write_bytes(receipt.read_bytes() + b"")  # same bytes: nothing to do
    assert ingest(sim, inbox, out)["requests"] == 0
    from PIL import Image

    Image.open(SAMPLES / "receipt-cafe-aurora.png").rotate(180).save(receipt)
    assert ingest(sim, inbox, out)["requests"] == 1


def test_backfill_takes_only_files_in_the_date_range(prefect_harness, sim_factory, api_env,
                                                     tmp_path):
    from flows.backfill import backfill

    sim = sim_factory()
    root = tmp_path / "inbox"
    for day in ("2026-10-30", "2026-11-02", "2026-11-20"):
        (root / day).mkdir(parents=True)
        shutil.copy(SAMPLES / "receipt-cafe-aurora.png", root / day / f"receipt-{day}.png")
    # mtimes disagree with the folder dates, so only the path decides
    for f in root.rglob("*.png"):
        stamp = datetime(2026, 1, 1).timestamp()
        os.utime(f, (stamp, stamp))
    out = tmp_path / "out"
    result = asyncio.run(backfill(
        config_path=CONFIG, folders=[str(root)], since="2026-11-01", until="2026-11-15",
        date_from="path",
        overrides={"api.base_url": sim.url, "output.path": str(out), "prepare.workers": -1}))
    assert result["kind"] == "backfill"
    pages = pd.read_parquet(out / "pages")
    # the three receipts have the same content: one request, and the rest are duplicates
    assert sorted(os.path.basename(p) for p in pages["source_path"]) == ["receipt-2026-11-02.png"]
    by_mtime = asyncio.run(backfill(
        config_path=CONFIG, folders=[str(root)], since="2025-12-31", until="2026-01-02",
        overrides={"api.base_url": sim.url, "output.path": str(out), "prepare.workers": -1}))
    assert by_mtime["requests"] == 0  # same content already answered
    pages = pd.read_parquet(out / "pages")
    assert sorted(pages["status"]) == ["duplicate", "duplicate", "ok"]


def test_backfill_keeps_the_configs_date_from_unless_the_flag_is_given(sim_factory, tmp_path):
    """A flag overrides the config only when given (the real command, in a subprocess)."""
    from tests.test_chaos import cli_env, prefect_home, write_config
    from tests.test_cli import cli

    sim = sim_factory()
    root = tmp_path / "inbox"
    for day in ("2026-10-30", "2026-11-02"):
        (root / day).mkdir(parents=True)
        shutil.copy(SAMPLES / "letter-photo.jpg", root / day / f"letter-{day}.jpg")
        (root / day / f"letter-{day}.jpg").write_bytes(
            (root / day / f"letter-{day}.jpg").read_bytes() + day.encode())  # distinct content
    stamp = datetime(2026, 1, 1).timestamp()
    for f in root.rglob("*.jpg"):
        os.utime(f, (stamp, stamp))  # mtimes far from the folder dates
    config = write_config(tmp_path / "job.toml", root, tmp_path / "out", sim.url, concurrency=2)
    config.write_text(config.read_text().replace("[api]", 'date_from = "path"\n[api]', 1))
    args = ["backfill", str(root), "--config", str(config), "--since", "2026-11-01",
            "--until", "2026-11-15", "--base-url", sim.url, "--output", str(tmp_path / "out"),
            "--json"]
    res = cli(*args, env=cli_env(prefect_home()))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["requests"] == 1  # only 2026-11-02, by path
    res = cli(*args, "--date-from", "mtime", env=cli_env(prefect_home()))
    assert json.loads(res.stdout.splitlines()[-1])["requests"] == 0  # by mtime: none in range
