"""A file that stays broken stops failing every run: a unit no earlier run could prepare with
the same preparation settings (`pages.prep_fingerprint`) is not prepared again under a new
prompt version, counts as already done and is named once in the summary (exit 0: nothing
new failed), until `--retry-failed` or other preparation settings. A file of no supported
type is no document: `report` lists it with its reason, `documents` never as incomplete.
The engine runs in process against the simulator on loopback; the commands as a user runs
them (subprocesses, stdout a pipe)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image
from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.config import load_config
from ernie_batch.money.plan import make_plan
from ernie_batch.money.report import summary_rows
from ernie_batch.run.engine import RunOptions, run_job
from tests import test_chaos as chaos
from tests.conftest import PROJECT, TEST_KEY

V2 = {"prompt.template": "Read $file_name, carefully.", "prompt.template_file": None}


@pytest.fixture
def inbox(sim_factory, tmp_path):
    """Three good images, a truncated PNG and a text file; the job's config path."""
    sim = sim_factory()
    src = tmp_path / "in"
    chaos.make_corpus(src, images=3, pdf_pages=1, seed=91)
    (src / "bundle.pdf").unlink()
    buf = io.BytesIO()
    Image.effect_noise((300, 200), 60).convert("RGB").save(buf, "PNG")
    (src / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "notes.txt").write_text("not a document\n")
    return chaos.write_config(tmp_path / "job.toml", src, tmp_path / "out", sim.url,
                              concurrency=2)


def run(config, opts: RunOptions | None = None, **overrides):
    return run_job(load_config(config, overrides), SecretStr(TEST_KEY), opts)


def input_errors(out) -> list[dict]:
    pages = store.read_table(out, "pages").to_pylist()
    return [r for r in pages if r["status"] == "input_error"]


def test_a_new_prompt_version_leaves_an_unreadable_file_alone(inbox):
    out = inbox.parent / "out"
    first = run(inbox)
    assert (first.outcome, first.exit_code, first.units_failed) == ("partial", 1, 1)
    (failed,) = input_errors(out)
    assert failed["prep_fingerprint"] and failed["source_path"].endswith("truncated.png")

    second = run(inbox, **V2)  # a new prompt version: every readable page is sent again
    assert (second.outcome, second.exit_code) == ("completed", 0)
    assert (second.units_ok, second.units_failed, second.units_skipped) == (3, 0, 1)
    assert second.units_already_done == 1 and second.units_selected == 5
    assert second.still_unreadable == [failed["source_path"]]
    assert second.unreadable_since == first.run_id
    assert dict(summary_rows(second))["unreadable"] == (
        f"1 file still unreadable since run {first.run_id}: truncated.png "
        "(--retry-failed tries again)")
    assert len(input_errors(out)) == 1  # not prepared again: no new row

    third = run(inbox, **V2)  # the same version again: nothing to do, still named
    assert third.units_already_done == 5 and third.still_unreadable == second.still_unreadable

    retried = run(inbox, RunOptions(retry_failed=True), **V2)
    assert (retried.units_failed, retried.exit_code) == (1, 1)
    assert retried.still_unreadable == [] and len(input_errors(out)) == 2

    bigger = run(inbox, **{**V2, "images.max_side": 1200})  # other preparation settings
    assert bigger.units_failed == 1 and len(input_errors(out)) == 3
    assert len({r["prep_fingerprint"] for r in input_errors(out)}) == 2


def test_plan_counts_what_the_run_sends_when_a_file_stays_unreadable(inbox):
    """`plan` asks earlier runs the engine's questions: under a new prompt version the file
    given up on is no request, in the plan as in the run that follows."""
    run(inbox)
    planned = make_plan(load_config(inbox, V2))
    assert (planned.requests, planned.units_already_done) == (3, 1)
    second = run(inbox, **V2)
    assert second.requests == planned.requests
    assert make_plan(load_config(inbox, V2)).requests == 0  # a fully processed inbox


def test_a_file_of_no_supported_type_is_no_document(inbox):
    out = inbox.parent / "out"
    run(inbox)
    docs = store.read_table(out, "documents").to_pylist()
    assert sorted(d["doc_type"] for d in docs) == ["jpeg", "jpeg", "png", "png"]  # no text file
    env = chaos.cli_env(chaos.prefect_home())

    def command(*args: str) -> dict:
        res = subprocess.run([sys.executable, "-m", "ernie_batch.cli", *args, "-c", str(inbox),
                              "--json"], cwd=PROJECT, env=env, capture_output=True, text=True,
                             timeout=120)
        return json.loads(res.stdout.splitlines()[-1])

    counts = command("documents")
    assert (counts["documents"], counts["complete"], counts["incomplete"]) == (4, 3, 1)
    files = {f["source_path"].rsplit("/", 1)[-1]: f for f in command("report")["files"]}
    assert files["notes.txt"]["reason"] == "unsupported format: text"
    assert files["truncated.png"]["reason"] == "truncated PNG: image file is truncated"
    assert files["scan-000.jpg"]["reason"] is None
