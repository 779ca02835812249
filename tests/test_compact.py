"""`ernie-batch compact`: every row kept (across a schema change), readers of ours never see a
row twice or miss one at any point of a swap cut short, a killed run's journal folded once,
runs queue behind it, and `serve` schedules it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from ernie_batch import store
from ernie_batch.compact import TABLE_ORDER, compact_output
from ernie_batch.engine import run_job
from ernie_batch.store.snapshot import read_files
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY, job_config
from tests.test_crash_safety import check_exactly_once, killed_run

TABLES = list(TABLE_ORDER)


def rows(root: Path, table: str) -> Counter:
    """A table's rows as a multiset, from the files our readers read (file by file: a column
    whose type changed between prompt versions cannot be read as one table)."""

    def read(paths: list[Path]) -> Counter:
        return Counter(json.dumps(r, sort_keys=True, default=str)
                       for p in paths for r in pq.ParquetFile(p).read().to_pylist())

    return read_files(root, table, read)


def every_table(root: Path) -> dict[str, Counter]:
    return {t: rows(root, t) for t in TABLES}


def files(root: Path, table: str) -> list[Path]:
    return sorted((root / table).rglob("*.parquet")) if (root / table).is_dir() else []


@pytest.fixture
def history(sim_factory, tmp_path):
    """Two runs over the same files with two answer schemas (a property added, another's type
    changed: a new fingerprint, so everything is sent again), parts every 4 rows."""
    sim = sim_factory(latency_s=0.0)
    src = tmp_path / "in"
    chaos.make_corpus(src, images=8, pdf_pages=3, seed=5)
    out = tmp_path / "out"
    first = job_config(sim.url, out, [src], **{"output.flush_rows": 4, "limits.concurrency": 4})
    schema = json.loads((PROJECT / "configs" / "schemas" / "page.json").read_text())
    schema["properties"]["total_amount"] = {"type": ["string", "null"]}
    schema["properties"]["pages_seen"] = {"type": "integer"}
    (tmp_path / "changed.json").write_text(json.dumps(schema))
    second = job_config(sim.url, out, [src], **{"output.flush_rows": 4, "limits.concurrency": 4,
                                                "prompt.schema_file": str(tmp_path / "changed.json")})
    for cfg in (first, second):
        assert run_job(cfg, SecretStr(TEST_KEY)).outcome == "completed"
    return sim, first, second, out


def test_compaction_keeps_every_row_of_every_table_across_a_schema_change(history):
    sim, first, second, out = history
    before = every_table(out)
    parts = {t: len(files(out, t)) for t in TABLES}
    assert parts["pages"] > 4 and parts["attempts"] > 4 and parts["runs"] == 2

    summary = compact_output(out, TABLES, store.pages_schema([]))

    assert every_table(out) == before
    by_table = {t.table: t for t in summary.tables}
    assert by_table["pages"].rows == sum(before["pages"].values())
    # one file per schema in each partition: the pages of the two prompt versions stay apart
    assert len(files(out, "pages")) == 2 and len(files(out, "attempts")) == 1
    assert len(files(out, "runs")) == 1
    for f in files(out, "pages"):
        t = pd.read_parquet(f)
        assert t["fingerprint"].nunique() == 1
        keys = list(zip(t["fingerprint"], t["source_sha256"], t["page"], strict=True))
        assert keys == sorted(keys)
    assert len(pd.read_parquet(out / "attempts")) == sum(before["attempts"].values())
    assert not list((out / "_compact").iterdir())
    # the done-index reads the compacted files: nothing is sent again, for either version
    for cfg in (first, second):
        again = run_job(cfg, SecretStr(TEST_KEY))
        assert again.requests == 0 and again.units_already_done == 11
    assert compact_output(out, TABLES, store.pages_schema([])).tables[0].files_before == 0


def test_compaction_and_its_output_hold_no_key(history, tmp_path):
    """The compacted files, the intents' folder and what the command prints join the secret scan."""
    from tests.test_secrets import scan

    sim, first, second, out = history
    done = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "compact", "--output", str(out)],
                          cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "AIMLAPI_API_KEY": TEST_KEY})
    assert done.returncode == 0, done.stderr
    (tmp_path / "compact.log").write_text(done.stdout + done.stderr)
    assert "compact-" in " ".join(p.name for p in files(out, "pages"))
    count, hits = scan([out, tmp_path / "compact.log"])
    assert count > 5 and hits == []
    for part in files(out, "pages") + files(out, "attempts"):
        assert TEST_KEY not in json.dumps(pq.read_table(part).to_pylist(), default=str)


