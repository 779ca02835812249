"""Nothing leaked: the API key never appears in any byte a run produces.

The chaos campaign of test_chaos.py (API faults, hostile inputs; its kill -9 and resumes are
scanned by their own test in the slow tier, and here too when they ran first), the
CLI runs of test_crash_safety.py, a 401 run and an eval here all use the distinctive TEST_KEY; then
every file they produced is read raw: Parquet, journals, logs (stdout and stderr of every
subprocess, exception output included), the shared PREFECT_HOME with its SQLite database
and WAL, configs. The key must not occur, nor its base64 at any alignment.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_batch.api.client import ApiClient, check_base_url
from ernie_batch.config import ConfigError, api_key
from ernie_batch.run.engine import run_job
from tests import test_chaos as chaos
from tests.conftest import TEST_KEY, job_config

STARS = "**********"


def key_patterns(key: str) -> dict[str, bytes]:
    """The key's bytes as they could be stored: raw, UTF-16, hex, base64 at every alignment."""
    raw = key.encode()
    found = {"raw": raw, "utf-16-le": key.encode("utf-16-le"), "hex": raw.hex().encode()}
    for pad in range(3):
        for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
            text = enc(b"\0" * pad + raw)
            # only the characters that depend on the key's bytes alone
            start = 4 if pad else 0
            end = len(text) - 4
            found[f"{name}+{pad}"] = text[start:end]
    return found


def scan(roots: list[Path], key: str = TEST_KEY) -> tuple[int, list[str]]:
    """(files read, "path: pattern" for every hit) under `roots`, symlinks not followed."""
    patterns = key_patterns(key)
    files, hits = 0, []
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            if path.is_symlink():
                continue
            data = path.read_bytes()
            files += 1
            hits += [f"{path}: {name}" for name, pat in patterns.items() if pat in data]
    return files, hits


def test_the_scanner_finds_a_planted_key(tmp_path):
    (tmp_path / "a.log").write_bytes(b"x" + TEST_KEY.encode() + b"y")
    for pad in range(3):
        (tmp_path / f"b{pad}.bin").write_bytes(
            base64.b64encode(b"Bearer "[:pad] + TEST_KEY.encode()))
    files, hits = scan([tmp_path])
    assert files == 4
    assert {h.split(": ")[0].rsplit("/", 1)[1] for h in hits} == {"a.log", "b0.bin", "b1.bin",
                                                                  "b2.bin"}


def test_reprs_and_errors_show_stars_not_the_key(sim_factory, tmp_path, monkeypatch):
    sim = sim_factory(api_key="sk-another-key-the-server-wants")
    monkeypatch.setenv("AIMLAPI_API_KEY", TEST_KEY)
    cfg = job_config(sim.url, tmp_path / "out")
    key = api_key(cfg)
    assert repr(key) == f"SecretStr('{STARS}')" and str(key) == STARS
    texts = [repr(cfg), cfg.model_dump_json()]

    async def calls() -> None:
        client = ApiClient(sim.url, key)
        texts.extend([repr(client), repr(client._http.headers)])
        assert STARS in repr(client)
        body = {"model": cfg.api.model, "messages": [{"role": "user", "content": "hi"}]}
        res = await client.complete(body)  # 401: the server wants another key
        assert res.status_code == 401 and "401" in res.error
        texts.extend([res.error, repr(res)])
        refused = ApiClient("http://127.0.0.1:9/v1", key, connect_timeout_s=2)
        res = await refused.complete(body)  # nothing listens: a transport error
        assert res.outcome == "transport_error"
        texts.extend([res.error, repr(res), repr(refused)])
        await client.aclose()
        await refused.aclose()

    asyncio.run(calls())
    with pytest.raises(ConfigError) as exc:
        check_base_url("http://api.example.com/v1", allow_insecure_http=False)
    texts.append(str(exc.value))

    summary = run_job(cfg, key)  # a whole run stopped by the 401
    assert summary.outcome == "fatal_api_error" and summary.exit_code == 3
    assert "401" in (summary.error or "")
    texts += [summary.model_dump_json(), repr(summary)]
    for text in texts:
        assert TEST_KEY not in text, text
    files, hits = scan([tmp_path])
    assert files >= 3 and hits == []


def test_the_cli_stopped_by_a_401_prints_no_key(sim_factory, tmp_path):
    sim = sim_factory(api_key="sk-another-key-the-server-wants")
    src, out = tmp_path / "in", tmp_path / "out"
    chaos.make_corpus(src, images=2, pdf_pages=1)
    cfg = chaos.write_config(tmp_path / "job.toml", src, out, sim.url, concurrency=2)
    chaos.EXTRA_OUTPUTS.append(tmp_path)
    log = chaos.log_file("unauthorized")
    rc = chaos.run_cli(cfg, chaos.cli_env(chaos.prefect_home()), log)
    text = log.read_text()
    assert rc == 3, text
    assert "key rejected" in text and "401" in text  # found by the probe, before any request
    assert TEST_KEY not in text
    assert sim.ledger()["entries"] == [] and chaos.table(out, "attempts").empty


