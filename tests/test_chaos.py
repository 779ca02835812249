"""Chaos: kill -9 at random moments and resume, API faults, hostile inputs.

The runs are real `ernie-batch run` subprocesses (their own process group, one PREFECT_HOME
for all: the background Prefect server the first one starts survives the kills, by design,
and each next command marks the flow run of the one killed before it `Crashed`; in the slow
tier, each command's own server, which dies with it) against a simulator living in this
process, which therefore survives the kills and keeps the ledger of every billed response.
The runs happen once per session (`campaign()`: faults and hostile inputs, in the default
tier; `kill_campaign()` adds the kills, a minute and a half, in the slow tier) and are shared
with tests/test_secrets.py, which scans every byte they produced for the key.

Bounds tested (see the README's "Chaos" section):
  * kill -9: a response the API delivered but the killed run had not journaled yet was
    in flight at the kill, so at most `concurrency` per kill are lost (paid, not recorded,
    asked again by the resume); each is an `attempts` row with outcome `lost` (its request
    was journaled as sent); everything journaled is never requested again.
  * faults: Parquet credits equal the ledger's credits of every response whose headers
    reached us exactly (a body cut off after its headers is recorded from its cost header).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ernie_batch.store import OutputLock
from tests.conftest import CORPUS, PROJECT, TEST_KEY, stop_home_servers

CONCURRENCY = 4  # [limits] concurrency of the kill runs: the in-flight bound per kill
# the limit's window of the kill runs, compressed: through a shared server each resume joins
# the key's limit, and a killed member's last window is unknown, so it waits that one out
KILL_WINDOW_S = 4.0
OWN_SERVER = "[server]\nbackground = false\n"  # each command its own Prefect server
LATENCY_S = 0.3  # simulator latency of the kill runs
KILLS = 4  # kill -9 this many times, then one clean run
KILL_BUDGET_S = 180.0  # the kill/resume part (about 100 s on 2 idle cores)
IMAGES = 48  # one-page units, plus a PDF of PDF_PAGES pages
PDF_PAGES = 6
FAULT_SEED = 9  # simulator seed: draws >= 1 of every fault kind within the first requests
FAULTS = {"rate_limited": 0.15, "server_error": 0.05, "reset": 0.02, "truncated": 0.01,
          "non_json": 0.02}


# ---------------------------------------------------------------- inputs and runs


def make_corpus(folder: Path, images: int = IMAGES, pdf_pages: int = PDF_PAGES,
                seed: int = 1) -> int:
    """Small PNGs/JPEGs of distinct content and one multi-page PDF; returns the unit count."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(images):
        im = Image.new("RGB", (96, 64), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.randrange(90), rng.randrange(58)
            draw.rectangle((x, y, x + 6, y + 6), fill=tuple(rng.randrange(256) for _ in range(3)))
        draw.text((4, 4), f"page {seed}-{i}", fill=(255, 255, 255))
        im.save(folder / f"scan-{i:03d}.{'png' if i % 2 else 'jpg'}")
    pages = [Image.new("RGB", (80, 110), (30 * p % 256, 90, 255 - 30 * p % 256))
             for p in range(pdf_pages)]
    for p, page in enumerate(pages):
        ImageDraw.Draw(page).text((5, 5), f"sheet {seed} p{p + 1}", fill=(0, 0, 0))
    pages[0].save(folder / "bundle.pdf", save_all=True, append_images=pages[1:])
    return images + pdf_pages


def write_config(path: Path, sources: Path, output: Path, base_url: str, *,
                 concurrency: int, workers: int = -1, flush_rows: int = 5,
                 lag_s: float = 0.0, window_s: float | None = None, extra: str = "") -> Path:
    """The chaos job; `window_s` compresses the limit's window; `extra` is TOML appended (a
    `[server]` section, say)."""
    window = f"window_s = {window_s}\n" if window_s is not None else ""
    q = json.dumps  # a JSON string is a valid TOML basic string
    path.write_text(f"""name = "chaos"
[sources]
paths = [{q(str(sources))}]
[api]
base_url = {q(base_url)}
[prompt]
template_file = {q(str(PROJECT / "configs" / "prompts" / "page.txt"))}
schema_file = {q(str(PROJECT / "configs" / "schemas" / "page.json"))}
[limits]
concurrency = {concurrency}
rpm = 6000
{window}[retries]
backoff_base_s = 0.1
backoff_max_s = 1.0
[prepare]
workers = {workers}
[output]
path = {q(str(output))}
flush_rows = {flush_rows}
[reconcile]
lag_s = {lag_s}
{extra}""")
    return path


def cli_env(home: Path, key: str = TEST_KEY) -> dict[str, str]:
    """The parent's environment without its Prefect settings: a private home, no API URL."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "AIMLAPI_API_KEY"}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_LOGGING_LEVEL": "INFO",  # more output for the secrets scan to read
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "DO_NOT_TRACK": "1",
        "AIMLAPI_API_KEY": key,
        "PYTHONPATH": str(PROJECT),
    })
    return env


def start_cli(config: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """`ernie-batch run` in a new session (its own process group); output to `log`."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "ernie_batch.cli", "run", "--config", str(config), "--quiet",
             *args],
            cwd=PROJECT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )


