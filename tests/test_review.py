"""The review page without a browser: what it holds, what it escapes, what it checks.

The outputs are made by real runs (the engine with the simulator mounted in process: the
wire is not what these tests are about) over files made here, some with hostile names, and
a schema whose answers are hostile markup (`const` values the simulator must return).
The browser tests (tests/test_review_browser.py, `slow`) open what these build.
"""

from __future__ import annotations

import asyncio
import html
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from ernie_batch.review import build_review
from ernie_batch.review.gather import conflict_fields
from ernie_batch.review.page import json_island
from ernie_batch.review.static import CSP, SCRIPT
from ernie_batch.sim import FaultRates, SimSettings, Simulator
from ernie_batch.store import append_rows, read_table
from tests.conftest import TEST_KEY, job_config, run_mounted
from tests.test_chaos import make_corpus

BASE = "http://127.0.0.1:9/v1"  # never dialled: the simulator's app is the transport
SCRIPT_VALUE = "<script>window.__pwned = 1; alert('title')</script>"
IMG_VALUE = "<img src=x onerror=\"window.__pwned = 2; alert('summary')\">"
HOSTILE_NAME = "<img src=x onerror=alert(3)>.png"
HOSTILE_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "const": SCRIPT_VALUE},
        "summary": {"type": "string", "const": IMG_VALUE},
        "date": {"type": ["string", "null"], "enum": [None, "2026-01-01"]},
        "total_amount": {"type": ["number", "null"]},
    },
    "required": ["title", "summary", "date", "total_amount"],
    "additionalProperties": False,
}


@dataclass
class Reviewed:
    src: Path
    out: Path
    overrides: dict
    pages: int  # rows in `pages`

    def config(self, **more):
        return job_config(BASE, self.out, [self.src], **{**self.overrides, **more})


def make_sources(src: Path, images: int = 4, pdf_pages: int = 3) -> None:
    """Images and a PDF (chaos's generator), a hostile file name, a truncated PNG, a subfolder."""
    from PIL import Image

    make_corpus(src, images=images, pdf_pages=pdf_pages, seed=7)
    make_corpus(src / "sub", images=2, pdf_pages=1, seed=8)
    (src / "sub" / "bundle.pdf").unlink()
    Image.new("RGB", (90, 60), (200, 30, 90)).save(src / HOSTILE_NAME)
    (src / "truncated.png").write_bytes((src / HOSTILE_NAME).read_bytes()[:60])


def run_once(cfg, faults: FaultRates | None = None, seed: int = 3) -> None:
    run_mounted(cfg, Simulator(SimSettings(api_key=TEST_KEY, faults=faults or FaultRates(),
                                           seed=seed)).app)


def reviewed_output(root: Path, **overrides) -> Reviewed:
    """One run over make_sources' files with the hostile schema; some answers invalid."""
    src, out = root / "in", root / "out"
    make_sources(src)
    values = {"prompt.schema_file": None, "prompt.schema": HOSTILE_SCHEMA,
              "retries.answer": 0, **overrides}
    r = Reviewed(src, out, values, 0)
    run_once(r.config(), FaultRates(invalid_answer=0.3), seed=5)
    r.pages = read_table(out, "pages").num_rows
    return r


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory) -> Reviewed:
    return reviewed_output(tmp_path_factory.mktemp("review"))


def cards_of(text: str) -> list[dict]:
    """The filter data of one review file (what its script works on)."""
    block = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', text,
                      re.S)
    assert block, "no data block"
    return json.loads(block.group(1))["cards"]


def all_runs(out: Path) -> list[str]:
    return sorted(set(read_table(out, "pages")["run_id"].to_pylist()))


# ------------------------------------------------------------------ what the page holds