def test_an_eval_with_its_gate_prints_and_records_no_key(sim_factory, tmp_path):
    """`ernie-batch eval` (runs, the evals table, the comparison, the gate's error line)."""
    from tests import test_eval

    pdf, png = test_eval.sample(tmp_path / "docs")
    sim = sim_factory(error_rates={"VERSION-B": {"date": 1.0}})
    a = test_eval.write_version(tmp_path, "a", "VERSION-A", sim.url)
    b = test_eval.write_version(tmp_path, "b", "VERSION-B", sim.url)
    sim.simulator.settings.scripted.update(test_eval.truth_for(a, pdf, png))
    labels = test_eval.write_labels(tmp_path / "labels.jsonl", pdf, png)
    chaos.EXTRA_OUTPUTS.append(tmp_path)
    log = chaos.log_file("eval")
    with open(log, "wb") as fh:
        rc = subprocess.run(
            [sys.executable, "-m", "ernie_batch.cli", "eval", "-c", str(a), "-c", str(b),
             "--labels", str(labels), "--gate", "b.toml"], cwd=tmp_path,
            env=chaos.cli_env(chaos.prefect_home()), stdout=fh, stderr=subprocess.STDOUT,
            timeout=300).returncode
    assert rc == 6, log.read_text()
    assert list((tmp_path / "out" / "evals").rglob("*.parquet"))
    files, hits = scan([tmp_path, log])
    assert files > 5 and hits == []


def test_the_review_pages_of_the_chaos_runs_hold_no_key():
    """`ernie-batch review` over each campaign output, every run, with the key in its
    environment: the pages (errors, raw answers, file names) and its output hold no key."""
    c = chaos.campaign()
    pages = []
    for out in c.outputs():
        html = c.root / "reviews" / f"{out.parent.name}.html"
        log = chaos.log_file(f"review-{out.parent.name}")
        with open(log, "wb") as fh:
            rc = subprocess.run(
                [sys.executable, "-m", "ernie_batch.cli", "review", "-c",
                 str(out.parent / "job.toml"), "--since", "2000-01-01", "--html", str(html)],
                cwd=chaos.PROJECT, env=chaos.cli_env(c.home), stdout=fh,
                stderr=subprocess.STDOUT, timeout=300).returncode
        assert rc == 0, log.read_text()
        pages.append(html.read_text(encoding="utf-8").count('<article class="card'))
        files, hits = scan([html, log])
        assert files == 2 and hits == []
    assert all(pages), pages


def test_no_byte_any_run_produced_holds_the_key():
    c = chaos.campaign()
    roots = [c.root, *chaos.EXTRA_OUTPUTS]
    files, hits = scan(roots)
    assert hits == [], hits
    # the scan did read what the runs produced: Prefect's database, every log, every part
    db = c.home / "prefect.db"
    assert db.stat().st_size > 0
    prefect_bytes = b"".join(p.read_bytes() for p in c.home.glob("prefect.db*"))
    assert b"ernie-ingest" in prefect_bytes and b"process-batch" in prefect_bytes
    logs = sorted(p.name for p in c.logs.iterdir())
    assert {"faults.log", "hostile.log", "faults-reconcile.log"} <= set(logs)
    if c.kill:  # the slow tier's kills ran first in this session: their logs were read too
        assert {"kill-0.log", "kill-final.log", "kill-reconcile.log"} <= set(logs)
    assert files > 100, files
    # the background Prefect server the runs left running: its log scanned above, and the key
    # was never in its environment (it outlives the commands that had it)
    from ernie_batch.server.home import ServerHome, ServerState, alive

    server = ServerState.read(ServerHome(c.home))
    assert server is not None and (c.home / "ernie-batch-server" / "server.log").exists()
    if alive(server.pid) and Path(f"/proc/{server.pid}/environ").exists():
        assert TEST_KEY.encode() not in Path(f"/proc/{server.pid}/environ").read_bytes()
    print(json.dumps({"files_scanned": files, "logs": logs,
                      "bytes": sum(p.stat().st_size for r in roots for p in r.rglob("*")
                                   if p.is_file())}))


def test_no_decoded_parquet_value_holds_the_key():
    """Parquet pages are zstd-compressed, so the raw scan cannot see inside: decode them."""
    import pyarrow.parquet as pq

    c = chaos.campaign()
    parts = [p for r in [c.root, *chaos.EXTRA_OUTPUTS] for p in r.rglob("*.parquet")]
    assert len(parts) > 20
    assert {"pages", "attempts", "documents", "runs"} <= {p.parent.parent.name for p in parts}
    assert any(p.parent.parent.name == "billing" for p in parts)  # reconcile's table too
    assert any(p.parent.parent.name == "evals" for p in parts)  # and eval's
    for part in parts:
        text = json.dumps(pq.read_table(part).to_pylist(), default=str)
        assert TEST_KEY not in text, part
        assert TEST_KEY.encode() not in b"".join((pq.read_metadata(part).metadata or {}).values())