def reconcile_cli(config: Path, env: dict[str, str], log: Path) -> tuple[int, dict[str, Any]]:
    """`ernie-batch reconcile --json` over every run of the config's output: (rc, figures)."""
    res = subprocess.run([sys.executable, "-m", "ernie_batch.cli", "reconcile", "--config",
                          str(config), "--since", "2000-01-01", "--json"], cwd=PROJECT, env=env,
                         capture_output=True, text=True, timeout=120)
    log.write_text(res.stdout + res.stderr)
    lines = res.stdout.strip().splitlines()
    return res.returncode, json.loads(lines[-1]) if lines else {}


def run_cli(config: Path, env: dict[str, str], log: Path, *args: str,
            timeout: float = 120) -> int:
    proc = start_cli(config, env, log, *args)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while group_members(proc.pid):
        assert time.monotonic() < deadline, f"process group {proc.pid} survived SIGKILL"
        time.sleep(0.05)


def wait_idle(sim: Any, timeout: float = 10) -> None:
    """Until the simulator has answered (and billed) every request it received."""
    deadline = time.monotonic() + timeout
    while sim.simulator.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)


def table(out: Path, name: str) -> pd.DataFrame:
    from ernie_batch.store import read_table

    t = read_table(out, name)
    return t.to_pandas() if t is not None else pd.DataFrame()


# ---------------------------------------------------------------- hostile inputs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def make_hostile(folder: Path) -> list[str]:
    """Files no pipeline should send (the intake issue's cases); returns their names."""
    from PIL import Image
    from pypdf import PdfWriter

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "empty.pdf": b"",
        "text-named.jpg": b"these are not the pixels you are looking for\n" * 20,
        "header-only.pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog",
        "zip-named.pdf": b"PK\x03\x04" + os.urandom(200),
        # a decompression bomb: 60000 x 60000 pixels declared, a few bytes of data
        "bomb.png": (b"\x89PNG\r\n\x1a\n"
                     + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + _png_chunk(b"IEND", b"")),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    good = folder / "_tmp.png"
    Image.new("RGB", (200, 200), (10, 200, 30)).save(good)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:300])
    good.unlink()
    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    writer.encrypt(user_password="secret-user", owner_password="secret-owner")
    with open(folder / "locked.pdf", "wb") as fh:
        writer.write(fh)
    names = sorted(files) + ["truncated.png", "locked.pdf"]
    if (CORPUS / "bad").is_dir():  # the shared real-world corpus, when present (CI)
        for src in sorted((CORPUS / "bad").iterdir()):
            shutil.copy(src, folder / f"corpus-{src.name}")
    return names


# ---------------------------------------------------------------- the campaign


_ROOT: Path | None = None
EXTRA_OUTPUTS: list[Path] = []  # output folders of other tests' CLI runs, for the secrets scan


