"""Ctrl-C and SIGTERM as a user meets them: `ernie-batch run` in its own process group against
the simulator on loopback, signalled mid-run, through the background Prefect server it
starts (which outlives it, by design) or, in the slow tier, a server of its own.

The bounds below are guards (a run that hangs fails), not benchmarks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ernie_batch.sim import FaultRates
from tests.conftest import PROJECT
from tests.test_chaos import cli_env, make_corpus, prefect_home, table, write_config

CONCURRENCY = 4
COUNTS = ("units_ok", "units_failed", "units_skipped", "units_duplicate", "units_already_done",
          "units_not_sent")


OWN_SERVER = "[server]\nbackground = false\n"  # each command its own Prefect server


def home_of(extra: str, tmp_path: Path) -> Path:
    """The session's shared home (its background server started once for every test), or a
    home of the test's own for a command with its own server."""
    return tmp_path / "home" if extra == OWN_SERVER else prefect_home()


def start(tmp_path: Path, sim, *args: str, extra: str = "") -> tuple[subprocess.Popen, Path]:
    units = make_corpus(tmp_path / "in", images=24, pdf_pages=2, seed=5)
    assert units == 26
    config = write_config(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", sim.url,
                          concurrency=CONCURRENCY, extra=extra)
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ernie_batch.cli", "run", "--config", str(config), "--json",
             *args],
            cwd=PROJECT, env=cli_env(home_of(extra, tmp_path)), stdout=subprocess.PIPE, stderr=err,
            start_new_session=True, text=True)
    return proc, log


def wait_for_answers(sim, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(sim.simulator.ledger) < n:
        assert proc.poll() is None, "the run ended before it was signalled"
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.02)


def family(proc: subprocess.Popen, home: Path) -> list[psutil.Process]:
    """The run and everything it started (its own Prefect server included, in its own
    session), but the home's background server: that one outlives it on purpose."""
    from ernie_batch.server.home import ServerHome, ServerState

    root = psutil.Process(proc.pid)
    state = ServerState.read(ServerHome(home))
    keep = state.pid if state is not None and state.kind == "background" else None
    return [p for p in [root, *root.children(recursive=True)] if p.pid != keep]


def background_server_answers(home: Path) -> bool:
    from ernie_batch.server.home import ServerHome, ServerState, alive, healthy

    state = ServerState.read(ServerHome(home))
    return state is not None and alive(state.pid) and healthy(state.url, 5.0)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, dict, str]:
    stdout, _ = proc.communicate(timeout=timeout)
    lines = [line for line in stdout.splitlines() if line.strip()]
    return proc.returncode, json.loads(lines[-1]), log.read_text()


def assert_adds_up(summary: dict, out: Path) -> None:
    """Every one of the 26 units selected is in exactly one count, in `--json` and `runs`."""
    counts = {c: summary[c] for c in COUNTS}
    assert summary["units_selected"] == sum(counts.values()) == 26, counts
    assert summary["units_not_sent"] == 26 - summary["units_ok"], counts
    (row,) = table(out, "runs").to_dict("records")
    assert {c: row[c] for c in COUNTS} == counts and row["units_selected"] == 26


def assert_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


@pytest.mark.parametrize("sig, code, server", [
    (signal.SIGINT, 130, "background"), (signal.SIGTERM, 143, "background"),
    pytest.param(signal.SIGINT, 130, "own", marks=pytest.mark.slow),
])
def test_a_signal_stops_dispatching_keeps_what_arrived_and_exits_cleanly(
        sim_factory, tmp_path, sig, code, server):
    sim = sim_factory(latency_s=0.5)
    extra = OWN_SERVER if server == "own" else ""
    proc, log = start(tmp_path, sim, extra=extra)
    wait_for_answers(sim, 6, proc)
    everyone = family(proc, home_of(extra, tmp_path))
    asked_before = sim.simulator.stats.get("requests", 0)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # as a terminal sends it: to the whole foreground group
    else:
        proc.send_signal(sig)  # as a supervisor sends it: to the run
    rc, summary, stderr = finish(proc, log, timeout=120)
    assert rc == code, stderr
    assert summary["outcome"] == "interrupted" and summary["exit_code"] == code
    assert "Traceback" not in stderr and "Error logging to API" not in stderr
    # dispatch stopped at once: at most the requests already on their way arrived later
    assert sim.simulator.stats.get("requests", 0) - asked_before <= CONCURRENCY
    assert_gone(everyone)
    # the background server lives on for the next command; a command's own is gone with it
    assert background_server_answers(home_of(extra, tmp_path)) == (server == "background")
    # what arrived is written: every billed answer is a page row, nothing else was sent
    pages = table(tmp_path / "out", "pages")
    billed = {e["response_id"] for e in sim.ledger()["entries"]}
    assert set(pages["response_id"]) == billed and (pages["status"] == "ok").all()
    assert summary["units_ok"] == len(pages) < 26
    assert_adds_up(summary, tmp_path / "out")
    runs = table(tmp_path / "out", "runs")
    assert runs["outcome"].tolist() == ["interrupted"]


def test_a_second_ctrl_c_ends_the_grace_and_abandons_requests_in_flight(sim_factory, tmp_path):
    sim = sim_factory(latency_s=0.2, faults=FaultRates(slow=0.3), slow_s=120, seed=3)
    proc, log = start(tmp_path, sim, "--grace", "90")
    wait_for_answers(sim, 4, proc)
    while sim.simulator.in_flight < 1:  # a slow answer is on its way
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # still within its grace, waiting for the slow answers
    os.killpg(proc.pid, signal.SIGINT)
    rc, summary, stderr = finish(proc, log, timeout=60)  # far less than the slow answers' 120 s
    assert rc == 130 and summary["outcome"] == "interrupted", stderr
    assert "Traceback" not in stderr
    assert summary["units_not_sent"] >= 1  # the abandoned ones: sent again by the next run
    pages = table(tmp_path / "out", "pages")
    assert len(pages) == summary["units_ok"] and (pages["status"] == "ok").all()
    assert_adds_up(summary, tmp_path / "out")
