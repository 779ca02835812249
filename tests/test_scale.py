"""Shard runs and their shared rate limit, without a Prefect server: the coordinator's granter
and the shard runs' own body (`run_shard`) in one process, against the simulator on loopback.

The whole thing on a work pool, with workers and PostgreSQL, is `tests/test_pool.py` (slow).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest

from ernie_batch import store
from ernie_batch.bench import max_in_any_window
from ernie_batch.config import SourceOptions
from ernie_batch.discover import discover
from ernie_batch.scale.channel import Channel, ShardReport
from ernie_batch.scale.granter import Granter, grants_of
from ernie_batch.scale.plan import split, write_manifest
from ernie_batch.scale.shard import run_shard
from tests.conftest import PROJECT, TEST_KEY
from tests.test_chaos import make_corpus
from tests.test_cli import cli

WINDOW_S = 2.0
PER_WINDOW = 24  # 720 a minute in the simulator's terms


def docs_of(folder: Path):
    return discover(SourceOptions(paths=[folder]))[0]


def test_shards_split_by_content_and_balance(tmp_path):
    make_corpus(tmp_path / "in", images=30, pdf_pages=3, seed=2)
    for i in range(3):  # the same content at another path: the same shard
        (tmp_path / "in" / f"copy-{i}.png").write_bytes((tmp_path / "in" / "scan-001.png")
                                                         .read_bytes())
    docs = docs_of(tmp_path / "in")
    groups = split(docs, 4)
    assert sorted(str(d.path) for g in groups for d in g) == sorted(str(d.path) for d in docs)
    home = {d.sha256: i for i, g in enumerate(groups) for d in g}
    assert all(home[d.sha256] == i for i, g in enumerate(groups) for d in g)  # one shard each
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 4 and split(docs, 4) == groups  # balanced, deterministic


def shard_setup(tmp_path: Path, sim_url: str, shards: int, **overrides) -> tuple[Channel, int]:
    units = make_corpus(tmp_path / "in", images=66, pdf_pages=6, seed=4)
    channel = Channel.of(tmp_path / "out", "20260101T000000Z-c00rd1")
    how = {"config_path": str(PROJECT / "configs" / "demo.toml"), "kind": "run",
           "overrides": {"api.base_url": sim_url, "output.path": str(tmp_path / "out"),
                         "sources.paths": [str(tmp_path / "in")], "prepare.workers": -1,
                         "limits.concurrency": 4, "limits.rpm": PER_WINDOW * 60 / WINDOW_S,
                         "limits.window_s": WINDOW_S, **overrides}}
    for shard, group in enumerate(split(docs_of(tmp_path / "in"), shards)):
        write_manifest(channel, shard, group, how)
    return channel, units


async def run_shards(channel: Channel, shards: int) -> list:
    granter = Granter(channel, per_window=PER_WINDOW, window_s=WINDOW_S)
    run_ids = [store.new_run_id() for _ in range(shards)]
    for run_id in run_ids:
        granter.admit(run_id)
    granting = asyncio.create_task(granter.run())
    try:
        return await asyncio.gather(*(run_shard(channel.manifest(i), run_id)
                                      for i, run_id in enumerate(run_ids)))
    finally:
        granter.stop()
        await granting


def test_shards_share_one_limit_and_answer_every_page_once(sim_factory, api_env, tmp_path):
    sim = sim_factory(latency_s=0.2, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
    channel, units = shard_setup(tmp_path, sim.url, 3)
    summaries = asyncio.run(run_shards(channel, 3))
    assert [s.outcome for s in summaries] == ["completed"] * 3
    entries = sim.ledger()["entries"]
    times = [e["at"] for e in entries]
    assert len(times) == units and sim.ledger()["stats"].get("rate_limited", 0) == 0
    assert max_in_any_window(times, WINDOW_S) <= PER_WINDOW  # together, never over the limit
    rate = (len(times) - 1) / (max(times) - min(times)) * WINDOW_S
    assert rate >= 0.75 * PER_WINDOW  # and not far under it (a guard, not a benchmark)
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    runs = store.read_table(tmp_path / "out", "runs").to_pandas()
    assert set(runs["kind"]) == {"shard"} and set(runs["parent_run_id"]) == {channel.folder.name}
    assert sorted(runs["shard"]) == [0, 1, 2] and runs["pid"].notna().all()


def test_a_budget_stop_in_one_shard_stops_the_others(sim_factory, api_env, tmp_path):
    sim = sim_factory(latency_s=0.05, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
    channel, units = shard_setup(tmp_path, sim.url, 3)
    manifest = pd.read_json(channel.manifest(0), typ="series")
    manifest["overrides"]["budget.max_credits"] = 2000.0  # shard 0 stops after a request or two
    channel.manifest(0).write_text(manifest.to_json())
    summaries = asyncio.run(run_shards(channel, 3))
    assert [s.outcome for s in summaries] == ["budget_stopped"] * 3
    assert channel.stop.exists()
    assert len(sim.ledger()["entries"]) < units  # found once, obeyed by all


async def grant_for(channel: Channel, run_id: str, waiting: int, used: int, *,
                    resume: bool, seconds: float) -> Granter:
    """A granter (new, or resumed from the channel) serving one shard run that wants `waiting`."""
    ShardReport(shard=0, run_id=run_id, waiting=waiting, used=used, ok=used).write(
        channel.report(run_id))
    granter = Granter(channel, per_window=100, window_s=0.5)
    if resume:
        granter.resume(channel)
    granter.admit(run_id)
    granting = asyncio.create_task(granter.run())
    await asyncio.sleep(seconds)
    granter.stop()
    await granting
    return granter


def test_a_resumed_granter_goes_on_from_the_dead_ones_counts_after_a_clear_window(tmp_path):
    """A coordinator that died and is run again: no grant handed out twice, no window overrun."""
    channel = Channel(tmp_path / "_scale" / "c")
    run_id = store.new_run_id()
    asyncio.run(grant_for(channel, run_id, waiting=5, used=0, resume=False, seconds=0.2))
    last_issued, granted = grants_of(channel, run_id)[-1]
    assert granted == 5
    granter = asyncio.run(grant_for(channel, run_id, waiting=3, used=5, resume=True,
                                    seconds=1.2))
    batches = grants_of(channel, run_id)
    assert batches[-1][1] == 8  # counted on from 5, not from 0
    first_new = min(t for t, n in batches if n > 5)
    assert first_new >= last_issued + granter.window_s


@pytest.mark.parametrize("args, env, fragment", [
    (["run", "--pool", "p"], {}, "set PREFECT_API_URL"),
    (["deploy", "--pool", "p"], {}, "set PREFECT_API_URL"),
    (["server", "start", "--database-url", "postgresql+asyncpg://u:s3cret@db/prefect"], {},
     "PREFECT_API_DATABASE_CONNECTION_URL"),
    (["server", "start", "--host", "0.0.0.0"], {}, "PREFECT_SERVER_API_AUTH_STRING"),
])
def test_scale_commands_refuse_in_one_line(tmp_path, args, env, fragment):
    (tmp_path / "inbox").mkdir()
    cfg = tmp_path / "job.toml"
    cfg.write_text('[sources]\npaths = ["inbox"]\n[api]\nbase_url = "http://127.0.0.1:9/v1"\n')
    full = {"AIMLAPI_API_KEY": TEST_KEY, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path),
            **env}
    if args[0] in ("run", "deploy"):
        args = [*args, "--config", str(cfg)]
    res = cli(*args, env=full, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "s3cret" not in res.stderr