def chaos_root() -> Path:
    """One folder per session: the shared PREFECT_HOME, the subprocess logs, the outputs."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="ernie-chaos-"))
        (_ROOT / "prefect-home").mkdir()
        (_ROOT / "logs").mkdir()
        atexit.register(shutil.rmtree, _ROOT, True)
        atexit.register(stop_home_servers, _ROOT)  # first (last in, first out)
    return _ROOT


def prefect_home() -> Path:
    """The PREFECT_HOME of every CLI subprocess of the chaos, crash-safety and secrets tests:
    reused, so only the first ephemeral-server start pays for creating the database."""
    return chaos_root() / "prefect-home"


def log_file(name: str) -> Path:
    return chaos_root() / "logs" / f"{name}.log"


@dataclass
class Campaign:
    root: Path
    home: Path  # the PREFECT_HOME every subprocess shared
    logs: Path  # stdout + stderr of every subprocess
    kill: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)
    hostile: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def outputs(self) -> list[Path]:
        """The outputs of the parts that ran (the kills only once `kill_campaign()` ran)."""
        return [part["output"] for part in (self.kill, self.faults, self.hostile) if part]


_CAMPAIGN: Campaign | BaseException | None = None


def campaign() -> Campaign:
    """Run the chaos campaign once per session (shared with test_secrets.py)."""
    global _CAMPAIGN
    if _CAMPAIGN is None:
        try:
            _CAMPAIGN = _run_campaign(chaos_root())
        except BaseException as exc:  # do not run it twice: every user sees the failure
            _CAMPAIGN = exc
    if isinstance(_CAMPAIGN, BaseException):
        raise _CAMPAIGN
    return _CAMPAIGN


def kill_campaign() -> Campaign:
    """The campaign with its kill -9 part run too (once per session)."""
    from ernie_batch.sim import SimServer, SimSettings

    c = campaign()
    if not c.kill:
        t0 = time.monotonic()
        with SimServer(SimSettings(api_key=TEST_KEY, latency_s=LATENCY_S)) as sim:
            c.kill = _kill_resume(c.root / "kill", sim, cli_env(c.home))
        c.timings["kill"] = time.monotonic() - t0
    return c


def _run_campaign(root: Path) -> Campaign:
    from ernie_batch.sim import FaultRates, SimServer, SimSettings

    c = Campaign(root=root, home=prefect_home(), logs=root / "logs")
    env = cli_env(c.home)

    t0 = time.monotonic()
    with SimServer(SimSettings(api_key=TEST_KEY, latency_s=0.05, window_s=6.0, seed=FAULT_SEED,
                               faults=FaultRates(**FAULTS))) as sim:
        src, out = root / "faults" / "in", root / "faults" / "out"
        units = make_corpus(src, images=54, pdf_pages=6, seed=2)
        cfg = write_config(root / "faults" / "job.toml", src, out, sim.url, concurrency=8,
                           flush_rows=10)
        rc = run_cli(cfg, env, log_file("faults"))
        wait_idle(sim)
        c.faults = {"output": out, "units": units, "rc": rc, "ledger": sim.ledger()["entries"],
                    "stats": dict(sim.simulator.stats),
                    "reconcile": reconcile_cli(cfg, env, log_file("faults-reconcile"))}
    c.timings["faults"] = time.monotonic() - t0

    t0 = time.monotonic()
    with SimServer(SimSettings(api_key=TEST_KEY, latency_s=0.05)) as sim:
        src, out = root / "hostile" / "in", root / "hostile" / "out"
        units = make_corpus(src, images=8, pdf_pages=3, seed=3)
        hostile = make_hostile(src)
        cfg = write_config(root / "hostile" / "job.toml", src, out, sim.url, concurrency=4,
                           workers=2)
        rc = run_cli(cfg, env, log_file("hostile"))
        c.hostile = {"output": out, "src": src, "units": units, "hostile": hostile, "rc": rc,
                     "ledger": sim.ledger()["entries"]}
    c.timings["hostile"] = time.monotonic() - t0
    return c


def _kill_resume(root: Path, sim: Any, env: dict[str, str], extra: str = "") -> dict[str, Any]:
    src, out = root / "in", root / "out"
    units = make_corpus(src)
    cfg = write_config(root / "job.toml", src, out, sim.url, concurrency=CONCURRENCY,
                       window_s=KILL_WINDOW_S, extra=extra)
    earlier_flow_runs = len(flow_run_states(Path(env["PREFECT_HOME"])))  # the home is shared
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    deadline = time.monotonic() + KILL_BUDGET_S
    kills: list[dict[str, Any]] = []
    finished_early = None
    for n in range(KILLS):
        before = len(sim.simulator.ledger)
        k = rng.randint(3, 9)  # kill after k more billed responses, then a random instant
        proc = start_cli(cfg, env, log_file(f"kill-{n}"))
        while proc.poll() is None and len(sim.simulator.ledger) < before + k:
            if time.monotonic() > deadline:
                kill_group(proc)
                raise AssertionError(f"kill run {n} sent too few requests in time")
            time.sleep(0.01)
        if proc.poll() is not None:  # it finished all the work first (or failed: its log says)
            finished_early = {"rc": proc.returncode,
                              "log": log_file(f"kill-{n}").read_text()[-2000:]}
            break
        time.sleep(rng.uniform(0, LATENCY_S))
        at_kill, t_kill = len(sim.simulator.ledger), time.time()
        kill_group(proc)
        wait_idle(sim)
        for journal in (out / "_journal").glob("*.jsonl"):  # kept for the secrets scan
            snapshot = root / "journals-at-kills" / f"{n}-{journal.name}"
            snapshot.parent.mkdir(exist_ok=True)
            shutil.copy(journal, snapshot)
        lock = out / ".lock"
        kills.append({
            "k": k, "pid": proc.pid, "at": t_kill, "ledger_at_kill": at_kill,
            "ledger_settled": len(sim.simulator.ledger),
            "lock_pid": OutputLock(out, "").owner().get("pid") if lock.exists() else None,
            "journals": sorted(p.name for p in (out / "_journal").glob("*.jsonl")),
            "parts": len(list((out / "pages").rglob("*.parquet"))),
        })
    final_started = time.monotonic()
    rc = run_cli(cfg, env, log_file("kill-final"),
                 timeout=max(90.0, deadline - time.monotonic()))
    wait_idle(sim)
    return {"output": out, "units": units, "seed": seed, "kills": kills, "rc": rc,
            "finished_early": finished_early, "ledger": sim.ledger()["entries"],
            "final_s": time.monotonic() - final_started,
            "flow_runs": flow_run_states(Path(env["PREFECT_HOME"]))[earlier_flow_runs:],
            "reconcile": reconcile_cli(cfg, env, log_file("kill-reconcile"))}


def flow_run_states(home: Path) -> list[str]:
    """The state of every flow run in the home's Prefect database, oldest first (read as the
    UI would show them, without a server: the commands' own servers are gone by now); none
    before its first command."""
    import sqlite3

    if not (home / "prefect.db").exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro",
                                            uri=True)) as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run ORDER BY created")]


@pytest.fixture(scope="module")
def chaos() -> Campaign:
    return campaign()


# ---------------------------------------------------------------- the tests


@pytest.mark.slow
def test_kill9_and_resume_lose_nothing_and_pay_nothing_twice():
    from tests.test_secrets import scan

    c = kill_campaign()
    check_kill_resume(c.kill, c.logs, c.timings)
    files, hits = scan([c.kill["output"], c.root / "journals-at-kills", c.logs, c.home])
    assert files > 20 and hits == []  # the killed runs' journals and logs hold no key


@pytest.mark.slow
def test_kill9_and_resume_with_each_commands_own_server(tmp_path):
    """The same kills through servers of the commands' own: each dies with its command."""
    from ernie_batch.sim import SimServer, SimSettings

    (tmp_path / "home").mkdir()
    t0 = time.monotonic()
    with SimServer(SimSettings(api_key=TEST_KEY, latency_s=LATENCY_S)) as sim:
        run = _kill_resume(tmp_path / "kill", sim, cli_env(tmp_path / "home"), OWN_SERVER)
    check_kill_resume(run, chaos_root() / "logs", {"kill": time.monotonic() - t0})
    assert not (tmp_path / "home" / "ernie-batch-server" / "state.json").exists()


