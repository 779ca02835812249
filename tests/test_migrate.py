"""`ernie-batch migrate`: an output written by the release before Delta tables (5d8eda3),
converted in place, row for row; killed at any step and run again, nothing lost or doubled;
every other command refuses an unconverted output with one line naming `migrate`.

The fixture (`tests/fixtures/old-output`, made by `make_old_output.py.txt` with that
release) holds two prompt versions whose `total_amount` changed from number to string, a
compaction's file, shard runs of a coordinator (one rejected: fenced), billing and evals, a
compaction of `attempts` cut after its intent, and a killed run's journal with rows only it
holds. `old-output-expected` is what that release's reader saw: every live file's rows.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ernie_batch import store
from ernie_batch.cli import app
from ernie_batch.location import OutputRoot
from ernie_batch.run.recovery import recover_journals
from ernie_batch.store import delta
from ernie_batch.store.migrate import migrate_output
from tests.conftest import PROJECT

FIXTURE = PROJECT / "tests" / "fixtures" / "old-output"
EXPECTED = PROJECT / "tests" / "fixtures" / "old-output-expected"
FACTS = json.loads((EXPECTED / "facts.json").read_text())
TABLES = ("pages", "attempts", "runs", "documents", "billing", "evals")
_TYPED = re.compile(r"^(answer_.+)__(string|double|int64|bool|list_\w+)$")


def normal(row: dict) -> str:
    """A row as both releases' readers give it: nulls dropped (a Delta table has every
    column), an answer column written under the type rule's name back to its plain name."""
    out = {}
    for name, value in row.items():
        if value is not None:
            typed = _TYPED.match(name)
            out[typed.group(1) if typed else name] = value
    return json.dumps(out, sort_keys=True, default=str)


def expected(table: str) -> Counter:
    lines = (EXPECTED / f"{table}.jsonl").read_text().splitlines()
    return Counter(normal(json.loads(line)) for line in lines)


def converted(root: Path, table: str, **kw) -> Counter:
    found = store.read_table(root, table, include_rejected=True, **kw)
    return Counter(normal(r) for r in found.to_pylist()) if found is not None else Counter()


@pytest.fixture
def old(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "out"))


def check_converted(out: Path) -> None:
    """Every table row for row, the fence and the type rule held, no trace of the old layout."""
    for table in TABLES:
        assert converted(out, table) == expected(table), table
    rejected = set(FACTS["rejected_runs"])
    assert rejected
    for table in ("pages", "attempts", "documents", "runs"):
        counted = store.read_table(out, table)["run_id"].to_pylist()
        assert set(counted) == {json.loads(r)["run_id"] for r in expected(table)} - rejected
    pages = store.read_table(out, "pages").to_pylist()
    for row in pages:
        total = json.loads(row["answer_json"])["total_amount"] if row["answer_json"] else None
        if row["fingerprint"] == FACTS["v2_fingerprint"]:  # the later version: a string
            assert row["answer_total_amount"] is None
            assert row["answer_total_amount__string"] == total
        else:  # the first version (and the shards): a number, under the plain name
            assert row["answer_total_amount__string"] is None
            assert row["answer_total_amount"] == total
    assert isinstance(next(r["answer_total_amount__string"] for r in pages
                           if r["fingerprint"] == FACTS["v2_fingerprint"]), str)
    store.check_layout(out)
    assert not (out / "_compact").exists() and not (out / "_migrate").exists()
    for table in TABLES:  # every data file left is one the table's log lists
        listed = {Path(p).name for p in store.delta.open_table(out, table).file_uris()}
        assert {p.name for p in (out / table).glob("date=*/*.parquet")} == listed, table


