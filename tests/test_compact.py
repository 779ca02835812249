"""`ernie-batch compact` on Delta tables: every row kept (across a schema change), readers see
every row once whatever step a compaction is cut at, it runs beside writers (and retries the
optimize that loses a race), a reader on an older version keeps its files, a killed run's
journal is folded once, one compaction at a time, and `serve` schedules it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from ernie_batch import store
from ernie_batch.run import compact as compaction
from ernie_batch.run.compact import COMPACTED_TABLES, compact_output
from ernie_batch.run.engine import run_job
from ernie_batch.store import delta
from ernie_batch.store.maintain import files_by_partition
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY, job_config
from tests.test_crash_safety import BETWEEN_TABLES, check_exactly_once, killed_run

TABLES = list(COMPACTED_TABLES)


def rows(root: Path, table: str) -> Counter:
    """A table's rows as a multiset, every row a reader of ours can see (rejected ones too)."""
    found = store.read_table(root, table, include_rejected=True)
    if found is None:
        return Counter()
    return Counter(json.dumps(r, sort_keys=True, default=str) for r in found.to_pylist())


def every_table(root: Path) -> dict[str, Counter]:
    return {t: rows(root, t) for t in TABLES}


def files(root: Path, table: str) -> dict[str, int]:
    """Data files per date partition, as the table's newest version lists them."""
    return {d: f.files for d, f in files_by_partition(root, table).items()}


@pytest.fixture
def history(sim_factory, tmp_path):
    """Two runs over the same files with two answer schemas (a property added, another's type
    changed: a new fingerprint, so everything is sent again), a commit every 4 pages."""
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
    from deltalake import DeltaTable

    sim, first, second, out = history
    before = every_table(out)
    was = {t: sum(files(out, t).values()) for t in TABLES}
    assert was["pages"] > 4 and was["attempts"] > 4 and was["runs"] == 2

    summary = compact_output(out, TABLES, store.pages_schema([]))

    assert every_table(out) == before
    by_table = {t.table: t for t in summary.tables}
    assert by_table["pages"].rows == sum(before["pages"].values())
    assert by_table["pages"].files_before == was["pages"]
    # one schema per table: both prompt versions' pages in one file a day
    assert list(files(out, "pages").values()) == [1] == list(files(out, "attempts").values())
    assert list(files(out, "runs").values()) == [1]
    assert len(DeltaTable(str(out / "attempts")).to_pandas()) == sum(before["attempts"].values())
    # the done-index reads the compacted files: nothing is sent again, for either version
    for cfg in (first, second):
        again = run_job(cfg, SecretStr(TEST_KEY))
        assert again.requests == 0 and again.units_already_done == 11
    assert compact_output(out, TABLES, store.pages_schema([])).tables[0].files_before == 0


def test_compaction_and_its_output_hold_no_key(history, tmp_path):
    """The compacted files, the Delta log and what the command prints join the secret scan."""
    import pyarrow.parquet as pq

    from tests.test_secrets import scan

    sim, first, second, out = history
    done = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "compact", "--output", str(out)],
                          cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "AIMLAPI_API_KEY": TEST_KEY})
    assert done.returncode == 0, done.stderr
    (tmp_path / "compact.log").write_text(done.stdout + done.stderr)
    assert "pages" in done.stdout
    count, hits = scan([out, tmp_path / "compact.log"])
    assert count > 5 and hits == []
    for part in (out / "pages").rglob("*.parquet"):
        assert TEST_KEY not in json.dumps(pq.read_table(part).to_pylist(), default=str)


class Killed(BaseException):
    """Stands for kill -9 at one step of a compaction (nothing after it runs)."""


def kill_at(patch: pytest.MonkeyPatch, step: int) -> None:
    """Make the `step`-th table operation of the compaction (a delete, a partition's
    optimize, a vacuum) the last thing it does, cut half-way: the operation never commits."""
    count = {"n": 0}

    def counted(real):
        def one(*args, **kwargs):
            count["n"] += 1
            if count["n"] > step:
                raise Killed
            return real(*args, **kwargs)
        return one

    for name in ("delete_runs", "optimize_partition", "vacuum_table"):
        patch.setattr(compaction, name, counted(getattr(compaction, name)))


def test_a_compaction_cut_at_any_step_shows_every_row_once_and_is_completed(history, tmp_path):
    sim, first, second, out = history
    before = every_table(out)
    step, cut_short = 0, True
    while cut_short:
        copy = tmp_path / f"cut-{step}"
        shutil.copytree(out, copy)
        with pytest.MonkeyPatch.context() as patch:
            kill_at(patch, step)
            try:
                compact_output(copy, TABLES, store.pages_schema([]))
                cut_short = False
            except Killed:
                pass
        assert every_table(copy) == before, f"cut at step {step}"
        compact_output(copy, TABLES, store.pages_schema([]))  # the next one completes it
        assert every_table(copy) == before, f"cut at step {step}: after completion"
        assert all(n == 1 for t in ("pages", "attempts", "runs") for n in files(copy, t).values())
        step += 1
    assert step > 8  # per table: deletes, each partition's optimize, the vacuum


