"""Tables that survive a pipe: `report | cat`, cron mail, CI logs. With stdout not a terminal
(a real pipe: the commands run as subprocesses), every table prints whole as plain aligned
text, nothing cut to 80 columns, and an absent value is a dash, never `None`."""

from __future__ import annotations

import subprocess
import sys

from pydantic import SecretStr

from ernie_batch.config import load_config
from ernie_batch.run.engine import run_job
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY


def test_report_reconcile_and_documents_print_whole_lines_into_a_pipe(sim_factory, tmp_path):
    sim = sim_factory()
    deep = tmp_path / "an inbox with a rather long name" / "2026-12-07" / "scans from the office"
    chaos.make_corpus(deep, images=2, pdf_pages=1, seed=95)
    out = tmp_path / "output folder of the nightly job"
    config = chaos.write_config(tmp_path / "job.toml", deep, out, sim.url, concurrency=2)
    summary = run_job(load_config(config), SecretStr(TEST_KEY))
    env = {**chaos.cli_env(tmp_path / "home"), "COLUMNS": "80"}  # what cron would say
    for command in ("report", "reconcile", "documents"):
        res = subprocess.run([sys.executable, "-m", "ernie_batch.cli", command, "-c",
                              str(config)], cwd=PROJECT, env=env,
                             capture_output=True, text=True, timeout=120)  # stdout: a pipe
        assert res.returncode == 0, res.stderr
        text = res.stdout
        assert "None" not in text and "…" not in text, text
        assert summary.run_id in text
        lines = text.splitlines()
        assert not any("│" in line or "┃" in line for line in lines)  # plain text, no boxes
        if command != "documents":  # whole lines, wider than the pipe's 80 columns
            assert max(len(line) for line in lines) > 80
        if command == "report":
            for path in sorted(deep.iterdir()):  # the files table names each file in full
                assert any(str(path) in line for line in lines), (path, text)
        if command == "reconcile":
            assert any(str(out / "billing") in line for line in lines), text
