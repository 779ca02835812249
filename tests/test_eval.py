"""`ernie-batch eval`: two prompt versions scored on labels whose errors are known, the gate,
and a second eval that sends nothing; against the simulator on loopback, its truth scripted.

The sample: a 4-page PDF and a PNG. The simulator answers each page from a truth map (its
media digest -> answer), version B (a marker in its template) misreading every date; the PNG's
answer is invalid for both. The labels disagree with that truth on purpose:

| field        | page 1                   | page 2       | page 3 | page 4            | PNG | document |
|--------------|--------------------------|--------------|--------|-------------------|-----|----------|
| title        | right after normalising  | wrong label  | right  | wrong label       | -   |          |
| date         | right as a date          | right        | right  | right             |     |          |
| total_amount | 0.4 % off: right         | 1 % off      | 0 = 0  | right             |     | right    |
| keywords     | right as a set           | right        | right  | one item short    |     | right    |

(the PNG has no valid answer: its one labelled field, title, counts wrong)
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from pydantic import SecretStr

from ernie_batch.config import load_config
from ernie_batch.evaluation import Version, eval_overrides, read_labels, run_eval
from ernie_batch.intake.content import parts_sha256
from ernie_batch.intake.discover import discover
from ernie_batch.intake.prepare import prepare_document
from ernie_batch.intake.units import PageUnit
from ernie_batch.store import read_table
from tests.conftest import PROJECT, TEST_KEY

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "date": {"type": ["string", "null"]},
        "total_amount": {"type": ["number", "null"], "x-merge": "first"},
        "keywords": {"type": "array", "items": {"type": "string"}},
        "paid": {"type": "boolean"},
    },
    "required": ["title", "date", "total_amount", "keywords", "paid"],
    "additionalProperties": False,
}
TRUTH = {  # what a perfect reader answers, page by page
    1: {"title": "  Invoice   NO. 7 ", "date": "02.11.2026", "total_amount": 100.4,
        "keywords": ["a", "b"], "paid": True},
    2: {"title": "Page two", "date": "2026-11-03", "total_amount": 101.0, "keywords": ["c"],
        "paid": False},
    3: {"title": "Page three", "date": "2026-11-04", "total_amount": 0.0, "keywords": [],
        "paid": False},
    4: {"title": "Page four", "date": "2026-11-05", "total_amount": 250.0,
        "keywords": ["x", "y", "z"], "paid": True},
}
LABELS = [  # (page, fields); page None: the whole document
    (1, {"title": "invoice no. 7", "date": "2026-11-02", "total_amount": 100.0,
         "keywords": ["B", "a"]}),
    (2, {"title": "WRONG", "date": "2026-11-03", "total_amount": 100.0, "keywords": ["c"]}),
    (3, {"title": "Page three", "date": "2026-11-04", "total_amount": 0, "keywords": []}),
    (4, {"title": "WRONG", "date": "2026-11-05", "total_amount": 250, "keywords": ["x", "y"]}),
    (None, {"total_amount": 100.0, "keywords": ["a", "b", "c", "x", "y", "z"]}),
]


def sample(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pages = []
    for n in range(1, 5):
        im = Image.new("L", (300, 400), 250)
        ImageDraw.Draw(im).text((20, 20 + 40 * n), f"page {n} of the invoice", fill=0)
        pages.append(im)
    pdf = folder / "invoice.pdf"
    pages[0].save(pdf, save_all=True, append_images=pages[1:], resolution=72)
    png = folder / "receipt.png"
    im = Image.new("RGB", (200, 120), "white")
    ImageDraw.Draw(im).text((10, 10), "receipt", fill="black")
    im.save(png)
    return pdf, png


def write_labels(path: Path, pdf: Path, png: Path | None) -> Path:
    lines = [{"path": f"docs/{pdf.name}", "page": page, "fields": fields} for page, fields in LABELS]
    if png is not None:
        lines.append({"path": f"docs/{png.name}", "page": 1, "fields": {"title": "RECEIPT"}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_version(tmp: Path, name: str, marker: str, url: str, **toml: str) -> Path:
    (tmp / "schema.json").write_text(json.dumps(SCHEMA))
    extra = "".join(f"{k} = {v}\n" for k, v in toml.items())
    path = tmp / f"{name}.toml"
    path.write_text(f'''name = "eval-{name}"
[api]
base_url = "{url}"
[prompt]
template = "{marker}: page $page of $file_name. Answer with JSON only."
schema_file = "schema.json"
{extra}[retries]
answer = 0
[limits]
concurrency = 4
rpm = 0
[prepare]
workers = -1
[output]
path = "{tmp / 'out'}"
''')
    return path


def truth_for(config: Path, pdf: Path, png: Path) -> dict:
    """media digest -> answer: the truth per PDF page, an invalid answer for the PNG."""
    cfg = load_config(config)
    docs, _ = discover(cfg.sources.model_copy(update={"paths": [pdf, png]}))
    truth = {}
    for doc in docs:
        for unit in prepare_document(doc, cfg.images, cfg.pdf):
            assert isinstance(unit, PageUnit)
            digest = parts_sha256(unit.parts)
            truth[digest] = TRUTH[unit.page] if doc.path == pdf else {"title": 5}
    return truth


@pytest.fixture
def setup(tmp_path, sim_factory):
    pdf, png = sample(tmp_path / "docs")
    sim = sim_factory(error_rates={"VERSION-B": {"date": 1.0}})
    a = write_version(tmp_path, "a", "VERSION-A", sim.url)
    b = write_version(tmp_path, "b", "VERSION-B", sim.url)
    sim.simulator.settings.scripted.update(truth_for(a, pdf, png))
    return tmp_path, sim, a, b, pdf, png


def evaluate(configs: list[Path], labels_path: Path, gate: str | None = None):
    labels = read_labels(labels_path)
    versions = []
    for config in configs:
        cfg = load_config(config, eval_overrides(labels.files))
        versions.append(Version(config.name, cfg, SecretStr(TEST_KEY)))
    root = Path(versions[0].cfg.output.path)
    return asyncio.run(run_eval(versions, labels, root, gate=gate, max_drop=0.02))


def test_accuracies_are_exactly_as_the_labels_were_constructed(setup):
    tmp, sim, a, b, pdf, png = setup
    result = evaluate([a, b], write_labels(tmp / "labels.jsonl", pdf, png), gate="b.toml")
    va, vb = result.scores
    fields_a = {name: (f.correct, f.n) for name, f in va.fields.items()}
    assert fields_a == {"title": (2, 5), "date": (4, 4), "total_amount": (4, 5),
                        "keywords": (4, 5)}
    assert (va.correct, va.n) == (14, 19) and va.accuracy == 14 / 19
    # B misreads every date, and nothing else
    assert {n: (f.correct, f.n) for n, f in vb.fields.items()} == {**fields_a, "date": (0, 4)}
    assert vb.accuracy == 10 / 19
    # keywords as sets: 11 of 12 answered items labelled, every labelled item answered
    kw = va.fields["keywords"]
    assert (kw.matched, kw.answered, kw.labelled) == (11, 12, 11)
    assert kw.precision == 11 / 12 and kw.recall == 1.0
    # the PNG's one answer was invalid: 1 of the 5 answers of each version
    assert va.invalid_rate == vb.invalid_rate == 1 / 5
    assert (va.units, va.pages) == (5, 5)
    ledger = sim.ledger()["entries"]
    assert len(ledger) == 10  # 5 units each, one attempt each
    assert math.fsum([va.credits, vb.credits]) == math.fsum(e["credits"] for e in ledger)
    assert va.credits_per_page == va.credits / 5 and va.cost_per_correct_field == va.credits / 14
    assert 0 < va.latency_p95_s and va.latency_mean_s <= va.latency_p95_s + 1e-9
    assert result.best == "a.toml" and result.gated == "b.toml"  # 21 points behind

    runs = read_table(tmp / "out", "runs").to_pandas()
    assert set(runs["kind"]) == {"eval"} and set(runs["units_skipped"]) == {0}
    evals = read_table(tmp / "out", "evals").to_pandas()
    assert set(evals["eval_id"]) == {result.eval_id}
    totals = evals[evals["field"] == "*"].set_index("config")
    assert totals.loc["a.toml", "accuracy"] == 14 / 19 and totals.loc["b.toml", "n"] == 19
    assert bool(totals.loc["a.toml", "best"]) and bool(totals.loc["b.toml", "gated"])
    assert totals.loc["a.toml", "credits"] == va.credits
    dates = evals[evals["field"] == "date"].set_index("config")
    assert dates.loc["b.toml", "correct"] == 0 and dates.loc["a.toml", "accuracy"] == 1.0
    assert evals[evals["field"] == "keywords"]["precision"].tolist() == [11 / 12, 11 / 12]


def test_a_version_told_by_a_marker_still_misreads_in_the_text_mode(tmp_path, sim_factory):
    """The endpoint refuses json_schema and json_object: the pipeline falls back to the text
    mode (no schema name is sent), and the simulator tells B by its template's marker."""
    pdf, png = sample(tmp_path / "docs")
    sim = sim_factory(error_rates={"VERSION-B": {"date": 1.0}},
                      reject_response_formats=("json_schema", "json_object"))
    a = write_version(tmp_path, "a", "VERSION-A", sim.url)
    b = write_version(tmp_path, "b", "VERSION-B", sim.url)
    sim.simulator.settings.scripted.update(truth_for(a, pdf, png))
    result = evaluate([a, b], write_labels(tmp_path / "labels.jsonl", pdf, None))
    va, vb = result.scores
    assert va.fields["date"].correct == 4 and vb.fields["date"].correct == 0
    assert va.correct - vb.correct == 4


