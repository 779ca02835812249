"""What a command does before Prefect: nothing to do ends there; reading commands never need it.

Each command runs in a fresh interpreter (as a user starts it) that reports, when it is done,
whether Prefect was imported at all: without Prefect there can be no Prefect server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT, SAMPLES, TEST_KEY, job_config, run_mounted

# runs the CLI in-process, then prints one JSON line: the exit code, and whether prefect loaded
_WRAPPER = """
import json, sys
from ernie_batch.cli import app
code = 0
try:
    app(sys.argv[1:], prog_name="ernie-batch")
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"code": code, "prefect": "prefect" in sys.modules}))
"""


def command(tmp_path: Path, *args: str, key: str = TEST_KEY) -> tuple[dict, str, str]:
    """(the wrapper's verdict, stdout before it, stderr) of `ernie-batch ARGS`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "AIMLAPI_API_KEY": key,
                "PYTHONPATH": str(PROJECT)})
    res = subprocess.run([sys.executable, "-c", _WRAPPER, *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    *out, verdict = res.stdout.strip().splitlines()
    return json.loads(verdict), "\n".join(out), res.stderr


def config(tmp_path: Path, sim_url: str, inbox: Path) -> Path:
    q = json.dumps
    path = tmp_path / "job.toml"
    path.write_text(f"[api]\nbase_url = {q(sim_url)}\n[sources]\npaths = [{q(str(inbox))}]\n"
                    f"[output]\npath = {q(str(tmp_path / 'out'))}\n")
    return path


def test_a_run_that_finds_no_document_says_so_and_ends_before_prefect(sim_factory, tmp_path):
    sim = sim_factory()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "scan.png.part").write_bytes(b"still downloading")  # passed over: partial
    cfg = config(tmp_path, sim.url, inbox)

    verdict, out, err = command(tmp_path, "run", "-c", str(cfg), "--json")
    assert verdict == {"code": 0, "prefect": False}, err
    assert f"nothing to do: no documents under {inbox} (1 file passed over: partial 1)" in err
    summary = json.loads(out.splitlines()[-1])  # --json: still one object, the last line
    assert summary["outcome"] == "nothing_to_do" and summary["exit_code"] == 0
    assert summary["files_passed_over"] == {"partial": 1} and summary["units_ok"] == 0
    assert not (tmp_path / "out" / "runs").exists()  # no run recorded: none is "the newest"
    assert not (tmp_path / "prefect-home").exists()  # no server started, none to start

    quiet, out, err = command(tmp_path, "backfill", str(inbox), "-c", str(cfg), "--quiet")
    assert quiet == {"code": 0, "prefect": False} and out == "" and err == ""
    # the key is still checked first: a rejected key is exit 3, documents or none
    rejected, _, err = command(tmp_path, "run", "-c", str(cfg), key="sk-wrong-key-000000")
    assert rejected == {"code": 3, "prefect": False} and "key" in err


def test_reading_commands_never_import_prefect(sim_factory, tmp_path):
    sim = sim_factory(logs_lag_s=0.0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLES / "receipt-cafe-aurora.png", inbox)
    cfg = config(tmp_path, sim.url, inbox)
    summary = run_mounted(job_config(sim.url, tmp_path / "out", [inbox]), sim.simulator.app)
    assert summary.units_ok == 1
    time.sleep(0.1)
    for args in (["report"], ["documents"], ["plan"], ["reconcile", "--since", "2000-01-01"],
                 ["review", "--html", str(tmp_path / "review.html")]):
        verdict, _, err = command(tmp_path, *args, "-c", str(cfg))
        assert verdict["prefect"] is False, (args, err)
        assert verdict["code"] in (0, 1), (args, err)  # reconcile: 1 while a charge is pending


_PROBING = """
import json, sys
import typer
from ernie_batch.cli.common import Probing
from ernie_batch.config import load_config
probing = Probing(load_config(None, {"api.base_url": sys.argv[1]}))
before = set(sys.modules)
probing.wait()
imported = sorted(set(sys.modules) - before)
try:
    probing.result()
    code = 0
except typer.Exit as exc:
    code = exc.exit_code
print(json.dumps({"code": code, "imported": imported}))
"""


@pytest.mark.parametrize("key, code", [(TEST_KEY, 0), ("sk-wrong-key-000000", 3)])
def test_the_balance_call_beside_the_import_of_prefect_imports_nothing(sim_factory, key, code):
    """`Probing` makes the balance call in a thread while the caller imports Prefect; a thread
    importing beside another can meet it in an import cycle, so it must import nothing."""
    sim = sim_factory()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"AIMLAPI_API_KEY": key, "PYTHONPATH": str(PROJECT)})
    res = subprocess.run([sys.executable, "-c", _PROBING, sim.url], env=env, capture_output=True,
                         text=True, timeout=120)
    verdict = json.loads(res.stdout.strip().splitlines()[-1])
    assert verdict == {"code": code, "imported": []}, res.stderr


@pytest.fixture(autouse=True)
def _no_prefect_settings_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


def test_the_run_prepares_on_the_workers_started_before_prefect(tmp_path):
    """The CLI starts preparation workers (no more than its documents) before it imports
    Prefect; the run's pool takes them instead of starting its own, and prepares with them."""
    import asyncio

    import psutil

    from ernie_batch.config import ImageOptions, PdfOptions, PrepareOptions, SourceOptions
    from ernie_batch.intake import prepare
    from ernie_batch.intake.discover import discover

    shutil.copy(SAMPLES / "receipt-cafe-aurora.png", tmp_path)
    docs, _ = discover(SourceOptions(paths=[tmp_path]))
    opts = PrepareOptions(workers=2, max_tasks_per_worker=7)  # a key of this test's own
    prepare.start_workers_early(opts, len(docs))
    early = prepare._EARLY[7]
    pool = prepare.PreparePool(ImageOptions(), PdfOptions(), opts)

    async def run() -> tuple[list, object, int]:
        out = [item async for item in pool.stream(docs)]
        taken = pool._pool
        servers = [p for p in psutil.Process().children()
                   if "forkserver" in " ".join(p.cmdline())]
        workers = [w for server in servers for w in server.children()]
        await pool.aclose()
        return out, taken, len(workers)

    out, taken, workers = asyncio.run(run())
    assert taken is early and 7 not in prepare._EARLY  # taken, not a second pool
    assert workers == 1  # one document: one worker, though two were configured
    [(doc, units)] = out
    assert doc == docs[0] and len(units) == 1 and units[0].page == 1