def check_kill_resume(run: dict[str, Any], logs: Path, timings: dict[str, float]) -> None:
    kills, book = run["kills"], run["ledger"]
    info = (f"seed {run['seed']} (CHAOS_SEED reproduces the kill moments), kills {kills}, "
            f"a command that ended before its kill: {run['finished_early']}")
    assert len(kills) >= 3, info
    assert run["rc"] == 0, (info, (logs / "kill-final.log").read_text()[-3000:])
    # each killed command's flow run was marked Crashed by the next command: none left Running
    assert run["flow_runs"] == ["CRASHED"] * len(kills) + ["COMPLETED"], run["flow_runs"]
    out: Path = run["output"]
    for kill in kills:
        # the killed run's lock and journal stay behind; the next run takes both over
        assert kill["lock_pid"] == kill["pid"], info
        assert kill["journals"], info
    assert not (out / ".lock").exists()
    assert not list((out / "_journal").glob("*.jsonl"))

    pages, attempts, runs = table(out, "pages"), table(out, "attempts"), table(out, "runs")
    # every page exactly once, ok; no duplicate keys
    assert set(pages["status"]) == {"ok"}, pages["status"].value_counts()
    assert pages["key"].is_unique
    assert len(pages) == run["units"]
    per_doc = pages.groupby("source_path")["page"].apply(sorted).to_dict()
    assert per_doc[str(out.parent / "in" / "bundle.pdf")] == list(range(1, PDF_PAGES + 1))
    # every killed run is in the manifest as interrupted (folded from its journal), one clean end
    assert sorted(runs["outcome"]) == ["completed"] + ["interrupted"] * len(kills)
    assert runs["run_id"].is_unique

    # money: what the API delivered vs what Parquet holds
    delivered = [e for e in book if e["delivered"]]
    assert len(delivered) == len(book)  # no faults here: every billed response was sent
    assert attempts["client_request_id"].notna().all() and attempts["client_request_id"].is_unique
    lost_rows = attempts[attempts["outcome"] == "lost"]
    replied = attempts[attempts["outcome"] != "lost"]
    recorded = set(replied["response_id"])
    assert replied["response_id"].is_unique
    assert recorded <= {e["response_id"] for e in book}
    lost = [e for e in delivered if e["response_id"] not in recorded]
    bound_n = len(kills) * CONCURRENCY
    max_credits = max(e["credits"] for e in book)
    assert len(lost) <= bound_n, info
    # each response lost in flight was journaled as sent: a `lost` row, no credits, its request id
    assert {e["client_request_id"] for e in lost} <= set(lost_rows["client_request_id"]), info
    assert len(lost_rows) <= bound_n, info
    assert lost_rows["credits"].isna().all() and lost_rows["credits_source"].isna().all()
    assert set(lost_rows["run_id"]) <= set(runs.loc[runs["outcome"] == "interrupted", "run_id"])
    for e in lost:  # each one was answered around a kill: in flight when the group died
        assert any(k["at"] - 2 <= e["at"] <= k["at"] + LATENCY_S + 2 for k in kills), (e, info)
    ledger_credits = math.fsum(e["credits"] for e in delivered)
    parquet_credits = math.fsum(attempts["credits"].dropna())
    assert parquet_credits <= ledger_credits
    assert parquet_credits >= ledger_credits - bound_n * max_credits
    assert parquet_credits == math.fsum(e["credits"] for e in delivered
                                        if e["response_id"] in recorded)
    # pages.credits is the sum of the unit's attempts, per run
    by_attempts = replied.groupby(["run_id", "key"])["credits"].apply(math.fsum)
    for row in pages.itertuples():
        assert row.credits == by_attempts[(row.run_id, row.key)]
    assert math.isclose(math.fsum(runs["credits"]), parquet_credits, rel_tol=1e-12)

    # nothing answered and journaled was requested again
    answered = dict(zip(pages["response_id"], pages["content_sha256"], strict=True))
    seen_ok: set[str] = set()
    for e in sorted(book, key=lambda e: e["at"]):
        assert e["content_sha256"] not in seen_ok, f"asked again after it was recorded: {e}"
        if e["response_id"] in answered:
            seen_ok.add(e["content_sha256"])
    # a kill between a unit's attempt line and its page line leaves an attempt without a page:
    # that unit was in flight too, and is asked again
    paged = set(zip(pages["run_id"], pages["key"], strict=True))
    orphans = [a for a in replied.itertuples() if (a.run_id, a.key) not in paged]
    asked = Counter(e["content_sha256"] for e in book)
    repeats = sum(n - 1 for n in asked.values())
    assert repeats == len(lost) + len(orphans), (repeats, len(lost), len(orphans), info)
    assert repeats <= bound_n, info
    assert set(asked) == set(pages["content_sha256"])
    # the vendor's usage logs account for every credit: those lost in flight are `lost` rows'
    rc, figures = run["reconcile"]
    assert rc == 0 and figures["exact"], figures
    assert figures["vendor_credits"] == math.fsum(e["credits"] for e in book)
    assert figures["recorded_credits"] == parquet_credits
    assert figures["unrecorded_credits"] == math.fsum(
        e["credits"] for e in book if e["client_request_id"] in set(lost_rows["client_request_id"]))
    print(json.dumps({"seed": run["seed"], "kills": len(kills), "units": run["units"],
                      "kill_after_k": [k["k"] for k in kills], "requests": len(book),
                      "lost_in_flight": len(lost), "lost_rows": len(lost_rows),
                      "asked_twice": repeats, "bound": bound_n,
                      "parts_at_kills": [k["parts"] for k in kills],
                      "ledger_credits": ledger_credits, "parquet_credits": parquet_credits,
                      "seconds": timings}))