def test_only_the_labelled_pages_are_sent_and_the_rest_is_no_row(tmp_path, sim_factory):
    pdf, png = sample(tmp_path / "docs")
    sim = sim_factory()
    a = write_version(tmp_path, "a", "VERSION-A", sim.url)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"path": f"docs/{pdf.name}", "page": p,
                                          "fields": {"title": "x"}}) + "\n" for p in (1, 3)))
    result = evaluate([a], labels)
    pages = read_table(tmp_path / "out", "pages").to_pandas()
    assert sorted(pages["page"]) == [1, 3] and len(sim.ledger()["entries"]) == 2
    run = result.runs[0]
    assert (run.units_ok, run.units_skipped, run.units_already_done, run.documents) == (2, 0, 0, 1)
    assert result.scores[0].pages == 2  # the PNG beside the PDF is no part of it either


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"AIMLAPI_API_KEY": TEST_KEY, "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, "-m", "ernie_batch.cli", "eval", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_gate_fails_the_worse_version_only_and_a_second_eval_sends_nothing(setup):
    tmp, sim, a, b, pdf, png = setup
    labels = write_labels(tmp / "labels.jsonl", pdf, None)
    gated = cli("-c", str(a), "-c", str(b), "--labels", str(labels), "--gate", "b.toml",
                "--max-drop", "0.02", "--json", cwd=tmp)
    assert gated.returncode == 6, gated.stderr
    assert "gate:" in gated.stderr and str(b) in gated.stderr
    first = json.loads(gated.stdout.strip().splitlines()[-1])
    assert [v["config"] for v in first["versions"]] == [str(a), str(b)]
    assert first["best"] == str(a)
    assert first["versions"][0]["accuracy"] == 14 / 18 and first["versions"][1]["accuracy"] == 10 / 18
    assert first["versions"][0]["fields"]["date"] == {"accuracy": 1.0, "n": 4}
    sent = len(sim.ledger()["entries"])
    assert sent == 8

    # the same versions again, gating the better one by its path as given: nothing is sent
    passed = cli("-c", str(a), "-c", str(b), "--labels", str(labels), "--gate", str(a),
                 "--json", cwd=tmp)
    assert passed.returncode == 0, passed.stderr
    assert len(sim.ledger()["entries"]) == sent
    second = json.loads(passed.stdout.strip().splitlines()[-1])
    assert [v["accuracy"] for v in second["versions"]] == [v["accuracy"] for v in first["versions"]]
    assert second["versions"][0]["credits_per_page"] == first["versions"][0]["credits_per_page"]
    # a drop within --max-drop passes
    lenient = cli("-c", str(a), "-c", str(b), "--labels", str(labels), "--gate", "b.toml",
                  "--max-drop", "0.25", "--quiet", cwd=tmp)
    assert lenient.returncode == 0, lenient.stderr
    assert len(read_table(tmp / "out", "runs")) == 6
    assert read_table(tmp / "out", "evals").to_pandas()["eval_id"].nunique() == 3


