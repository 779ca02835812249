"""Shard runs, their shared rate limit and their stop, without workers: the shard runs' own
body (`run_shard`) in one process, each a member of its key's limit through Prefect's test
harness (a real server), against the simulator on loopback; the coordinator's summary over
what they committed.

The whole thing on a work pool, with workers and PostgreSQL, is `tests/test_pool.py` (slow).
"""

from __future__ import annotations

import asyncio
import json
import types
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ernie_batch import store
from ernie_batch.bench import max_in_any_window
from ernie_batch.bench._http import warm_server
from ernie_batch.config import SourceOptions, load_config
from ernie_batch.intake.discover import discover
from ernie_batch.run.summary import RunSummary
from ernie_batch.scale import limit_share, stop
from ernie_batch.scale.outcome import ShardState, finish, flow_state, shard_counts
from ernie_batch.scale.plan import (
    Attempt,
    Folder,
    job_data,
    provenance,
    read_json,
    split,
    write_manifest,
)
from ernie_batch.scale.shard import holding_run_lease, output_root, run_shard, take_over
from ernie_batch.scale.stop import ShardWatch, read_stop
from ernie_batch.vocab import RunOutcome
from tests.conftest import PROJECT, SAMPLES, TEST_KEY, put_object
from tests.test_chaos import make_corpus
from tests.test_cli import cli

WINDOW_S = 2.0
PER_WINDOW = 24  # 720 a minute in the simulator's terms
COORDINATOR = "20260101T000000Z-c00rd1"
SIX = ("ok", "failed", "skipped", "duplicate", "already_done", "not_sent")  # units_<count>


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


def how_of(config: Path, **overrides) -> dict:
    """What a coordinator writes in a manifest of a job: its config as data, its options."""
    cfg = load_config(config, overrides)
    return {"job": job_data(cfg, None, 1), "provenance": provenance(cfg), "kind": "run"}


def shard_setup(tmp_path: Path, sim_url: str, shards: int) -> tuple[Folder, int]:
    units = make_corpus(tmp_path / "in", images=66, pdf_pages=6, seed=4)
    folder = Folder.of(tmp_path / "out", COORDINATOR)
    how = how_of(PROJECT / "configs" / "demo.toml", **{
        "api.base_url": sim_url, "output.path": str(tmp_path / "out"),
        "sources.paths": [str(tmp_path / "in")], "prepare.workers": -1,
        "limits.concurrency": 4, "limits.rpm": PER_WINDOW * 60 / WINDOW_S,
        "limits.window_s": WINDOW_S})
    for shard, group in enumerate(split(docs_of(tmp_path / "in"), shards)):
        write_manifest(folder, shard, group, how)
    return folder, units


def run_shards(folder: Folder, shards: int) -> tuple[list[str], list[RunSummary]]:
    run_ids = [store.new_run_id() for _ in range(shards)]

    async def go() -> list[RunSummary]:
        return await asyncio.gather(*(run_shard(folder.root, folder.manifest(i), run_id)
                                      for i, run_id in enumerate(run_ids)))

    return run_ids, asyncio.run(go())


@pytest.fixture
def fast_refresh(prefect_harness, monkeypatch):
    monkeypatch.setattr(limit_share, "REFRESH_S", 0.3)


def coordinator_of(folder: Folder, run_ids: list[str], documents: list[int]):
    """What `outcome.finish` reads of a coordinator whose shard runs were `run_ids`."""
    cfg = load_config(PROJECT / "configs" / "demo.toml", {"output.path": folder.root.url})
    states = [ShardState(i, n, [Attempt(r)], state="COMPLETED")
              for i, (r, n) in enumerate(zip(run_ids, documents, strict=True))]
    return types.SimpleNamespace(root=folder.root, run_id=COORDINATOR, cfg=cfg,
                                 states=states, started_at=datetime.now(UTC), interrupted=None,
                                 exit_code_if_interrupted=None, lease_lost=None)


