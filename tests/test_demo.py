"""The demo from any install and any folder: packaged assets, its own output, copies that never drift."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import PROJECT, SAMPLES
from tests.test_cli import cli

PACKAGED = PROJECT / "ernie_batch" / "demo"
SAMPLE_PAGES = 9  # invoice 3, survey 4, receipt 1, letter 1


def packaged_assets() -> set[str]:
    """Every file of the demo's home but its Python modules, relative to it."""
    return {p.relative_to(PACKAGED).as_posix() for p in PACKAGED.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}


def test_the_users_copies_under_configs_are_the_packaged_assets() -> None:
    # configs/ holds what users edit; the demo reads the packaged files: one text, two places
    # the labels name the samples by paths relative to themselves: both stay in the package only
    copies = [a for a in packaged_assets() if not a.startswith("samples/") and a != "labels.jsonl"]
    assert {"demo.toml", "demo-v2.toml", "prompts/page.txt", "prompts/page-v2.txt",
            "schemas/page.json"} <= set(copies)
    assert not (PROJECT / "configs" / "labels.jsonl").exists()
    for asset in copies:
        assert (PROJECT / "configs" / asset).read_bytes() == (PACKAGED / asset).read_bytes(), asset
    assert not (PROJECT / "data" / "samples").exists(), "samples live only in the package"
    assert SAMPLES == PACKAGED / "samples" and len(list(SAMPLES.iterdir())) == 4


def test_every_demo_asset_is_declared_package_data() -> None:
    """A non-editable install carries only what pyproject declares."""
    patterns = tomllib.loads((PROJECT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["ernie_batch.demo"]
    declared = {Path(p).relative_to(PACKAGED).as_posix()
                for pattern in patterns for p in glob.glob(str(PACKAGED / pattern))}
    assert packaged_assets() <= declared


def test_demo_writes_under_the_folder_it_runs_from_not_the_jobs_output(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = cli("demo", "--latency", "0", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    out = elsewhere / "data" / "demo-output"
    assert f"output to {out}" in res.stderr
    assert "ernie-batch demo" in res.stdout and "ernie-batch run" not in res.stdout  # its title
    pages = pq.read_table(out / "pages").to_pylist()
    assert len(pages) == SAMPLE_PAGES and {p["status"] for p in pages} == {"ok"}
    assert all(p["source_path"].startswith(str(SAMPLES)) for p in pages)
    assert not (elsewhere / "data" / "output").exists()  # the real job's folder stays untouched


def test_demo_eval_compares_the_two_sample_prompts_on_the_labelled_samples(tmp_path: Path) -> None:
    """The simulator answers from the truth the labels and the prepare stage give, page.txt
    misreading dates and totals far more often than page-v2.txt; run twice, sent once."""
    res = cli("demo", "--eval", "--latency", "0", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    v1, v2 = result["versions"]
    assert (v1["config"], v2["config"]) == ("demo.toml", "demo-v2.toml")
    assert v1["fingerprint"] != v2["fingerprint"]
    assert v1["accuracy"] < v2["accuracy"] and result["best"] == "demo-v2.toml"
    assert v2["fields"]["title"]["n"] == 8 and v2["fields"]["date"]["n"] == 10  # the document's too
    out = tmp_path / "data" / "demo-eval"
    pages = pq.read_table(out / "pages").to_pylist()
    assert len(pages) == 2 * SAMPLE_PAGES and {p["status"] for p in pages} == {"ok"}
    again = cli("demo", "--eval", "--latency", "0", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "demo-v2.toml (best)" in again.stdout and "0 requests" in again.stderr
    assert len(pq.read_table(out / "pages")) == 2 * SAMPLE_PAGES  # nothing sent again
    assert not (tmp_path / "data" / "demo-output").exists()


@pytest.mark.slow
def test_a_plain_pip_install_in_a_fresh_venv_runs_the_demo_from_another_folder(tmp_path: Path) -> None:
    """What a newcomer does: `pip install .` from a clone (deps from the registry), then the demo
    from some other folder. The clone is deleted before the demo runs: nothing may need it."""
    clone = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        if (PROJECT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / rel, clone / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(clone)],
                             capture_output=True, text=True, timeout=1500)
    assert install.returncode == 0, install.stderr[-3000:]
    shutil.rmtree(clone)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "VIRTUAL_ENV", "PYTHON")) and k != "AIMLAPI_API_KEY"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    where = tmp_path / "somewhere"
    where.mkdir()
    located = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import ernie_batch; print(ernie_batch.__file__)"],
                             cwd=where, env=env, capture_output=True, text=True, check=True)
    assert located.stdout.startswith(str(venv)), located.stdout
    res = subprocess.run([str(venv / "bin" / "ernie-batch"), "demo", "--json"], cwd=where, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["outcome"] == "completed" and summary["units_ok"] == SAMPLE_PAGES
    assert len(pq.read_table(where / "data" / "demo-output" / "pages")) == SAMPLE_PAGES
