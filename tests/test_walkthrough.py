"""The README's "your own folder against the simulator" walkthrough, run as written.

The block is read from the README itself, so the text and the test cannot drift apart. Its
`ernie-batch sim` line runs in the background (the "one terminal"); every other line runs,
in order, in one bash (the "another terminal"), from a folder laid out as the clone is
(`configs/` beside it), with a home whose `~/scans` holds a few files. One thing is changed:
the port, a free one instead of 8765, as the machine is shared.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ernie_batch import store
from tests import test_chaos as chaos
from tests.conftest import PROJECT, SAMPLES

SECTION = "## Your own folder against the simulator"


def walkthrough() -> tuple[str, list[str]]:
    """The block's simulator line and its other lines (continuations joined)."""
    section = (PROJECT / "README.md").read_text().split(SECTION, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    lines = [line for line in block.splitlines() if line.strip()]
    (sim,) = [line for line in lines if line.startswith("ernie-batch sim ")]
    return sim, [line for line in lines if line != sim]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a Prefect server, a run, a review: a minute and more on 2 busy cores
def test_the_readme_walkthrough_runs_line_by_line(tmp_path):
    sim_line, lines = walkthrough()
    port = str(free_port())
    clone, home = tmp_path / "clone", tmp_path / "home"
    shutil.copytree(PROJECT / "configs", clone / "configs")
    scans = home / "scans"
    chaos.make_corpus(scans, images=2, pdf_pages=1, seed=99)
    shutil.copy(SAMPLES / "receipt-cafe-aurora.png", scans)
    env = {k: v for k, v in chaos.cli_env(tmp_path / "prefect").items()
           if k != "AIMLAPI_API_KEY"}  # the walkthrough exports its own
    bin_dir = str(Path(sys.executable).parent)  # where `ernie-batch` is installed
    env.update({"HOME": str(home), "PATH": bin_dir + os.pathsep + env.get("PATH", "")})
    sim = subprocess.Popen(shlex.split(sim_line.replace("8765", port)), cwd=clone, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", int(port))) != 0:
            assert sim.poll() is None and time.monotonic() < deadline, "the simulator did not start"
            time.sleep(0.1)
        script = "\n".join(["set -euo pipefail", *(line.replace("8765", port) for line in lines)])
        res = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True,
                             text=True, timeout=600)
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    pages = store.read_table(clone / "data" / "try-output", "pages").to_pandas()
    assert len(pages) == 4 and (pages["status"] == "ok").all()
    assert sorted({Path(p).name for p in pages["source_path"]}) == sorted(
        p.name for p in scans.iterdir())
    assert "receipt-cafe-aurora.png" in res.stdout  # report's files table
    assert (clone / "try" / "review.html").stat().st_size > 0
    assert not (clone / "data" / "output").exists()  # never the real job's output