def test_shards_share_one_limit_and_their_coordinator_sums_them_up(
        fast_refresh, sim_factory, api_env, tmp_path):
    sim = sim_factory(latency_s=0.2, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
    warm_server(sim)
    folder, units = shard_setup(tmp_path, sim.url, 3)
    run_ids, summaries = run_shards(folder, 3)
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
    assert set(runs["kind"]) == {"shard"} and set(runs["parent_run_id"]) == {COORDINATOR}
    assert sorted(runs["shard"]) == [0, 1, 2] and runs["pid"].notna().all()

    # the coordinator's summary: its shards' figures, documents included, from the tables
    total = finish(coordinator_of(folder, run_ids, [s.documents for s in summaries]), {})
    assert total.units_ok == units == sum(s.units_ok for s in summaries)
    assert total.units_selected == units == sum(  # the six counts add up, as a run's do
        getattr(total, f"units_{c}") for c in SIX)
    assert total.documents == sum(s.documents for s in summaries)
    assert total.documents_built == sum(s.documents_built for s in summaries) > 0
    assert total.documents_complete == sum(s.documents_complete for s in summaries)
    assert total.credits == pytest.approx(sum(s.credits for s in summaries))
    assert total.outcome == "completed" and total.rate_limited == 0
    row = store.read_table(tmp_path / "out", "runs").to_pandas().query("kind == 'coordinator'")
    assert sorted(row["accepted_runs"].iloc[0]) == sorted(run_ids)
    assert flow_state(total).type.value == "COMPLETED"


def test_a_shard_runs_from_its_manifest_alone(
        prefect_harness, s3, sim_factory, api_env, tmp_path):
    """Sources and output on S3, the coordinator's config, template and schema gone once the
    manifest is written: the shard runs from what its manifest holds (the config as data,
    the template and schema as text, object URLs with their ETags), reached through the
    output's store; its rows say where and which version, and where the config was."""
    import shutil

    _, bucket = s3
    etags = {key: put_object(bucket, f"inbox/{key}", (SAMPLES / key).read_bytes())
             for key in ("receipt-cafe-aurora.png", "letter-photo.jpg")}
    job = tmp_path / "job"  # the coordinator's files, as on its own machine
    shutil.copytree(PROJECT / "configs", job)
    source, out = f"s3://{bucket}/inbox/", f"s3://{bucket}/out"
    sim = sim_factory()
    how = how_of(job / "demo.toml", **{"api.base_url": sim.url, "prepare.workers": -1,
                                       "output.path": out, "sources.paths": [source]})
    assert how["job"]["sources"]["paths"] == [f"s3://{bucket}/inbox"]  # never a local path
    folder = Folder.of(out, COORDINATOR)
    key = write_manifest(folder, 0, discover(SourceOptions(paths=[source]))[0], how)
    shutil.rmtree(job)
    assert not (tmp_path / "out").exists()  # in the bucket, not in a folder named s3:

    summary = asyncio.run(run_shard(output_root(out, {}), key, store.new_run_id()))
    assert summary.outcome == "completed" and summary.units_ok == 2
    assert read_json(folder.root, key)["documents"][0]["etag"] in etags.values()
    pages = store.read_table(out, "pages").to_pandas()
    assert dict(zip(pages["source_path"], pages["source_etag"], strict=True)) == {
        f"s3://{bucket}/inbox/{key}": etag for key, etag in etags.items()}
    (run,) = store.read_table(out, "runs").to_pylist()
    assert (run["config_path"], run["template_path"]) == (
        str(job / "demo.toml"), str(job / "prompts" / "page.txt"))  # recorded, never opened


def test_an_attempts_run_lease_in_a_bucket_tells_a_dead_attempt_from_a_live_one(s3, tmp_path):
    """Output in a bucket, attempts on any machine: an earlier attempt that renews its run
    lease is alive (fenced: never taken over); one that stopped renewing (killed, or paused)
    is taken over once its lease lapses, and if it was only paused it learns so at its next
    renewal; one that never started is taken over at once."""
    from ernie_batch.buckets import resolve_access
    from ernie_batch.errors import LeaseLost, LockedError
    from ernie_batch.location import OutputRoot

    _, bucket = s3
    root = OutputRoot(f"s3://{bucket}/out", resolve_access(), tmp_path / "state", 3.0)
    schema = store.pages_schema([])
    alive = store.run_lease(root, "alive")
    assert alive.try_acquire()  # renewed every second by its thread
    paused = store.run_lease(root, "paused").lease
    assert paused.try_acquire()  # never renewed: as a process stopped with SIGSTOP
    try:
        assert take_over(root, [], ["alive", "paused", "never-started"], schema) == (
            ["paused", "never-started"], ["alive"])
        assert alive.held
        with pytest.raises(LeaseLost):
            paused.renew()  # woken, it cannot renew its way back in
        with pytest.raises(LockedError), holding_run_lease(root, "never-started", print):
            pass  # a worker that picks it up late: it never starts
    finally:
        alive.release()


PAUSED_ATTEMPT = """
import sys, time
from ernie_batch.buckets import resolve_access
from ernie_batch.errors import LeaseLost
from ernie_batch.location import OutputRoot
from ernie_batch.scale.shard import holding_run_lease
root = OutputRoot(sys.argv[1], resolve_access(), None, 3.0)
with holding_run_lease(root, "paused", lambda: print("lost", flush=True)) as check:
    print("holding", flush=True)
    while True:
        try:
            check()  # what its recorder does before every write
        except LeaseLost as exc:
            print("refused:", exc, flush=True)
            break
        time.sleep(0.1)
"""


def test_an_attempt_paused_past_its_lease_writes_nothing_once_woken(s3, tmp_path):
    """SIGSTOP past the run lease's ttl while a later attempt takes it over: woken, the
    attempt's next write is refused (LeaseLost): it never adds to what the later one took."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ernie_batch.buckets import resolve_access
    from ernie_batch.location import OutputRoot

    _, bucket = s3
    out = f"s3://{bucket}/out"
    paused = subprocess.Popen([sys.executable, "-c", PAUSED_ATTEMPT, out], env=os.environ,
                              stdout=subprocess.PIPE, text=True, cwd=PROJECT)
    try:
        assert paused.stdout.readline().strip() == "holding"
        os.kill(paused.pid, signal.SIGSTOP)
        root = OutputRoot(out, resolve_access(), tmp_path / "state", 3.0)
        began = time.monotonic()
        assert take_over(root, [], ["paused"], store.pages_schema([])) == (["paused"], [])
        assert time.monotonic() - began >= 3.0  # it waited for the lease to lapse
        os.kill(paused.pid, signal.SIGCONT)
        lines = paused.communicate(timeout=30)[0]
    finally:
        paused.kill()
    assert "refused: run lease of paused" in lines  # and it stopped: it exited by itself


def test_a_shard_that_took_over_a_dead_attempt_counts_its_rows_once():
    """The dead attempt's rows are the shard's work; the attempt that took it over counted
    them as already done: the coordinator's counts still add up to what was selected."""
    final = {"units_ok": 5, "units_failed": 0, "units_skipped": 1, "units_duplicate": 0,
             "units_already_done": 8, "units_not_sent": 0, "units_selected": 14,
             "documents": 4, "requests": 5, "rate_limited": 0, "refused_sporadic": 1}
    dead = {"units_ok": 6, "units_failed": 1, "units_skipped": 0, "units_duplicate": 0,
            "units_already_done": None, "units_not_sent": None, "units_selected": None,
            "documents": 3, "requests": 9, "rate_limited": 2, "refused_sporadic": None}
    counts = shard_counts(final, [dead])
    assert (counts["units_ok"], counts["units_failed"], counts["units_already_done"]) == (
        11, 1, 1)  # one unit a run before the dead one answered
    assert sum(counts[f"units_{c}"] for c in SIX) == counts["units_selected"] == 14
    assert (counts["requests"], counts["rate_limited"], counts["documents"]) == (14, 2, 4)


def test_a_budget_stop_in_one_shard_stops_the_others_through_prefect(
        fast_refresh, sim_factory, api_env, tmp_path):
    sim = sim_factory(latency_s=0.05, rpm=PER_WINDOW * 60 / WINDOW_S, window_s=WINDOW_S)
    folder, units = shard_setup(tmp_path, sim.url, 3)
    manifest = read_json(folder.root, folder.manifest(0))
    manifest["job"]["budget"]["max_credits"] = 2000.0
    store.files.write_small(folder.root, folder.manifest(0), json.dumps(manifest))
    _, summaries = run_shards(folder, 3)  # shard 0 stops after a request or two
    assert [s.outcome for s in summaries] == ["budget_stopped"] * 3
    assert len(sim.ledger()["entries"]) < units  # found once, obeyed by all

    async def flag():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            return await read_stop(client, COORDINATOR)

    assert asyncio.run(flag())["shard"] == 0  # the Variable the shard runs watch
    state = flow_state(summaries[1])
    assert (state.type.value, state.name) == ("FAILED", "BudgetStopped")  # not retried


def test_a_shard_run_whose_flow_run_was_replaced_stops(prefect_harness, monkeypatch):
    """A worker that comes back after its shard run was marked Crashed (and given to a new
    attempt) learns it from its own flow run, and sends nothing more: it is fenced."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    @flow(name="ernie-shard-stand-in")
    def stand_in() -> None: ...

    monkeypatch.setattr(stop, "FLOW_RUN_EVERY_S", 0.0)  # as after a stall: read it each time
    stops: list[tuple[RunOutcome, str | None]] = []

    async def go() -> None:
        async with get_client() as client:
            flow_run = await client.create_flow_run(stand_in)
            await client.set_flow_run_state(flow_run.id, Running(), force=True)
            watch = ShardWatch(COORDINATOR + "x", 0, str(flow_run.id),
                               lambda *stop: stops.append(stop))
            await watch.check(client)
            assert stops == []  # running: it goes on
            await client.set_flow_run_state(flow_run.id, Crashed(), force=True)
            await watch.check(client)

    asyncio.run(go())
    assert len(stops) == 1 and stops[0][0] == RunOutcome.INTERRUPTED and "CRASHED" in stops[0][1]


@pytest.mark.parametrize("outcome, error, expected", [
    ("completed", None, ("COMPLETED", "Completed")),
    ("partial", None, ("COMPLETED", "Completed")),  # units that failed are rows
    ("partial", "shard 1: crashed", ("FAILED", "Failed")),  # a shard that failed for good
    ("interrupted", "interrupted by SIGINT", ("CANCELLED", "Cancelled")),
    ("fatal_api_error", "401 Unauthorized", ("FAILED", "FatalApiError")),
    ("budget_stopped", "budget", ("FAILED", "BudgetStopped")),
])
def test_a_runs_final_prefect_state_says_how_it_ended(outcome, error, expected):
    summary = RunSummary(run_id="r", kind="coordinator", outcome=outcome, exit_code=0,
                         error=error, output="/tmp/out")
    state = flow_state(summary)
    assert (state.type.value, state.name) == expected
    assert state.data["outcome"] == outcome  # the summary travels with it


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


@pytest.mark.parametrize("given", ["config", "argument", "pdf password"])
def test_a_pool_run_refuses_a_local_source_in_one_line(tmp_path, given):
    """Workers on other machines cannot read a path of the coordinator's: exit 2 before
    anything starts, one line naming it (given in the config, or on the command line). Nor
    is a secret of the config sent to them (a PDF password)."""
    (tmp_path / "inbox").mkdir()
    inbox = str(tmp_path / "inbox") if given == "config" else "s3://scans/inbox/"
    cfg = tmp_path / "job.toml"
    cfg.write_text(f'[sources]\npaths = ["{inbox}"]\n[api]\nbase_url = "http://127.0.0.1:9/v1"\n'
                   '[limits]\nrpm = 60\n' + ('[pdf]\npassword = "hunter2-pdf"\n'
                                              if given == "pdf password" else ""))
    sources = [str(tmp_path / "inbox")] if given == "argument" else []
    res = cli("backfill", *sources, "--pool", "p", "--config", str(cfg),
              "--output", str(tmp_path / "out"),
              env={"AIMLAPI_API_KEY": TEST_KEY, "PREFECT_API_URL": "http://127.0.0.1:9/api"},
              cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--pool" in lines[0], lines
    if given == "pdf password":
        assert "pdf.password" in lines[0] and "hunter2-pdf" not in res.stderr + res.stdout
    else:
        assert str(tmp_path / "inbox") in lines[0] and "local path" in lines[0]


DEAD_ATTEMPT = """
import asyncio, sys
from ernie_batch.scale.shard import output_root, run_shard
asyncio.run(run_shard(output_root(sys.argv[1], {}), sys.argv[2], sys.argv[3]))
"""


@pytest.mark.slow  # a shard run in a subprocess killed with -9, then its next attempt: ~30 s
def test_a_shard_attempt_takes_over_one_that_died_on_another_machine(
        prefect_harness, s3, sim_factory, api_env, tmp_path, monkeypatch):
    """Output in a bucket: the first attempt is killed -9 and its machine's state (journal,
    run-id lock) is gone with it; the next attempt, elsewhere, commits what the dead one
    staged, takes it over (its `runs` row written, so its coordinator accepts it) and sends
    only what arrived after the dead attempt's last staging."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from collections import Counter

    from deltalake import DeltaTable
    from prefect.settings import PREFECT_API_URL

    _, bucket = s3
    units = make_corpus(tmp_path / "in", images=40, pdf_pages=1, seed=31)
    for path in sorted((tmp_path / "in").iterdir()):
        put_object(bucket, f"inbox/{path.name}", path.read_bytes())
    shutil.rmtree(tmp_path / "in")
    source, out = f"s3://{bucket}/inbox/", f"s3://{bucket}/out"
    sim = sim_factory(latency_s=0.25)
    how = how_of(PROJECT / "configs" / "demo.toml", **{
        "api.base_url": sim.url, "prepare.workers": -1, "limits.concurrency": 2,
        "output.path": out, "output.stage_every_s": 1.0, "output.commit_every_s": 600,
        "output.lease_ttl_s": 3.0})  # its run lease lapses seconds after the kill
    folder = Folder.of(out, COORDINATOR)
    key = write_manifest(folder, 0, discover(SourceOptions(paths=[source]))[0], how)
    first, second = store.new_run_id(), store.new_run_id()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "XDG_CACHE_HOME": str(tmp_path / "machine-a"), "PYTHONPATH": str(PROJECT)}
    with open(tmp_path / "machine-a.log", "wb") as log:
        dead = subprocess.Popen([sys.executable, "-c", DEAD_ATTEMPT, out, key, first], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT,
                                start_new_session=True)
    staged = f"out/_staging/{first}.json"
    try:
        deadline = time.monotonic() + 120
        while len(sim.ledger()["entries"]) < 15 or staged not in bucket_keys(bucket):
            assert dead.poll() is None and time.monotonic() < deadline, (
                tmp_path / "machine-a.log").read_text()
            time.sleep(0.2)
        time.sleep(1.5)
        os.killpg(dead.pid, signal.SIGKILL)
    finally:
        dead.kill()
        dead.wait()
    sent_by_dead = len(sim.ledger()["entries"])
    shutil.rmtree(tmp_path / "machine-a")  # its journal and lock: lost with the machine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-b"))
    summary = asyncio.run(run_shard(folder.root, key, second, [first]))
    assert summary.outcome == "completed"
    pages = DeltaTable(f"{out}/pages").to_pandas()  # as a user reads the committed table
    assert len(pages) == units and pages["key"].is_unique and (pages["status"] == "ok").all()
    assert set(pages["run_id"]) == {first, second}
    runs = {r["run_id"]: r for r in store.read_table(out, "runs").to_pylist()}
    assert runs[first]["outcome"] == "interrupted" and runs[first]["parent_run_id"] == COORDINATOR
    assert runs[second]["accepted_runs"] == [first]  # its coordinator accepts both
    assert staged not in bucket_keys(bucket)  # folded, then deleted
    entries = sim.ledger()["entries"]
    times = Counter(e["content_sha256"] for e in entries)
    again = [e for e in entries[:sent_by_dead] if times[e["content_sha256"]] > 1]
    assert sent_by_dead - len(again) >= 10  # most of what the dead attempt received was kept


def bucket_keys(bucket: str) -> list[str]:
    import obstore

    from ernie_batch.buckets import client, resolve_access

    return [m["path"] for batch in obstore.list(client(resolve_access(), "s3", bucket))
            for m in batch]