def test_a_bad_labels_line_is_a_usage_error_naming_file_and_line(setup):
    tmp, sim, a, b, pdf, png = setup
    labels = tmp / "labels.jsonl"
    labels.write_text(json.dumps({"path": "docs/invoice.pdf", "page": 1, "fields": {"title": "x"}})
                      + "\n{not json\n")
    res = cli("-c", str(a), "-c", str(b), "--labels", str(labels), cwd=tmp)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert f"{labels}:2: not JSON" in res.stderr
    res = cli("-c", str(a), "--labels", str(labels), "--gate", "c.toml", cwd=tmp)
    assert res.returncode == 2 and "--gate" in res.stderr
    assert sim.ledger()["entries"] == []


def test_sigterm_stops_the_eval_like_a_run_and_scores_nothing(tmp_path, sim_factory):
    import os
    import signal
    import time

    pdf, png = sample(tmp_path / "docs")
    sim = sim_factory(latency_s=2.0)
    a = write_version(tmp_path, "a", "VERSION-A", sim.url)
    b = write_version(tmp_path, "b", "VERSION-B", sim.url)
    labels = write_labels(tmp_path / "labels.jsonl", pdf, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"AIMLAPI_API_KEY": TEST_KEY, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen([sys.executable, "-m", "ernie_batch.cli", "eval", "-c", str(a),
                             "-c", str(b), "--labels", str(labels), "--grace", "0.5"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while sim.simulator.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "eval stopped: interrupted by SIGTERM" in stderr and "interrupted" in stdout
    runs = read_table(tmp_path / "out", "runs").to_pandas()
    assert runs["outcome"].tolist() == ["interrupted"]  # version b never started
    assert not (tmp_path / "out" / "evals").exists()
