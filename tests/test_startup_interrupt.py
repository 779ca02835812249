"""Ctrl-C while Prefect is still starting: the command ends at once with 130 and one line,
no Python warning about a flow coroutine that was never awaited, nothing sent. A real
`ernie-batch run` in its own process group, signalled as a terminal does, once its local
Prefect server process exists (the home's background server it starts: in a session of
its own, so the signal does not reach it, and it stays for the next command) and before the
run has begun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests import test_chaos as chaos
from tests.conftest import PROJECT


def test_ctrl_c_while_prefect_starts_leaves_no_warning(sim_factory, tmp_path):
    sim = sim_factory()
    chaos.make_corpus(tmp_path / "in", images=2, pdf_pages=1, seed=97)
    config = chaos.write_config(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out",
                                sim.url, concurrency=2)
    env = chaos.cli_env(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-m", "ernie_batch.cli", "run", "-c", str(config)],
                            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any("ernie_batch.server.daemon" in c.cmdline()
                      for c in psutil.Process(proc.pid).children(recursive=True)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no Prefect server was started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the foreground group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGINT before the run started: nothing was sent" in stderr
    assert "never awaited" not in stderr and "RuntimeWarning" not in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert sim.simulator.stats.get("requests", 0) == 0
