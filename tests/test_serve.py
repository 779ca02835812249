"""`ernie-batch serve`: the deployment it builds, and a real scheduled run end to end.

The end-to-end test runs the CLI as a subprocess with its own PREFECT_HOME and no
PREFECT_API_URL: with no server running it starts its own (and after SIGINT nothing it
started is left running); with the home's background server running (the slow tier) it uses
that one and leaves it running. An interval schedule fires, Parquet appears.

A server of a command's own no longer is the only kind: the home's background server
outlives the command that started it on purpose (`ernie_batch.server`); the test that a
`start_local_server` server dies with its command stays, for `server start` and the
command's own server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from ernie_batch.errors import ServerStartError
from tests.conftest import PROJECT, SAMPLES, TEST_KEY

FILES = {"receipt-cafe-aurora.png": 1, "invoice-2026-0117.pdf": 3}  # file -> pages
SERVER_LINE = re.compile(r"Prefect server at http://127\.0\.0\.1:(\d+)")
FINISHED = re.compile(r"ingest run (\S+): units_ok (\d+), units_failed 0, credits [\d,.]+, "
                      r"outcome completed")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_config(path: Path, **sections: dict[str, object]) -> Path:
    """configs/demo.toml with `sections` merged in, its prompt files made absolute."""
    data = tomllib.loads((PROJECT / "configs" / "demo.toml").read_text())
    for key in ("template_file", "schema_file"):
        data["prompt"][key] = str(PROJECT / "configs" / data["prompt"][key])
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines = [f"name = {_toml_value(data.pop('name'))}"]
    for name, values in data.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes in process group `pgid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.append(stat.parent.name)
    return found


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_table(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(path) if path.exists() else None
    except (OSError, ValueError):  # a part being renamed into place
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.slow  # half a minute each
@pytest.mark.parametrize("server", ["own", "background"])
def test_serve_runs_the_interval_schedule_on_the_homes_server_and_stops_what_it_started(
    tmp_path: Path, sim_factory, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    """`own`: no server runs, so serve starts one of its own and stops it (and everything it
    started) when stopped. `background`: serve uses the one running and leaves it running."""
    from ernie_batch.server.home import ServerHome, ServerState, alive, healthy
    from ernie_batch.server.local import ServerLease

    sim = sim_factory()
    inbox, output = tmp_path / "inbox", tmp_path / "output"
    inbox.mkdir()
    for name in FILES:
        shutil.copy(SAMPLES / name, inbox / name)
    cfg = write_config(
        tmp_path / "job.toml",
        api={"base_url": sim.url},
        sources={"paths": [str(inbox)]},
        output={"path": str(output)},
        prepare={"workers": -1},
        schedule={"interval_minutes": 0.1},  # every 6 s
    )
    home = ServerHome(tmp_path / "prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home.root),
        "AIMLAPI_API_KEY": TEST_KEY,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # the runner looks for due runs every 2 s
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    })
    background = None
    if server == "background":  # started as a command would, with the same settings
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        lease = ServerLease(home, kind="background")
        lease.begin()
        background = lease.ready()
        lease.end()
    log_path = tmp_path / "serve.log"
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ernie_batch.cli", "serve", "--config", str(cfg)],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    port = used = None
    pages = runs = None
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if port is None and (m := SERVER_LINE.search(log_text())):
                port, used = int(m.group(1)), ServerState.read(home)
            pages, runs = read_table(output / "pages"), read_table(output / "runs")
            # two scheduled runs: the first answers every page, the second finds nothing new;
            # each says so once its flow run ends (a moment after its `runs` row)
            if runs is not None and len(runs) >= 2 and len(FINISHED.findall(log_text())) >= 2:
                break
            time.sleep(1)
        assert proc.poll() is None, f"serve exited early:\n{log_text()}"
        assert runs is not None and len(runs) >= 2, f"no two scheduled runs in time:\n{log_text()}"
        fired_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"serve did not stop within 60 s of SIGINT:\n{log_text()}")

    stopped_after = time.monotonic() - t0 - fired_after
    print(f"two runs after {fired_after:.1f} s; everything stopped {stopped_after:.1f} s later")
    assert code == 0, log_text()
    assert port is not None and used is not None and used.url.endswith(f":{port}"), log_text()
    deadline = time.monotonic() + 10  # orphans of the group are reaped asynchronously
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(proc.pid) == []
    if background is None:  # its own: registered as the home's while it served, then stopped
        assert used.kind == "attached"
        deadline = time.monotonic() + 10
        while alive(used.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(used.pid) and not port_open(port)
        assert ServerState.read(home) is None
    else:  # the one running: used, and left running for the next command
        assert used == background == ServerState.read(home)
        assert alive(background.pid) and healthy(background.url, 5.0)

    assert pages is not None
    assert len(pages) == sum(FILES.values())  # one row per page, none added by later runs
    assert set(pages["status"]) == {"ok"}
    assert pages["key"].is_unique
    assert pages["run_id"].nunique() == 1
    got = pages.groupby(pages["source_path"].map(lambda p: Path(p).name))["page"].apply(sorted)
    assert got.to_dict() == {name: list(range(1, n + 1)) for name, n in FILES.items()}
    assert set(runs["kind"]) == {"ingest"}
    # serve says as each run finishes what it did, one line a run
    finished = FINISHED.findall(log_text())
    assert [ok for _, ok in finished[:2]] == [str(len(pages)), "0"], log_text()
    assert TEST_KEY not in log_text()


def test_serve_schedule_without_a_schedule_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.deploy import serve_schedule

    cfg = write_config(tmp_path / "job.toml", output={"path": str(tmp_path / "out")})
    assert serve_schedule(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "schedule" in err[0] and "job.toml" in err[0]


@pytest.mark.parametrize("schedule, fragment", [
    ({"cron": "0 * * * *", "interval_minutes": 5}, "not both"),
    ({"cron": "61 * * * *"}, "cron"),
    ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "timezone"),
])
def test_serve_schedule_rejects_a_bad_schedule_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], schedule: dict, fragment: str
) -> None:
    from flows.deploy import serve_schedule

    cfg = write_config(tmp_path / "job.toml", schedule=schedule)
    assert serve_schedule(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0].lower()


def test_the_deployment_carries_only_the_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ernie_batch.config import load_config
    from flows.deploy import build_deployment

    monkeypatch.setenv("AIMLAPI_API_KEY", TEST_KEY)
    cfg_path = write_config(tmp_path / "job.toml",
                            schedule={"cron": "0 * * * *", "timezone": "Europe/Berlin"})
    deployment = build_deployment(load_config(cfg_path), cfg_path)

    assert deployment.name == "demo"
    assert deployment.parameters == {"config_path": str(cfg_path.resolve())}
    assert deployment.entrypoint == "flows.ingest.ingest"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 * * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert TEST_KEY not in deployment.model_dump_json()


@pytest.mark.parametrize("script, message", [
    ("print('cannot bind'); raise SystemExit(3)", "exited with code 3"),
    ("import time; time.sleep(60)", "not healthy after"),
])
def test_a_local_server_that_never_gets_healthy_is_stopped_and_its_log_kept(
    monkeypatch: pytest.MonkeyPatch, script: str, message: str
) -> None:
    from ernie_batch import prefect_server as server

    seen: list[server.LocalServer] = []
    wait = server.wait_healthy
    monkeypatch.setattr(server, "server_command",
                        lambda host, port: [sys.executable, "-c", script])
    monkeypatch.setattr(server, "wait_healthy", lambda s, t: (seen.append(s), wait(s, t))[1])
    with pytest.raises(ServerStartError, match=message) as info:
        with server.start_local_server(timeout_s=2):
            pytest.fail("the block must not run")
    assert seen[0].process.poll() is not None  # stopped, and waited for
    log = Path(str(info.value).rsplit("its log: ", 1)[1])
    try:
        assert log.exists() and oct(log.stat().st_mode & 0o777) == "0o600"
        if "cannot bind" in script:
            assert "cannot bind" in log.read_text()
    finally:
        log.unlink(missing_ok=True)


def test_a_local_server_stops_when_the_command_that_started_it_is_killed(tmp_path: Path) -> None:
    """kill -9 of the parent: the kernel asks the server to stop (no server outlives its run)."""
    import psutil

    pid_file = tmp_path / "server.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ernie_batch import prefect_server as server
        server.server_command = lambda host, port: [
            sys.executable, "-c", "import http.server as h; h.test(port={{port}}, bind='127.0.0.1')"
            .replace("{{port}}", str(port))]
        server.wait_healthy = lambda s, t: None
        with server.start_local_server() as s:
            Path({str(pid_file)!r}).write_text(str(s.process.pid))
            time.sleep(600)
    """)])
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(int(pid_file.read_text()))
    assert child.is_running() and os.getpgid(child.pid) != os.getpgid(parent.pid)
    parent.kill()
    parent.wait()
    child.wait(timeout=30)  # raises if it lives on


def test_with_an_api_url_serve_uses_that_server_and_starts_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import deploy

    served = []
    monkeypatch.setattr(deploy, "configured_api_url", lambda: "http://prefect.internal:4200/api")
    monkeypatch.setattr(deploy, "home_server_api", lambda *a, **k: pytest.fail("started one"))
    monkeypatch.setattr(deploy, "serve_deployment", lambda *ds: served.extend(ds))
    cfg = write_config(tmp_path / "job.toml", schedule={"interval_minutes": 30})
    assert deploy.serve_schedule(cfg) == 0
    assert [d.parameters for d in served] == [{"config_path": str(cfg.resolve())}]