def test_every_page_is_a_card_and_hostile_values_are_text(reviewed, tmp_path):
    result = build_review(reviewed.config(), all_runs(reviewed.out), tmp_path / "review.html")
    text = result.files[0].read_text(encoding="utf-8")
    assert len(result.files) == 1 and result.pages == reviewed.pages
    assert text.count('<article class="card') == reviewed.pages == len(cards_of(text))
    # the hostile answers and the hostile file name appear only escaped
    for value in (SCRIPT_VALUE, IMG_VALUE, HOSTILE_NAME):
        assert value not in text
    assert "&lt;script&gt;window.__pwned = 1;" in text
    assert "&lt;img src=x onerror=&quot;window.__pwned = 2;" in text
    assert "&lt;img src=x onerror=alert(3)&gt;.png" in text
    # the only scripts are the data block and the page's own, allowed by its hash
    assert re.findall(r"<script[^>]*>", text) == ['<script type="application/json" id="review-data">',
                                                  "<script>"]
    assert f"<script>{SCRIPT}</script>" in text
    head = text[: text.index("</head>")]
    assert head.index("Content-Security-Policy") < head.index("<title>")
    assert "default-src 'none'" in CSP and "script-src 'sha256-" in CSP
    assert "unsafe-inline" not in CSP.split("script-src")[1].split(";")[0]
    # nothing to fetch: every image is inline, no attribute points anywhere else
    assert all(src.startswith("data:image/") for src in re.findall(r'<img[^>]* src="([^"]*)"', text))
    assert not re.search(r'\s(?:src|href|action|xlink:href)="(?!data:|#|review)', text)
    assert text.count("<svg") == 3  # credits, statuses, latency


def test_cards_come_odd_ones_first_with_their_numbers(reviewed, tmp_path):
    result = build_review(reviewed.config(), all_runs(reviewed.out), tmp_path / "r.html")
    cards = cards_of(result.files[0].read_text(encoding="utf-8"))
    pages = read_table(reviewed.out, "pages").to_pandas()
    statuses = [c["status"] for c in cards]
    assert sorted(statuses) == sorted(pages["status"])
    assert {"ok", "invalid_answer", "input_error"} <= set(statuses)
    failed = [i for i, s in enumerate(statuses) if s in ("invalid_answer", "input_error")]
    assert failed == list(range(len(failed)))  # failures lead
    ok = [c for c in cards if c["status"] == "ok"]
    empty_first = [bool(c["empty"]) for c in ok]
    assert empty_first == sorted(empty_first, reverse=True)  # then pages with empty fields
    assert any(c["empty"] == ["date"] for c in ok) and any(not c["empty"] for c in ok)
    assert {c["folder"] for c in cards} == {str(reviewed.src), str(reviewed.src / "sub")}
    assert pytest.approx(sum(c["credits"] for c in cards)) == pages["credits"].sum()


def test_only_the_statuses_asked_for(reviewed, tmp_path):
    result = build_review(reviewed.config(), all_runs(reviewed.out), tmp_path / "r.html",
                          statuses=["invalid_answer"])
    cards = cards_of(result.files[0].read_text(encoding="utf-8"))
    pages = read_table(reviewed.out, "pages").to_pandas()
    assert len(cards) == (pages["status"] == "invalid_answer").sum() > 0
    assert {c["status"] for c in cards} == {"invalid_answer"}


