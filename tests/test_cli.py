"""The command line as a user types it: one clear line and exit 2 for a bad config or no key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT
from tests.test_chaos import prefect_home


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = PROJECT):
    """The command in a subprocess; by default in the session's shared Prefect home (its
    background server starts once for every test's commands)."""
    full_env = {k: v for k, v in os.environ.items() if k != "AIMLAPI_API_KEY"}
    full_env["PREFECT_HOME"] = str(prefect_home())
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    res = cli("--help")
    assert res.returncode == 0
    for command in ("run", "demo", "sim"):
        assert command in res.stdout


def test_bad_config_is_one_line_naming_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nconcurrency = "lots"\n')
    res = cli("run", "--config", str(bad), env={"AIMLAPI_API_KEY": "k"})
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert str(bad) in lines[0] and "limits.concurrency" in lines[0]


def test_unknown_field_and_broken_toml(tmp_path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[limits]\nrpn = 5\n")
    res = cli("run", "--config", str(unknown), env={"AIMLAPI_API_KEY": "k"})
    assert res.returncode == 2 and "limits.rpn: unknown field" in res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[limits\n")
    res = cli("run", "--config", str(broken), env={"AIMLAPI_API_KEY": "k"})
    assert res.returncode == 2 and "not valid TOML" in res.stderr


def test_unknown_template_variable_is_a_config_error(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[prompt]\ntemplate = "page $page of $nonsense"\n')
    res = cli("run", "--config", str(cfg), env={"AIMLAPI_API_KEY": "k"})
    assert res.returncode == 2 and "$nonsense" in res.stderr


def test_missing_api_key_is_exit_2():
    res = cli("run", "--config", str(PROJECT / "configs" / "default.toml"))
    assert res.returncode == 2
    assert "AIMLAPI_API_KEY" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1


def test_plain_http_to_a_remote_host_is_refused(tmp_path):
    res = cli("run", "--base-url", "http://example.com/v1", env={"AIMLAPI_API_KEY": "k"})
    assert res.returncode == 2
    assert "plain HTTP" in res.stderr


def test_an_unreadable_prompt_is_the_flags_error(tmp_path):
    missing = tmp_path / "page-v3.txt"
    res = cli("backfill", "-c", str(PROJECT / "configs" / "default.toml"), "--prompt", str(missing),
              env={"AIMLAPI_API_KEY": "k"})
    assert res.returncode == 2
    [line] = [line for line in res.stderr.splitlines() if line.strip()]
    assert f"--prompt {missing}: cannot read: No such file or directory" in line
    assert "template_file" not in line


def test_an_output_that_is_a_file_says_so(tmp_path):
    target = tmp_path / "results.parquet"
    target.write_text("not a folder\n")
    res = cli("run", "-c", str(PROJECT / "configs" / "default.toml"), "--output", str(target),
              env={"AIMLAPI_API_KEY": "k"})
    assert res.returncode == 2
    [line] = [line for line in res.stderr.splitlines() if line.strip()]
    assert line.endswith(f"output folder {target} is a file"), line


def test_help_is_plain_text_that_says_everything():
    from ernie_batch.bench import SCENARIOS

    helps = {name: cli(*filter(None, [name]), "--help") for name in
             ("", "run", "backfill", "demo", "plan", "report", "serve", "sim", "bench")}
    for name, res in helps.items():
        assert res.returncode == 0, (name, res.stderr)
        assert "<bool>" not in res.stdout, name  # a flag takes no value
    assert "with a [schedule] cron" in " ".join(helps["serve"].stdout.split())
    assert all(s in helps["bench"].stdout for s in SCENARIOS)


def test_plan_without_a_config_says_it_uses_the_built_in_defaults(tmp_path):
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    res = cli("plan", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "no --config: planning with the built-in defaults" in res.stderr
    assert "data/inbox" in res.stderr
    (tmp_path / "data" / "inbox").rmdir()  # the default inbox gone: one line, exit 2
    res = cli("plan", cwd=tmp_path)
    assert res.returncode == 2 and "data/inbox does not exist" in res.stderr


def test_backfill_summary_is_titled_backfill(sim_factory, tmp_path):
    from tests.conftest import SAMPLES, TEST_KEY

    sim = sim_factory()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "r.png").write_bytes((SAMPLES / "receipt-cafe-aurora.png").read_bytes())
    res = cli("backfill", str(inbox), "-c", str(PROJECT / "configs" / "demo.toml"),
              "--base-url", sim.url, "--output", str(tmp_path / "out"),
              env={"AIMLAPI_API_KEY": TEST_KEY})
    assert res.returncode == 0, res.stderr
    assert "ernie-batch backfill" in res.stdout and "ernie-batch run" not in res.stdout