def test_api_faults_complete_and_credits_match_the_ledger(chaos):
    run = chaos.faults
    out: Path = run["output"]
    stats, book = run["stats"], run["ledger"]
    # every kind was injected at least once
    for kind in ("fault_rate_limited", "server_error", "reset", "truncated", "non_json"):
        assert stats.get(kind, 0) >= 1, stats
    assert run["rc"] in (0, 1), (chaos.logs / "faults.log").read_text()[-3000:]
    pages, attempts = table(out, "pages"), table(out, "attempts")
    assert len(pages) == run["units"] and pages["key"].is_unique
    assert set(pages["status"]) <= {"ok", "api_error", "invalid_answer"}
    failed = pages[pages["status"] != "ok"]
    assert failed["error"].notna().all() and (failed["error"].str.len() > 0).all()
    assert (pages["status"] == "ok").mean() >= 0.95
    assert (run["rc"] == 0) == failed.empty
    # a truncated body was billed and its headers reached us, its body did not: the cost
    # is recorded from its x-aimlapi-credits-used header, on the attempt that got it
    cut = [e for e in book if e["headers_delivered"] and not e["delivered"]]
    assert len(cut) == stats["truncated"]
    assert not {e["response_id"] for e in cut} & set(attempts["response_id"].dropna())
    from_header = attempts[attempts["credits_source"] == "header"]
    assert sorted(from_header["inference_id"]) == sorted(e["inference_id"] for e in cut)
    assert (from_header["outcome"] == "transport_error").all()
    heard = [e for e in book if e["headers_delivered"]]
    assert len(heard) == len(book)  # no slow answers here: every billed response's headers came
    assert sorted(attempts.loc[attempts["credits"] > 0, "inference_id"]) == sorted(
        e["inference_id"] for e in heard)
    assert not attempts["cost_mismatch"].fillna(False).any()
    ledger_credits = math.fsum(e["credits"] for e in heard)
    assert math.fsum(attempts["credits"]) == ledger_credits
    rc, figures = run["reconcile"]  # nothing unrecorded: every billed response's headers came
    assert rc == 0 and figures["exact"], figures
    assert figures["vendor_credits"] == figures["recorded_credits"] == ledger_credits
    assert figures["unrecorded_credits"] == 0 and figures["vendor_requests"] >= len(book)
    assert math.isclose(math.fsum(pages["credits"]), ledger_credits, rel_tol=1e-12)
    # every failed request is in the attempts table with its outcome
    outcomes = Counter(attempts["outcome"])
    assert outcomes["rate_limited"] >= stats["fault_rate_limited"]
    assert outcomes["server_error"] >= stats["server_error"]
    assert outcomes["transport_error"] == (stats["reset"] + stats["truncated"]
                                           + stats["non_json"])
    print(json.dumps({"stats": stats, "outcomes": outcomes, "requests": len(attempts),
                      "pages": Counter(pages["status"]), "credits": ledger_credits}))