class Killed(BaseException):
    """Stands for kill -9 at one file-system step (nothing after it runs, locks drop)."""


def kill_at(monkeypatch, step: int) -> None:
    """Make the `step`-th rename or unlink of the compaction the last thing it does."""
    count = {"n": 0}
    real_replace, real_unlink = os.replace, os.unlink

    def counted(real):
        def step_once(*args, **kwargs):
            count["n"] += 1
            if count["n"] > step:
                raise Killed
            return real(*args, **kwargs)
        return step_once

    monkeypatch.setattr(os, "replace", counted(real_replace))
    monkeypatch.setattr(os, "unlink", counted(real_unlink))


def test_a_compaction_cut_at_any_step_shows_every_row_once_and_is_completed(
        history, tmp_path, monkeypatch):
    sim, first, second, out = history
    before = every_table(out)
    step, cut_short = 0, True
    while cut_short:
        copy = tmp_path / f"cut-{step}"
        shutil.copytree(out, copy)
        with monkeypatch.context() as patch:
            kill_at(patch, step)
            try:
                compact_output(copy, TABLES, store.pages_schema([]))
                cut_short = False
            except Killed:
                pass
        assert every_table(copy) == before, f"cut at step {step}"
        store.finish_interrupted(copy)  # what the next holder of the lock does first
        assert every_table(copy) == before
        assert not list((copy / "_compact").glob("*")), f"leftovers after step {step}"
        # and a plain reader sees each row once again
        assert len(pd.read_parquet(copy / "attempts")) == sum(before["attempts"].values())
        step += 1
    assert step > 10  # every swap: intent, rename, each part's unlink, intent's unlink


def test_a_killed_runs_journal_is_folded_exactly_once_by_compaction(sim_factory, tmp_path):
    sim = sim_factory(latency_s=0.01)
    src = tmp_path / "in"
    units = chaos.make_corpus(src, images=10, pdf_pages=3, seed=11)
    cfg = job_config(sim.url, tmp_path / "out", [src],
                     **{"output.flush_rows": 4, "limits.concurrency": 4})
    dead = killed_run(cfg, lose_last_pages_part=True)
    summary = compact_output(dead.root, TABLES, dead.pages_schema)
    assert summary.recovered_runs == [dead.run_id]
    check_exactly_once(sim, dead.root, units)
    runs = store.read_table(dead.root, "runs").to_pandas()
    assert runs["outcome"].tolist() == ["interrupted"]
    assert not list((dead.root / "_journal").glob("*.jsonl"))
    again = run_job(cfg, SecretStr(TEST_KEY))
    assert again.recovered_runs == [] and again.requests == 0
    check_exactly_once(sim, dead.root, units)
    assert len(store.read_table(dead.root, "runs")) == 2