def test_commands_refuse_an_unconverted_output_with_one_line_naming_migrate(old, tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(f'[output]\npath = "{old}"\n')
    for args in (["report", "-c", str(config)], ["compact", "--output", str(old)],
                 ["documents", "-c", str(config)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        [line] = [x for x in result.output.splitlines() if x.strip()]
        assert line.startswith("error:") and f"ernie-batch migrate {old}" in line
    with pytest.raises(store.UnconvertedOutputError, match="migrate"):
        store.read_table(old, "pages")


def test_migrate_converts_every_table_row_for_row_and_keeps_fenced_rows_fenced(old):
    result = CliRunner().invoke(app, ["migrate", str(old), "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.output)
    assert done["converted"] and done["compactions_finished"] == 1
    assert {t["table"]: t["rows"] for t in done["tables"]} == {
        t: sum(expected(t).values()) for t in TABLES}
    check_converted(old)
    again = CliRunner().invoke(app, ["migrate", str(old), "--json"])
    assert again.exit_code == 0 and not json.loads(again.output)["converted"]

    # the killed run's journal (no commit rounds): folded by content, each row once
    killed = FACTS["killed_run"]
    before = store.read_table(old, "pages", include_rejected=True)["run_id"].to_pylist()
    assert recover_journals(old, store.pages_schema([])) == [killed]
    pages = store.read_table(old, "pages").to_pandas()
    mine = pages[pages["run_id"] == killed]
    assert len(mine) == FACTS["journal_pages"] > before.count(killed) and mine["key"].is_unique
    attempts = store.read_table(old, "attempts").to_pandas()
    assert attempts["client_request_id"].is_unique
    runs = store.read_table(old, "runs").to_pandas().set_index("run_id")
    assert runs.loc[killed, "outcome"] == "interrupted"
    assert (store.read_table(old, "documents").to_pandas()["run_id"] == killed).sum() == 4  # 3 + a PDF


class Killed(BaseException):
    """Stands for kill -9 at one step of a migration."""


def cut_at(patch: pytest.MonkeyPatch, step: int, seen: list[str] | None = None) -> None:
    """Make the `step`-th file operation of the migration its last: a rename, a delete, or
    a commit (cut before it, inside it, its data file written and its log entry not, or
    right after it, before anything else). `seen` collects the kinds of the operations
    that ran."""
    count = {"n": 0}

    def tick(kind: str, on_kill=lambda: None) -> None:
        count["n"] += 1
        if count["n"] > step:
            on_kill()
            raise Killed
        if seen is not None:
            seen.append(kind)

    def counted(real, kind: str):
        def one(*args, **kwargs):
            tick(kind)
            return real(*args, **kwargs)
        return one

    append = delta.append

    def half_written(root: Path, table: str, rows: pa.Table) -> None:
        """What delta-rs leaves when killed between a data file and the log entry."""
        day = rows.column(delta.PARTITION)[0].as_py()
        folder = OutputRoot.of(root).local_path() / table / f"{delta.PARTITION}={day}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows.drop_columns([delta.PARTITION]),
                       folder / f"part-00000-{uuid.uuid4()}-c000.zstd.parquet")

    def committing(root, table, rows, **kwargs):
        tick("before a commit")
        tick("inside a commit", lambda: half_written(root, table, rows))
        done = append(root, table, rows, **kwargs)
        tick("after a commit")
        return done

    patch.setattr(os, "replace", counted(os.replace, "rename"))
    patch.setattr(os, "unlink", counted(os.unlink, "delete"))
    patch.setattr(delta, "append", committing)


def test_migrate_killed_at_any_step_and_run_again_loses_and_doubles_nothing(tmp_path):
    kinds: list[str] = []
    with pytest.MonkeyPatch.context() as patch:  # every step, uncut: which kind each one is
        cut_at(patch, 10**6, kinds)
        migrate_output(Path(shutil.copytree(FIXTURE, tmp_path / "whole")))
    # every rename and every commit; of the deletes (one per part), every third
    steps = [i for i, kind in enumerate(kinds) if kind != "delete" or i % 3 == 0]
    assert Counter(kinds[i] for i in steps) == {
        "rename": 1 + 6, "before a commit": 6, "inside a commit": 6, "after a commit": 6,
        "delete": len([i for i, k in enumerate(kinds) if k == "delete" and i % 3 == 0])}
    for step in [*steps, len(kinds)]:  # the last: not cut at all
        out = Path(shutil.copytree(FIXTURE, tmp_path / f"cut-{step}"))
        with pytest.MonkeyPatch.context() as patch:
            cut_at(patch, step)
            try:
                migrate_output(out)
                assert step == len(kinds)
            except Killed:
                with pytest.raises(store.UnconvertedOutputError):
                    store.check_layout(out)  # half converted: still refused
        migrate_output(out)
        check_converted(out)
        shutil.rmtree(out)


@pytest.mark.slow
def test_migrate_killed_with_sigkill_at_random_moments(tmp_path):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    draw = random.Random(seed)
    cmd = [sys.executable, "-m", "ernie_batch.cli", "migrate"]
    timing = Path(shutil.copytree(FIXTURE, tmp_path / "timing"))
    started = time.monotonic()
    subprocess.run([*cmd, str(timing)], check=True, cwd=PROJECT, capture_output=True)
    whole = time.monotonic() - started
    for k in range(8):
        out = Path(shutil.copytree(FIXTURE, tmp_path / f"kill-{k}"))
        proc = subprocess.Popen([*cmd, str(out)], cwd=PROJECT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(draw.uniform(0.2, whole))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run([*cmd, str(out)], check=True, cwd=PROJECT, capture_output=True)
        check_converted(out)
        shutil.rmtree(out)