def test_hostile_inputs_leave_the_good_pages_ok(chaos):
    run = chaos.hostile
    out: Path = run["output"]
    assert run["rc"] in (0, 1), (chaos.logs / "hostile.log").read_text()[-3000:]
    pages = table(out, "pages")
    src: Path = run["src"]
    good = pages[pages["source_path"].map(lambda p: Path(p).name.startswith(("scan-", "bundle")))]
    assert len(good) == run["units"]
    assert set(good["status"]) == {"ok"}
    for name in run["hostile"]:
        rows = pages[pages["source_path"] == str(src / name)]
        assert len(rows) >= 1, f"{name}: no row"
        assert not (rows["status"] == "ok").any(), (name, rows[["status", "error"]])
        assert rows["error"].notna().all(), name
    # nothing that could not be read was sent
    assert len(run["ledger"]) == (pages["status"] == "ok").sum()
    print(json.dumps({"files": len(set(pages["source_path"])), "statuses":
                      Counter(pages["status"]), "hostile": run["hostile"]}))


# ---------------------------------------------------------------- a kill between two tables


def _commits(log: Path) -> int:
    return sum(1 for p in log.glob("*.json")) if log.is_dir() else 0


def _between_tables(out: Path) -> tuple[str, int, int] | None:
    """(run id, attempts' version, pages' version) when the killed run's last round
    committed its attempts and not its pages, which the journal holds; else None."""
    from ernie_batch import store
    from ernie_batch.store import read_journal

    (journal,) = (out / "_journal").glob("*.jsonl")
    run_id = journal.stem
    done = {t: store.committed_version(out, t, store.app_id(run_id, t))
            for t in ("attempts", "pages")}
    rounds, pages_in = 0, set()
    for record in read_journal(journal):
        if record.get("t") == "commit":
            rounds = record["round"]
        elif record.get("t") == "page":
            pages_in.add(rounds + 1)
    if done["attempts"] > done["pages"] and done["attempts"] in pages_in:
        return run_id, done["attempts"], done["pages"]
    return None