def test_compaction_beside_writers_keeps_every_row(tmp_path):
    """Two writers append (one adding a column now and then: a metadata change an optimize
    started before it may lose to, then tries again) while compaction runs again and again.
    Whether a race is lost depends on timing; a lost commit's retry is shown deterministically
    by tests/test_schema_evolution.py."""
    day = "2026-05-01"
    store.append_rows(tmp_path, "pages", pa.table({"run_id": ["seed"], "key": ["k"]}), day)

    def writer(name: str, evolve: bool) -> None:
        for i in range(40):
            cols = {"run_id": [name], "key": [f"{name}-{i}"]}
            if evolve and i % 5 == 0:
                cols[f"answer_f{i}"] = [str(i)]
            store.append_rows(tmp_path, "pages", pa.table(cols), day)

    threads = [threading.Thread(target=writer, args=(n, n == "b")) for n in ("a", "b")]
    for t in threads:
        t.start()
    compactions = 0
    while any(t.is_alive() for t in threads) or compactions < 3:
        compact_output(tmp_path, ["pages"], store.pages_schema([]))
        compactions += 1
    keys = store.read_table(tmp_path, "pages")["key"].to_pylist()
    assert sorted(keys) == sorted(["k", *(f"{n}-{i}" for n in "ab" for i in range(40))])


def test_a_reader_on_the_version_before_a_compaction_still_reads_its_files(history):
    sim, first, second, out = history
    before = rows(out, "pages")
    older = delta.dataset(out, "pages")  # a reader that listed the files, then was slow
    compact_output(out, TABLES, store.pages_schema([]))
    assert Counter(json.dumps(r, sort_keys=True, default=str)
                   for r in older.to_table().to_pylist()) == before  # vacuum kept them


def test_a_killed_runs_journal_is_folded_exactly_once_by_compaction(sim_factory, tmp_path):
    sim = sim_factory(latency_s=0.01)
    src = tmp_path / "in"
    units = chaos.make_corpus(src, images=10, pdf_pages=3, seed=11)
    cfg = job_config(sim.url, tmp_path / "out", [src],
                     **{"output.flush_rows": 4, "limits.concurrency": 4})
    dead = killed_run(cfg, BETWEEN_TABLES)
    summary = compact_output(dead.root, TABLES, dead.pages_schema)
    assert summary.recovered_runs == [dead.run_id]
    check_exactly_once(sim, dead.root, units)
    runs = store.read_table(dead.root, "runs").to_pandas()
    assert runs["outcome"].tolist() == ["interrupted"]
    assert not list(dead.root.journal_dir.glob("*.jsonl"))
    again = run_job(cfg, SecretStr(TEST_KEY))
    assert again.recovered_runs == [] and again.requests == 0
    check_exactly_once(sim, dead.root, units)
    assert len(store.read_table(dead.root, "runs")) == 2


def test_one_compaction_at_a_time_beside_runs_and_bad_options(tmp_path):
    from ernie_batch.cli import app

    out = tmp_path / "out"
    out.mkdir()
    run_lock = store.OutputLock(out, "20260101T000000Z-abcdef")
    run_lock.acquire()
    try:  # a run holds the folder: compaction runs beside it
        assert CliRunner().invoke(app, ["compact", "--output", str(out)]).exit_code == 0
    finally:
        run_lock.release()
    other = store.compact_lock(out)
    assert other.acquire()
    try:
        result = CliRunner().invoke(app, ["compact", "--output", str(out)])
        assert result.exit_code == 5
        assert "is being compacted by another process; use --wait" in result.output
    finally:
        other.release()
    assert CliRunner().invoke(app, ["compact", "--output", str(out), "--table", "x"]).exit_code == 2
    assert CliRunner().invoke(app, ["compact", "--output", str(out), "--before", "May"]).exit_code == 2
    result = CliRunner().invoke(app, ["compact", "--output", str(out), "--table", "billing",
                                      "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["tables"] == [
        {"table": "billing", "partitions": 0, "files_before": 0, "files_after": 0, "rows": 0,
         "rows_dropped": 0, "bytes_before": 0, "bytes_after": 0, "files_vacuumed": 0}]


def test_before_leaves_later_partitions_alone(tmp_path):
    from ernie_batch.bench.history import generate

    generate(tmp_path, 48, 10, "fp", store.pages_schema([]))  # two days of hourly runs
    compact_output(tmp_path, ["pages"], store.pages_schema([]), before=date(2025, 1, 2))
    assert files(tmp_path, "pages") == {"2025-01-01": 1, "2025-01-02": 24}


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
    config.write_text(f'[output]\npath = "{out}"\n[compact]\nvacuum_retention_hours = 48\n')
    before = rows(out, "pages")
    result = compact(config_path=str(config))
    assert {t["table"]: (t["files_before"], t["files_after"]) for t in result["tables"]
            if t["files_before"]} == {"pages": (6, 1), "attempts": (6, 1), "runs": (6, 1)}
    assert rows(out, "pages") == before


def test_a_vacuum_retention_below_the_floor_is_a_config_error():
    from ernie_batch.config import load_config
    from ernie_batch.errors import ConfigError

    assert load_config(None).compact.vacuum_retention_hours == 168
    with pytest.raises(ConfigError, match="vacuum_retention_hours"):
        load_config(None, {"compact.vacuum_retention_hours": 2})


# ---------------------------------------------------------------- kill -9, for real (slow)

KILLS = 6


@pytest.mark.slow
def test_kill_9_at_random_points_during_compaction(tmp_path):
    """`ernie-batch compact` killed at a random moment, KILLS times; after each kill our reader
    sees every row once, and the next compaction completes the cut one."""
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
        assert list(files(out, "pages").values()) == [1] * 10, f"seed {seed}, kill {k}"
        shutil.rmtree(out)