def test_the_data_block_cannot_be_closed_by_a_value():
    hostile = {"v": "</script><script>alert(1)</script><!-- & -->"}
    text = json_island(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == hostile


@pytest.mark.parametrize("text, fields", [
    ('{"date": ["2026-01-01", "2026-02-01"], "total": [1, 2]}', ("date", "total")),
    ('[{"field": "date", "values": [1, 2]}, "total", 3]', ("date", "total")),
    ("not json", ()), (None, ()), ("42", ()),
])
def test_conflicts_json_is_read_defensively(text, fields):
    assert conflict_fields(text) == fields


# ------------------------------------------------------------------ thumbnails


def make_text_pdf(path: Path, pages: int, rng: random.Random) -> None:
    """A digital document: every page ~45 lines of distinct text (Helvetica, vector)."""
    import pikepdf

    words = ("invoice total amount due payment account reference supplier customer order "
             "delivery quantity price tax net gross date number item service period terms "
             "balance statement credit debit remittance bank transfer receipt").split()
    pdf = pikepdf.new()
    font = pdf.make_indirect(pikepdf.Dictionary(Type=pikepdf.Name.Font,
                                                Subtype=pikepdf.Name.Type1,
                                                BaseFont=pikepdf.Name.Helvetica))
    for n in range(pages):
        lines = [f"{path.stem} page {n + 1}"] + [
            " ".join(rng.choice(words) for _ in range(rng.randint(6, 12)))
            + f" {rng.randint(1, 99999)}" for _ in range(45)]
        ops = ["BT", "/F1 16 Tf", "56 790 Td", f"({lines[0]}) Tj", "/F1 10 Tf", "0 -28 Td"]
        for line in lines[1:]:
            ops += [f"({line}) Tj", "0 -15 Td"]
        ops.append("ET")
        page = pdf.add_blank_page(page_size=(595, 842))
        page.Resources = pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font))
        page.Contents = pdf.make_stream("\n".join(ops).encode("latin-1"))
    pdf.save(path)


