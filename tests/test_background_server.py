"""The home's Prefect server (`ernie_batch.server`): started in the background by the first
command, found by the next, replaced when stale, stopped when idle or by `server stop`.

Real server processes (Prefect's API, UI and services) in one PREFECT_HOME for the module,
so its database is made once; real `ernie-batch run` subprocesses against the simulator.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ernie_batch.server.home import ServerHome, ServerState, alive, is_our_daemon
from ernie_batch.server.local import ServerInUse, ServerLease, stop
from tests.conftest import PROJECT, SAMPLES, TEST_KEY, stop_home_servers

PAGE = "receipt-cafe-aurora.png"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server-home")
    yield ServerHome(root)
    stop_home_servers(root)


def env_for(home: ServerHome) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "AIMLAPI_API_KEY"}
    env.update({"PREFECT_HOME": str(home.root), "AIMLAPI_API_KEY": TEST_KEY,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PYTHONPATH": str(PROJECT)})
    return env


def cli(home: ServerHome, *args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args], cwd=cwd,
                          env=env_for(home), capture_output=True, text=True, timeout=600)


def job(tmp_path: Path, sim_url: str, inbox: Path, **server: object) -> Path:
    q = json.dumps
    text = (f"[api]\nbase_url = {q(sim_url)}\n[sources]\npaths = [{q(str(inbox))}]\n"
            f"[output]\npath = {q(str(tmp_path / 'out'))}\n[prepare]\nworkers = 1\n")
    if server:
        text += "[server]\n" + "".join(f"{k} = {q(v)}\n" for k, v in server.items())
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def api(state: ServerState, path: str, body: dict | None = None) -> list | dict:
    response = httpx.post(f"{state.api_url}{path}", json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


def lease(home: ServerHome, idle_s: float = 600.0) -> ServerLease:
    held = ServerLease(home, kind="background", idle_s=idle_s)
    held.begin()
    held.ready()
    return held


@pytest.mark.slow  # tens of seconds: the default tier stays under 10 minutes
def test_a_run_leaves_a_background_server_the_next_run_uses(home, sim_factory, tmp_path):
    sim = sim_factory()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLES / PAGE, inbox / PAGE)
    config = job(tmp_path, sim.url, inbox)

    first = cli(home, "run", "-c", str(config), "--json")
    assert first.returncode == 0, first.stderr
    assert "starting a background Prefect server" in first.stderr
    assert "started a background Prefect server at http://127.0.0.1:" in first.stderr  # it stays
    state = ServerState.read(home)
    assert state is not None and state.kind == "background" and alive(state.pid)

    second = cli(home, "run", "-c", str(config), "--json", "--force")
    assert second.returncode == 0, second.stderr
    assert "starting" not in second.stderr  # found, not started
    assert ServerState.read(home) == state and alive(state.pid)  # the command ended, it did not

    # each run is a flow run in the server's UI, with its task runs and its artifacts
    runs = [json.loads(r.stdout.splitlines()[-1])["run_id"] for r in (first, second)]
    flow_runs = api(state, "/flow_runs/filter", {"sort": "START_TIME_ASC"})
    assert [f["state_type"] for f in flow_runs] == ["COMPLETED", "COMPLETED"]
    assert all(any(t.startswith("ernie-batch-client:") for t in f["tags"]) for f in flow_runs)
    for flow_run in flow_runs:
        tasks = api(state, "/task_runs/filter",
                    {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        assert {t["name"].rsplit("-", 1)[0] for t in tasks} >= {"discover", "process-batch"}
    artifacts = api(state, "/artifacts/filter", {"artifacts": {"key": {"any_": [
        "ernie-batch-run-table"]}}})
    assert {a["description"] for a in artifacts} == {f"run {r}" for r in runs}


def test_runs_through_it_share_the_keys_limit_and_one_alone_starts_at_once(home, monkeypatch):
    """Runs through the home's server are members of the key's limit, as on a configured server
    (`scale.limit_share`); a run alone, or right after another left, sends at once."""
    import asyncio

    from pydantic import SecretStr

    from ernie_batch.config import ServerOptions, load_config
    from ernie_batch.prefect_server import home_server_api, shared_server
    from ernie_batch.scale.limit_share import LimitShare, run_membership
    from tests.test_limit_share import Paced

    monkeypatch.setenv("PREFECT_HOME", str(home.root))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    cfg = load_config(None, {"limits.rpm": 60, "limits.window_s": 60})
    key = SecretStr(TEST_KEY)

    async def two_in_turn() -> list[tuple[float, Paced]]:
        told = []
        for n in range(2):  # the first sends 3 requests in its window, then leaves
            paced = Paced(rate=0.05 if n == 0 else 0.0, window_s=60.0)
            async with run_membership(cfg, key, f"run-{n}", paced):
                told.append((paced.share(), paced))
        return told

    with home_server_api(ServerOptions()):
        assert shared_server()
        assert isinstance(run_membership(cfg, key, "r", Paced()), LimitShare)
        (first, _), (second, paced) = asyncio.run(two_in_turn())
    assert first == second == 1.0  # each sends at once: neither waits a window
    _, leavers_tail, _ = paced.others[-1]
    assert sum(n for _, n in leavers_tail) == 3  # the first one's sends count until they leave



def test_server_stop_refuses_while_a_command_uses_it_unless_forced(home):
    held = lease(home)
    pid = held.state.pid
    try:
        refused = cli(home, "server", "stop")
        assert refused.returncode == 5 and "in use by a running command" in refused.stderr
        with pytest.raises(ServerInUse):
            stop(home)
        assert alive(pid)
        forced = cli(home, "server", "stop", "--force")
        assert forced.returncode == 0 and f"pid {pid}" in forced.stdout
        assert not alive(pid) and ServerState.read(home) is None
    finally:
        held.end()
    assert "no background Prefect server" in cli(home, "server", "stop").stdout



def test_a_crashed_server_is_replaced(home):
    first = lease(home)
    state = first.state
    assert state is not None and is_our_daemon(state.pid, home)
    first.end()
    os.kill(state.pid, signal.SIGKILL)  # crashed: its state file stays behind
    wait_gone(state.pid)

    second = lease(home)
    assert second.started and second.state is not None and second.state.pid != state.pid
    second.end()


@pytest.mark.slow
def test_a_deaf_server_of_ours_is_stopped_and_replaced(home):
    first = lease(home)
    first.end()
    deaf = first.state.pid
    os.kill(deaf, signal.SIGSTOP)  # alive, holding its lock, answering nothing
    try:
        second = lease(home)
    finally:
        if alive(deaf):
            os.kill(deaf, signal.SIGCONT)
    assert second.started and second.state is not None and second.state.pid != deaf
    wait_gone(deaf)  # stopped by the command that replaced it
    second.end()
    stop(home)


@pytest.mark.slow
def test_a_state_file_naming_someone_elses_process_never_gets_it_killed(home):
    stop(home, force=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert not is_our_daemon(sleeper.pid, home)
        ServerState(pid=sleeper.pid, url="http://127.0.0.1:9", kind="background", owner_pid=None,
                    started_at=time.time(), idle_shutdown_s=600).write(home)
        held = lease(home)
        assert held.started and held.state is not None and held.state.pid != sleeper.pid
        assert sleeper.poll() is None  # deaf or not, it was not ours to stop
        held.end()
        stop(home)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow  # tens of seconds: the default tier stays under 10 minutes
def test_two_commands_at_once_start_one_server_that_stops_once_idle_and_unused(home):
    stop(home, force=True)  # none running: the two must start one
    leases = [ServerLease(home, kind="background", idle_s=2.0) for _ in range(2)]
    threads = [threading.Thread(target=lambda held=held: (held.begin(), held.ready()))
               for held in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(held.started for held in leases) == 1
    (pid,) = {held.state.pid for held in leases if held.state is not None}

    leases[0].end()
    time.sleep(6.0)  # three idle times: still used by the other command
    assert alive(pid) and ServerState.read(home) is not None
    leases[1].end()
    wait_gone(pid, timeout_s=60)
    assert ServerState.read(home) is None


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    from ernie_batch.server.home import wait_gone as gone

    assert gone(pid, timeout_s), f"process {pid} still runs"
