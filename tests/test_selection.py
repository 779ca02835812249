"""The default run selection of `report`, `review`, `documents` and `reconcile`: the newest run
that did something, as an afternoon of ordinary use leaves it (a run, an eval, scheduled
runs that found nothing new, a run over an empty folder).

Runs go through the engine in process against the simulator on loopback; the commands run
as subprocesses with stdout a pipe (their one-line choice on stderr, `--json` last on stdout).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from ernie_batch.config import load_config
from ernie_batch.run import selection
from ernie_batch.run.engine import RunOptions, run_job
from ernie_batch.run.selection import RunSelection
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY


@pytest.fixture
def afternoon(sim_factory, tmp_path):
    """A run with pages, then an eval, an ingest over an empty folder and two scheduled
    ingests that found nothing new: (config path, the run, the eval)."""
    sim = sim_factory()
    src, empty, out = tmp_path / "in", tmp_path / "empty", tmp_path / "out"
    chaos.make_corpus(src, images=3, pdf_pages=1, seed=61)
    empty.mkdir()
    config = chaos.write_config(tmp_path / "job.toml", src, out, sim.url, concurrency=4)
    cfg, key = load_config(config), SecretStr(TEST_KEY)
    first = run_job(cfg, key, RunOptions(kind="run"))
    assert first.units_ok == 4
    other = load_config(config, {"prompt.template": "Read $file_name.",
                                 "prompt.template_file": None})
    evaluated = run_job(other, key, RunOptions(kind="eval"))  # eval's units are page rows too
    assert evaluated.units_ok == 4
    run_job(cfg, key, RunOptions(kind="ingest"), sources=[empty])
    for _ in range(2):
        nothing = run_job(cfg, key, RunOptions(kind="ingest"))
        assert nothing.units_already_done == 4 and nothing.units_ok == 0
    return config, first, evaluated


def command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args, "-c", str(config)],
                          cwd=PROJECT, env=chaos.cli_env(chaos.prefect_home()),
                          capture_output=True, text=True, timeout=120)


def test_the_default_is_the_newest_run_with_pages_never_eval_nor_empty_runs(afternoon,
                                                                           monkeypatch):
    config, first, _ = afternoon
    root = load_config(config).output.path
    read: list[tuple[str, int]] = []
    real = selection.read_columns

    def counting(root, table, columns, where=None, **kw):
        found = real(root, table, columns, where, **kw)
        read.append((table, 0 if found is None else found.num_rows))
        return found

    monkeypatch.setattr(selection, "read_columns", counting)
    chosen = RunSelection().choose(root)
    assert chosen.run_ids == [first.run_id]
    assert chosen.why == (f"newest run with pages: {first.run_id} (run, 4 units); "
                          "3 later runs selected nothing; 1 later eval run left out")
    # found from the runs table's counters: not one page row of history read
    assert sum(n for table, n in read if table == "pages") == 0


@pytest.mark.parametrize("args", [("report", "--json"), ("documents", "--json"),
                                  ("review", "--html")])
def test_every_command_reads_the_newest_run_with_pages_and_says_why(afternoon, args):
    config, first, _ = afternoon
    if args[0] == "review":
        args = (*args, str(config.parent / "review.html"))
    res = command(config, *args)
    assert res.returncode == 0, res.stderr
    why = [line for line in res.stderr.splitlines() if line.startswith("newest run with pages")]
    assert why == [f"newest run with pages: {first.run_id} (run, 4 units); "
                   "3 later runs selected nothing; 1 later eval run left out"], res.stderr
    if args[0] == "report":
        report = json.loads(res.stdout.strip().splitlines()[-1])
        assert [r["run_id"] for r in report["runs"]] == [first.run_id]
    elif args[0] == "documents":
        counts = json.loads(res.stdout.strip().splitlines()[-1])
        assert counts["runs"] == [first.run_id] and counts["documents"] == 4
    else:
        assert "4 pages of the newest run with pages" in res.stdout
        assert first.run_id in (config.parent / "review.html").read_text()


def test_a_run_without_its_manifest_yet_is_newer_than_the_ones_with_one(afternoon):
    from tests.test_reconcile import killed_with_requests_in_flight

    config, first, _ = afternoon
    src = config.parent / "more"
    chaos.make_corpus(src, images=4, pdf_pages=1, seed=62)
    cfg = load_config(config, {"sources.paths": [str(src)], "output.flush_rows": 1,
                               "limits.concurrency": 1})  # two answered, the third in flight
    dead = killed_with_requests_in_flight(cfg, after_sent=3)
    chosen = RunSelection().choose(Path(cfg.output.path))
    assert chosen.run_ids == [dead.run_id]
    assert chosen.why.startswith(f"newest run with pages: {dead.run_id} (no manifest yet")
    window = RunSelection(since="2000-01-01").resolve(Path(cfg.output.path))
    assert window[0] == first.run_id and window[-1] == dead.run_id and len(window) == 6


def test_nothing_with_pages_says_so(sim_factory, tmp_path):
    sim = sim_factory()
    (tmp_path / "empty").mkdir()
    config = chaos.write_config(tmp_path / "job.toml", tmp_path / "empty", tmp_path / "out",
                                sim.url, concurrency=2)
    run_job(load_config(config), SecretStr(TEST_KEY))
    chosen = RunSelection().choose(tmp_path / "out")
    assert chosen.run_ids == [] and chosen.why in ("no run with pages",
                                                   "no run with pages (1 run selected nothing)")