def test_a_dense_text_page_stays_legible_within_the_budget(tmp_path):
    """A text page is a 4-grey PNG at a size a JPEG of the same budget cannot reach; a grey
    photo stays a JPEG (four greys would posterize it)."""
    import io

    from PIL import Image

    from ernie_batch.config import PdfOptions
    from ernie_batch.intake.pdf import open_for_rendering, render_page
    from ernie_batch.review.thumbs import ThumbOptions, encode_thumb

    make_text_pdf(tmp_path / "dense.pdf", 1, random.Random(1))
    doc = open_for_rendering(tmp_path / "dense.pdf", PdfOptions())
    try:
        data, mime, _ = encode_thumb(lambda side: render_page(doc, 1, side),
                                     ThumbOptions(800, 15000))
        jpeg, _, _ = encode_thumb(lambda side: render_page(doc, 1, side).convert("RGB").convert(
            "RGBA"), ThumbOptions(800, 15000))  # RGBA: not seen as grey, so JPEG only
    finally:
        doc.close()
    assert mime == "image/png" and len(data) <= 15000
    png_side, jpeg_side = (max(Image.open(io.BytesIO(d)).size) for d in (data, jpeg))
    assert png_side >= 600 and png_side > 1.5 * jpeg_side
    photo = Image.radial_gradient("L").resize((600, 400))  # greys all over, like a photo
    _, mime, _ = encode_thumb(lambda side: photo.resize((side, side * 2 // 3)),
                              ThumbOptions(800, 15000))
    assert mime == "image/jpeg"


def previews_by_path(text: str) -> dict[str, list[str]]:
    """Source path -> the media block of each of its cards (thumbnail or placeholder)."""
    found: dict[str, list[str]] = {}
    for card in re.findall(r'<article class="card.*?</article>', text, re.S):
        path = re.search(r'<span class="path">(.*?)</span>', card).group(1)
        media = re.search(r'<div class="media">(.*?)</div><div class="body">', card, re.S).group(1)
        found.setdefault(html.unescape(path), []).append(media)
    return found


def test_thumbnails_are_the_pages_sent_and_small(reviewed, tmp_path):
    import base64

    cfg = reviewed.config()
    text = build_review(cfg, all_runs(reviewed.out), tmp_path / "r.html").files[0].read_text(
        encoding="utf-8")
    media = previews_by_path(text)
    pages = read_table(reviewed.out, "pages").to_pandas()
    for row in pages[pages["content_sha256"].notna()].itertuples():
        blocks = media[row.source_path]
        assert all("✓ the media sent" in b for b in blocks), row.source_path
    assert len(media[str(reviewed.src / "bundle.pdf")]) == 3
    images = re.findall(r'src="data:image/(?:jpeg|png);base64,([^"]+)"', text)
    assert len(images) == (pages["content_sha256"].notna()).sum()
    sizes = [len(base64.b64decode(b)) for b in images]
    assert max(sizes) <= cfg.review.thumb_bytes
    # the truncated PNG never became a page: its card says why instead of a picture
    truncated = media[str(reviewed.src / "truncated.png")][0]
    assert 'class="ph"' in truncated and "no preview" in truncated


def test_rendered_pdf_pages_are_checked_too(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_corpus(src, images=0, pdf_pages=4, seed=11)
    cfg = job_config(BASE, out, [src], **{"pdf.mode": "image"})
    run_once(cfg)
    text = build_review(cfg, all_runs(out), tmp_path / "r.html").files[0].read_text(
        encoding="utf-8")
    assert text.count("✓ the media sent") == 4


def test_a_source_gone_or_changed_shows_a_placeholder(tmp_path):
    r = reviewed_output(tmp_path)
    gone, changed = r.src / "scan-000.jpg", r.src / "scan-001.png"
    gone.unlink()
    changed.write_bytes(changed.read_bytes() + b"\0")
    text = build_review(r.config(), all_runs(r.out), tmp_path / "r.html").files[0].read_text(
        encoding="utf-8")
    media = previews_by_path(text)
    assert media[str(gone)] == ['<div class="ph">source gone: No such file or directory</div>']
    assert 'class="ph"' in media[str(changed)][0] and "source changed" in media[str(changed)][0]
    assert "✓ the media sent" in media[str(r.src / "scan-002.jpg")][0]


def test_options_changed_since_the_run_are_said_not_hidden(reviewed, tmp_path):
    cfg = reviewed.config(**{"images.max_side": 64})  # not what the run sent
    text = build_review(cfg, all_runs(reviewed.out), tmp_path / "r.html").files[0].read_text(
        encoding="utf-8")
    media = previews_by_path(text)
    scan = media[str(reviewed.src / "scan-002.jpg")][0]
    assert "<img" in scan and 'class="check differs"' in scan
    assert "✓ the media sent" in media[str(reviewed.src / "bundle.pdf")][0]  # split as before


# ------------------------------------------------------------------ files, filters, CLI


def test_past_pages_per_file_the_review_splits_into_linked_files(reviewed, tmp_path):
    cfg = reviewed.config(**{"review.pages_per_file": 4})
    result = build_review(cfg, all_runs(reviewed.out), tmp_path / "review.html")
    n = -(-reviewed.pages // 4)
    assert [p.name for p in result.files] == ["review.html"] + [f"review-{i}.html"
                                                                 for i in range(2, n + 1)]
    texts = [p.read_text(encoding="utf-8") for p in result.files]
    assert sum(len(cards_of(t)) for t in texts) == reviewed.pages
    for i, (path, t) in enumerate(zip(result.files, texts, strict=True), 1):
        links = dict(re.findall(r'<a href="([^"]+)">part (\d+)</a>', t))
        assert set(links) == {p.name for p in result.files} - {path.name}
        assert f"<strong>part {i}</strong>" in t


def write_documents(out: Path, rows: list[dict]) -> None:
    append_rows(out, "documents", pa.Table.from_pylist(rows), "2026-01-01")


def test_the_conflicts_filter_appears_with_the_documents_table(reviewed, tmp_path):
    import shutil

    runs = all_runs(reviewed.out)
    without = tmp_path / "out-without-documents"  # as written before documents existed
    shutil.copytree(reviewed.out, without)
    shutil.rmtree(without / "documents", ignore_errors=True)
    cfg = reviewed.config(**{"output.path": str(without)})
    before = build_review(cfg, runs, tmp_path / "a.html").files[0].read_text(encoding="utf-8")
    assert 'id="f-conflicts"' not in before
    pages = read_table(reviewed.out, "pages").to_pandas()
    bundle = pages[pages["source_path"].str.endswith("bundle.pdf")].iloc[0]
    from datetime import UTC, datetime

    documents = tmp_path / "out-with-documents"
    shutil.copytree(without, documents)
    older = {"key": "k1", "source_sha256": bundle.source_sha256, "fingerprint": bundle.fingerprint,
             "conflicts_json": '{"total_amount": [1, 2]}', "built_at": datetime(2026, 1, 1, tzinfo=UTC)}
    newer = {**older, "conflicts_json": '{"date": ["2026-01-01", null]}',
             "built_at": datetime(2026, 1, 2, tzinfo=UTC)}
    write_documents(documents, [older, newer])
    cfg = reviewed.config(**{"output.path": str(documents)})
    text = build_review(cfg, runs, tmp_path / "b.html").files[0].read_text(encoding="utf-8")
    assert 'id="f-conflicts"' in text
    cards = cards_of(text)
    marked = [c for c in cards if c["conflicts"]]
    assert len(marked) == (pages["source_path"] == bundle.source_path).sum() == 3
    assert all(c["conflicts"] == ["date"] for c in marked)  # the newest build of the key


def test_cli_review(reviewed, tmp_path):
    from ernie_batch.cli import app

    runner = CliRunner()
    cfg = tmp_path / "job.toml"
    cfg.write_text(f"[output]\npath = {json.dumps(str(reviewed.out))}\n")
    html = tmp_path / "cli" / "review.html"
    res = runner.invoke(app, ["review", "-c", str(cfg), "--status", "ok", "--html", str(html)])
    assert res.exit_code == 0, res.output
    assert "pages of the newest run" in res.output and html.exists()
    assert {c["status"] for c in cards_of(html.read_text(encoding="utf-8"))} == {"ok"}
    res = runner.invoke(app, ["review", "-c", str(cfg), "--status", "fine"])
    assert res.exit_code == 2 and "unknown status fine" in res.output
    res = runner.invoke(app, ["review", "-c", str(cfg), "--since", "yesterday"])
    assert res.exit_code == 2 and "--since" in res.output
    res = runner.invoke(app, ["review", "-c", str(cfg), "--output", str(tmp_path / "none"),
                              "--html", str(tmp_path / "none.html")])
    assert res.exit_code == 0 and "no pages" in res.output
    assert not (tmp_path / "none.html").exists()


# ------------------------------------------------------------------ the end of a run


def test_a_run_with_review_html_writes_its_review_and_names_it(prefect_harness, sim_factory,
                                                              api_env, tmp_path):
    """`[review] html = true`: the ingest flow writes OUTPUT/review/<run_id>.html after the
    manifest, and the summary and the run's markdown artifact name it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ingest import ingest
    from tests.conftest import PROJECT

    sim = sim_factory()
    src, out = tmp_path / "in", tmp_path / "out"
    make_corpus(src, images=2, pdf_pages=2, seed=21)
    overrides = {"api.base_url": sim.url, "sources.paths": [str(src)], "output.path": str(out),
                 "prepare.workers": -1, "review.html": True}
    summary = asyncio.run(ingest(config_path=str(PROJECT / "configs" / "demo.toml"),
                                 overrides=overrides))
    path = out / "review" / f"{summary['run_id']}.html"
    assert summary["review_html"] == str(path) and path.exists()
    assert len(cards_of(path.read_text(encoding="utf-8"))) == summary["units_ok"] == 4

    async def markdown() -> list[str]:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["ernie-batch-ingest-report"])))
            return [a.data for a in found]

    assert any(f"**review**: {path}" in text and summary["run_id"] in text
               for text in asyncio.run(markdown()))


def test_commands_that_select_runs_say_a_bad_date_in_one_line(reviewed, tmp_path):
    """`report` and `documents` crashed with a traceback on `--since yesterday` once runs
    existed; the check now sits where every such command builds its selection."""
    from ernie_batch.cli import app

    runner = CliRunner()
    cfg = tmp_path / "job.toml"
    cfg.write_text(f"[output]\npath = {json.dumps(str(reviewed.out))}\n")
    for command in ("report", "documents", "review"):
        res = runner.invoke(app, [command, "-c", str(cfg), "--until", "yesterday"])
        assert res.exit_code == 2 and "--until" in res.output, (command, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), command