@pytest.mark.slow
def test_kill9_between_a_rounds_attempts_and_pages_commits_and_resume(tmp_path):
    """`ernie-batch run` killed with SIGKILL the moment its attempts table gets a commit (the
    pages commit of the same round follows within milliseconds): tried until the kill lands
    between the two; the resume commits the round's pages from the journal, once."""
    from ernie_batch.sim import SimServer, SimSettings

    with SimServer(SimSettings(api_key=TEST_KEY, latency_s=0.05)) as sim:
        env = cli_env(prefect_home())
        caught, tries = None, 0
        while caught is None:
            tries += 1
            assert tries <= 12, "no kill landed between the two tables' commits"
            src, out = tmp_path / f"in-{tries}", tmp_path / f"out-{tries}"
            units = make_corpus(src, images=20, pdf_pages=2, seed=tries)
            cfg = write_config(tmp_path / f"job-{tries}.toml", src, out, sim.url,
                               concurrency=2, flush_rows=2)
            proc = start_cli(cfg, env, log_file(f"between-{tries}"))
            attempts_log = out / "attempts" / "_delta_log"
            while proc.poll() is None and _commits(attempts_log) < 2:
                time.sleep(0.001)
            seen = _commits(attempts_log)
            while proc.poll() is None and _commits(attempts_log) == seen:
                time.sleep(0.0005)
            if proc.poll() is not None:
                continue
            kill_group(proc)
            caught = _between_tables(out)
        run_id, attempts_version, pages_version = caught
        wait_idle(sim)
        before = len(sim.ledger()["entries"])
        assert run_cli(cfg, env, log_file("between-resume")) == 0
        wait_idle(sim)
        book = sim.ledger()["entries"]
    pages, attempts, runs = table(out, "pages"), table(out, "attempts"), table(out, "runs")
    assert len(pages) == units and pages["key"].is_unique and set(pages["status"]) == {"ok"}
    assert attempts["client_request_id"].is_unique
    assert sorted(runs["outcome"]) == ["completed", "interrupted"]
    # the resume asked for exactly what the killed run had not recorded (its journal's pages,
    # the round cut between its tables included, count as recorded)
    assert len(book) - before == units - (pages["run_id"] == run_id).sum()
    assert math.fsum(attempts["credits"].dropna()) == math.fsum(
        e["credits"] for e in book if e["response_id"] in set(attempts["response_id"]))
    print(json.dumps({"tries": tries, "run": run_id, "attempts_version": attempts_version,
                      "pages_version": pages_version, "units": units}))