def test_compact_cli_queues_behind_a_run_and_rejects_bad_options(tmp_path):
    from ernie_batch.cli import app

    out = tmp_path / "out"
    lock = store.OutputLock(out, "20260101T000000Z-abcdef")
    out.mkdir()
    lock.acquire()
    try:
        result = CliRunner().invoke(app, ["compact", "--output", str(out)])
        assert result.exit_code == 5
        assert "locked by run 20260101T000000Z-abcdef" in result.output
    finally:
        lock.release()
    assert CliRunner().invoke(app, ["compact", "--output", str(out), "--table", "x"]).exit_code == 2
    assert CliRunner().invoke(app, ["compact", "--output", str(out), "--before", "May"]).exit_code == 2
    result = CliRunner().invoke(app, ["compact", "--output", str(out), "--table", "billing",
                                      "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["tables"] == [
        {"table": "billing", "partitions": 0, "files_before": 0, "files_after": 0, "rows": 0,
         "rows_dropped": 0, "bytes_before": 0, "bytes_after": 0}]


def test_before_leaves_later_partitions_alone(tmp_path):
    from ernie_batch.bench.history import generate

    generate(tmp_path, 48, 10, "fp", store.pages_schema([]))  # two days of hourly runs
    compact_output(tmp_path, ["pages"], store.pages_schema([]),
                   before=date(2025, 1, 2))
    by_day = Counter(p.parent.name for p in files(tmp_path, "pages"))
    assert by_day == {"date=2025-01-01": 1, "date=2025-01-02": 24}


def test_serve_runs_compaction_on_its_cron(tmp_path):
    from ernie_batch.config import load_config
    from ernie_batch.errors import ScheduleError
    from flows.deploy import maintenance_deployments

    config = PROJECT / "configs" / "demo.toml"
    assert maintenance_deployments(load_config(config), config) == []
    cfg = load_config(config, {"compact.cron": "30 3 * * *", "schedule.timezone": "Europe/Berlin"})
    (deployment,) = maintenance_deployments(cfg, config)
    assert deployment.flow_name == "ernie-compact"
    assert deployment.parameters == {"config_path": str(config.resolve())}
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 3 * * *", "Europe/Berlin")
    with pytest.raises(ScheduleError, match="compact"):
        maintenance_deployments(load_config(config, {"compact.cron": "every night"}), config)


def test_the_compact_flow_under_prefect(prefect_harness, tmp_path):
    from ernie_batch.bench.history import generate
    from flows.compact import compact

    out = tmp_path / "out"
    generate(out, 6, 10, "fp", store.pages_schema([]))
    config = tmp_path / "job.toml"
    config.write_text(f'[output]\npath = "{out}"\n')
    before = rows(out, "pages")
    result = compact(config_path=str(config))
    assert {t["table"]: (t["files_before"], t["files_after"]) for t in result["tables"]
            if t["files_before"]} == {"pages": (6, 1), "attempts": (6, 1), "runs": (6, 1)}
    assert rows(out, "pages") == before


# ---------------------------------------------------------------- kill -9, for real (slow)

KILLS = 6


@pytest.mark.slow
def test_kill_9_at_random_points_during_compaction(tmp_path):
    """`ernie-batch compact` killed at a random moment, KILLS times; after each kill our reader
    sees every row once, and the next compaction completes the cut one first."""
    import random

    from ernie_batch.bench.history import generate

    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    draw = random.Random(seed)
    master = tmp_path / "master"
    generate(master, 240, 400, "fp", store.pages_schema([]))  # 10 days, 96,000 pages
    before = every_table(master)
    cmd = [sys.executable, "-m", "ernie_batch.cli", "compact"]
    shutil.copytree(master, tmp_path / "timing")
    started = time.monotonic()  # how long a whole compaction takes, start-up included
    subprocess.run([*cmd, "--output", str(tmp_path / "timing")], check=True, cwd=PROJECT,
                   capture_output=True)
    whole = time.monotonic() - started
    for k in range(KILLS):
        out = tmp_path / f"kill-{k}"
        shutil.copytree(master, out)
        proc = subprocess.Popen([*cmd, "--output", str(out)], cwd=PROJECT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(draw.uniform(0.3, max(0.4, whole)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert every_table(out) == before, f"seed {seed}, kill {k}"
        subprocess.run([*cmd, "--output", str(out)], check=True, cwd=PROJECT, capture_output=True)
        assert every_table(out) == before, f"seed {seed}, kill {k}: after completion"
        assert not list((out / "_compact").glob("*"))
        assert len(files(out, "pages")) == 10
        shutil.rmtree(out)
