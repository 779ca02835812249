"""Mistakes found in a second, not after minutes of retries: the real command in a subprocess.

Before Prefect starts, `run` and `plan` ask the endpoint for the balance once: a host that
does not resolve or refuses the connection, or a rejected key, is exit 3 with one line; an
endpoint without a balance call goes on. A source folder that does not exist is exit 2.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from ernie_batch.run.engine import run_job
from ernie_batch.run.sender import UnitSender
from tests.conftest import SAMPLES, TEST_KEY, job_config
from tests.test_chaos import cli_env, prefect_home
from tests.test_cli import cli

RECEIPT = "receipt-cafe-aurora.png"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once it is closed


def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir(parents=True)
    shutil.copy(SAMPLES / RECEIPT, folder / RECEIPT)
    return folder


def run(tmp_path: Path, base_url: str, *args: str, key: str = TEST_KEY):
    env = cli_env(prefect_home(), key)
    return cli("run", str(inbox(tmp_path)), "--base-url", base_url, "--output",
               str(tmp_path / "out"), *args, env=env)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("base_url, host", [
    ("https://no-such-host.invalid/v1", "no-such-host.invalid"),
    (f"http://127.0.0.1:{closed_port()}/v1", "127.0.0.1"),
])
def test_a_host_that_is_not_there_is_exit_3_in_one_line(tmp_path, base_url, host):
    started = time.monotonic()
    res = run(tmp_path, base_url)
    assert res.returncode == 3
    line = one_error_line(res.stderr)
    assert "cannot reach" in line and host in line
    assert time.monotonic() - started < 60  # a guard: no minutes of retries
    assert not (tmp_path / "out" / "pages").exists()


def test_a_rejected_key_is_exit_3_before_anything_is_sent(sim_factory, tmp_path):
    sim = sim_factory()
    res = run(tmp_path, sim.url, key="sk-wrong-key")
    assert res.returncode == 3
    assert "key rejected" in one_error_line(res.stderr)
    assert sim.ledger()["entries"] == []
    plan = cli("plan", str(inbox(tmp_path / "p")), "--base-url", sim.url,
               env=cli_env(prefect_home(), "sk-wrong-key"))
    assert plan.returncode == 3 and "key rejected" in plan.stderr


def test_an_endpoint_without_a_balance_call_runs(sim_factory, tmp_path):
    sim = sim_factory(has_balance=False)
    res = run(tmp_path, sim.url, "--json")
    assert res.returncode == 0, res.stderr
    assert len(sim.ledger()["entries"]) == 1


def test_a_source_folder_that_does_not_exist_is_exit_2(tmp_path):
    res = cli("run", str(tmp_path / "nope"), "--base-url", "http://127.0.0.1:9/v1",
              env={"AIMLAPI_API_KEY": TEST_KEY})
    assert res.returncode == 2
    assert "does not exist" in one_error_line(res.stderr) and "nope" in res.stderr


def test_a_base_url_without_v1_finds_no_chat_endpoint(sim_factory, tmp_path):
    """The simulator, as the API, answers only under /v1: the mistake shows at once."""
    sim = sim_factory()
    cfg = job_config(sim.url.removesuffix("/v1"), tmp_path / "out", [inbox(tmp_path)])
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.outcome == "fatal_api_error" and summary.exit_code == 3
    assert "404" in summary.error


def test_a_run_whose_host_never_answers_stops_as_fatal(tmp_path, monkeypatch):
    """In a run (a scheduled one has no CLI probe): no answer for the first minute is fatal."""
    monkeypatch.setattr(UnitSender, "UNREACHABLE_AFTER_S", 0.5)
    cfg = job_config(f"http://127.0.0.1:{closed_port()}/v1", tmp_path / "out",
                     [inbox(tmp_path)], **{"retries.backoff_base_s": 0.2,
                                           "retries.backoff_max_s": 0.2,
                                           "retries.transport": 50})
    summary = run_job(cfg, SecretStr(TEST_KEY))
    assert summary.outcome == "fatal_api_error" and summary.exit_code == 3
    assert "no answer from" in summary.error
