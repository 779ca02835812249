"""Benchmark `evidence`: verification against a page's text layer, its speed, what it catches.

One run generates invoice pages with a text layer (numbers as `1,234.50`, `1.234,50` and
plain, dates as ISO, `05.01.2026`, `5 Jan 2026` and `January 5, 2026`, every fifth page turned
by `/Rotate`) and their truth, then measures
- pages/s of verification alone (`answers.verify.verify` over an answer, its quotes and the
  text layer the unit carries) against pdfium's raw text extraction of the same pages, each
  from its own one-page PDF as the units are (open it, load the page and its text page, read
  its text): the headline `ratio`, goal 0.5; `ratio_preopened` against the reading alone, the
  documents already open (opening costs pdfium more than reading a short page's text);
- the pipeline against the simulator answering from the truth with seeded misreads (every
  field at `MISREAD_RATE`): of the misread values, how many are not `verified` (recall, goal
  1.0); of the correct values of checkable fields, how many are (goal 0.99);
- the fuzzy location's threshold: true quotes with one or two characters changed that it
  locates, and quotes of other pages it wrongly locates, at `verify.FUZZY_THRESHOLD`;
- the demo's samples with and without evidence: credits per page.
Prints one JSON object (`python -m ernie_batch.bench.evidence [scale]`).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ernie_batch.demo.textpdf import Line, Page, text_pdf

MISREAD_RATE = 0.25
KEY = "sim-bench-evidence"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "invoice_number": {"type": "string"},
        "date": {"type": "string", "format": "date"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
        "line_items": {"type": "array", "items": {
            "type": "object", "properties": {"description": {"type": "string"},
                                             "amount": {"type": "number"}},
            "required": ["description", "amount"], "additionalProperties": False}},
        "subtotal": {"type": "number"},
        "tax": {"type": "number"},
        "total": {"type": "number"},
        "paid": {"type": "boolean"},
    },
    "required": ["title", "invoice_number", "date", "currency", "line_items", "total"],
    "additionalProperties": False,
}
WORDS = ("Paper", "Toner", "Stapler", "Chairs", "Desk lamp", "Cables", "Monitor", "Service",
         "Delivery", "Licence", "Folders", "Ink", "Whiteboard", "Keyboard", "Mouse pads")


def _money(value: float, style: int) -> str:
    text = f"{value:,.2f}"
    return text.replace(",", "X").replace(".", ",").replace("X", ".") if style == 1 else (
        text.replace(",", "") if style == 2 else text)


def _date(day: date, style: int) -> str:
    return (day.isoformat(), day.strftime("%d.%m.%Y"), f"{day.day} {day:%b %Y}",
            f"{day:%B} {day.day}, {day.year}")[style]


def invoice(i: int) -> tuple[Page, dict[str, Any]]:
    """One page and its truth."""
    rng = random.Random(i)
    items = [(f"{rng.choice(WORDS)} {rng.choice('ABCDEFGH')}{rng.randint(1, 99)}",
              round(rng.uniform(1, 4000), 2)) for _ in range(rng.randint(2, 8))]
    subtotal = round(sum(a for _, a in items), 2)
    tax = round(subtotal * 0.2, 2)
    total = round(subtotal + tax, 2)
    day = date(2026, 1, 1) + timedelta(days=rng.randint(0, 364))
    number = f"{2026}-{i:04d}"
    style, dstyle = rng.randint(0, 2), rng.randint(0, 3)
    title = f"{rng.choice(('Northwind', 'Contoso', 'Fabrikam', 'Litware'))} Supply {i}"
    lines = [Line(60, 70, title, 20), Line(60, 100, f"Invoice No. {number}"),
             Line(60, 118, f"Date: {_date(day, dstyle)}"), Line(60, 136, "Currency: EUR")]
    lines += [Line(60, 170 + 18 * n, f"{desc}   {_money(amount, style)} EUR")
              for n, (desc, amount) in enumerate(items)]
    y = 180 + 18 * len(items)
    lines += [Line(60, y + 10, f"Subtotal: {_money(subtotal, style)}"),
              Line(60, y + 28, f"VAT 20%: {_money(tax, style)}"),
              Line(60, y + 46, f"Total due: {_money(total, style)} EUR")]
    truth = {"title": title, "invoice_number": number, "date": day.isoformat(),
             "currency": "EUR", "subtotal": subtotal, "tax": tax, "total": total,
             "line_items": [{"description": d, "amount": a} for d, a in items], "paid": False}
    return Page(lines, rotate=90 if i % 5 == 4 else 0), truth


def write_corpus(folder: Path, n: int) -> dict[str, dict[str, Any]]:
    """`n` one-page invoices under `folder`; file name -> truth."""
    folder.mkdir(parents=True, exist_ok=True)
    truths = {}
    for i in range(n):
        page, truth = invoice(i)
        (folder / f"invoice-{i:04d}.pdf").write_bytes(text_pdf([page]))
        truths[f"invoice-{i:04d}.pdf"] = truth
    return truths


def _config(folder: Path, output: Path, evidence: bool, path: Path | None = None):  # noqa: ANN202
    """A job over `folder` (the bench's schema, or the config at `path`), against the
    simulator mounted in process: no rate limit, preparation inline."""
    from ernie_batch.config import load_config

    given: dict[str, Any] = {"api.base_url": "http://127.0.0.1:9/v1",
                             "sources.paths": [str(folder)], "output.path": str(output),
                             "prepare.workers": -1, "limits.rpm": 0,
                             "prompt.evidence": evidence}
    if path is None:
        given["prompt.schema"] = SCHEMA
    return load_config(path, given)


def _truth_map(cfg, truths: dict[str, dict[str, Any]]) -> dict[str, Any]:  # noqa: ANN001
    from ernie_batch.intake.content import parts_sha256
    from ernie_batch.intake.discover import discover
    from ernie_batch.intake.prepare import prepare_document
    from ernie_batch.intake.units import PageUnit

    docs, _ = discover(cfg.sources)
    return {parts_sha256(u.parts): truths[d.path.name] for d in docs
            for u in prepare_document(d, cfg.images, cfg.pdf) if isinstance(u, PageUnit)}


def run_mounted(cfg, settings) -> None:  # noqa: ANN001
    """One engine run against the simulator's ASGI app, in process."""
    import httpx
    from pydantic import SecretStr

    from ernie_batch.api.client import ApiClient
    from ernie_batch.run.engine import Pipeline
    from ernie_batch.sim import Simulator

    async def go() -> None:
        client = ApiClient("http://127.0.0.1:9/v1", SecretStr(KEY),
                           transport=httpx.ASGITransport(app=Simulator(settings).app))
        try:
            async with Pipeline(cfg, SecretStr(KEY), client=client) as run:
                await run.process(run.discover())
                await run.finish()
        finally:
            await client.aclose()

    asyncio.run(go())


def misread_figures(folder: Path, truths: dict[str, dict[str, Any]], work: Path) -> dict[str, Any]:
    """The pipeline on the corpus, the simulator misreading every field at MISREAD_RATE."""
    from ernie_batch.answers.evidence import leaves
    from ernie_batch.sim import SimSettings
    from ernie_batch.store import read_table

    cfg = _config(folder, work / "out", True)
    rates = {cfg.prompt.schema_name: {name: MISREAD_RATE for name in SCHEMA["properties"]}}
    run_mounted(cfg, SimSettings(api_key=KEY, scripted=_truth_map(cfg, truths),
                                 error_rates=rates, seed=7))
    misread = caught = correct = verified = 0
    statuses: dict[str, int] = {}
    for row in read_table(cfg.output.path, "pages").to_pylist():
        truth = dict((leaf.path, leaf.value) for leaf in leaves(truths[Path(row["source_path"]).name],
                                                                 SCHEMA))
        evidence = json.loads(row["evidence_json"] or "{}")
        for leaf in leaves(json.loads(row["answer_json"]), SCHEMA):
            status = evidence.get(leaf.path, {}).get("status")
            if leaf.mode is None:
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if leaf.path in truth and truth[leaf.path] == leaf.value:
                correct += 1
                verified += status == "verified"
            else:
                misread += 1
                caught += status != "verified"
    return {"misread_values": misread, "misreads_caught": caught,
            "misread_recall": caught / misread if misread else None, "goal_misread_recall": 1.0,
            "correct_values": correct, "correct_verified": verified,
            "correct_verified_share": verified / correct if correct else None,
            "goal_correct_verified_share": 0.99, "statuses": statuses}


def speed_figures(folder: Path, truths: dict[str, dict[str, Any]], rounds: int = 3) -> dict[str, Any]:
    """pages/s of verification alone and of pdfium's raw text extraction, same pages."""
    import pypdfium2 as pdfium

    from ernie_batch.answers.verify import verify
    from ernie_batch.intake.text import pdf_texts
    from ernie_batch.sim.evidence import find, leaves

    files = sorted(folder.glob("*.pdf"))
    data = [f.read_bytes() for f in files]
    layers = [pdf_texts(d, 1) for d in data]
    work = []
    for f, layer in zip(files, layers, strict=True):
        truth = truths[f.name]
        lines = [ln for p in layer or () for ln in p.text.splitlines() if ln.strip()]
        quotes = {path: (hit[0] if (hit := find(value, lines)) else None)
                  for path, value in leaves(truth)}
        work.append((truth, quotes, layer))
    docs = [pdfium.PdfDocument(d) for d in data]

    def extract() -> None:  # each page from its own PDF, as the units are: open, page, text
        for d in data:
            doc = pdfium.PdfDocument(d)
            _read_text(doc)
            doc.close()

    def extract_open() -> None:  # the documents already open: the page and its text only
        for doc in docs:
            _read_text(doc)

    def check() -> None:
        for truth, quotes, layer in work:
            verify(truth, quotes, SCHEMA, layer)

    raw, preopened, ours = [], [], []
    for _ in range(rounds):  # alternately, the best of each: the same machine load for all
        for fn, into in ((extract, raw), (extract_open, preopened), (check, ours)):
            t0 = time.perf_counter()
            fn()
            into.append(len(files) / (time.perf_counter() - t0))
    for doc in docs:
        doc.close()
    return {"pages": len(files), "verify_pages_per_s": max(ours),
            "pdfium_text_pages_per_s": max(raw), "ratio": max(ours) / max(raw),
            "pdfium_text_preopened_pages_per_s": max(preopened),
            "ratio_preopened": max(ours) / max(preopened)}


def _read_text(doc) -> None:  # noqa: ANN001 - a pypdfium2 PdfDocument
    page = doc[0]
    textpage = page.get_textpage()
    textpage.get_text_range()
    textpage.close()
    page.close()


def fuzzy_figures(truths: dict[str, dict[str, Any]], folder: Path) -> dict[str, Any]:
    """At the threshold: true lines with 1-2 characters changed located; other pages' lines
    (absent from the page) located."""
    from ernie_batch.answers.verify import FUZZY_MIN_CHARS, FUZZY_THRESHOLD, _Page, fold
    from ernie_batch.intake.text import pdf_texts

    rng = random.Random(3)
    files = sorted(folder.glob("*.pdf"))[:60]
    pages = [_Page(pdf_texts(f.read_bytes(), 1)[0]) for f in files]
    lines = [[ln.strip() for ln in p.page.text.splitlines() if len(ln.strip()) >= FUZZY_MIN_CHARS]
             for p in pages]
    positives = negatives = located_pos = located_neg = 0
    for i, page in enumerate(pages):
        for line in lines[i]:
            chars = list(line)
            for _ in range(rng.randint(1, 2)):
                at = rng.randrange(len(chars))
                chars[at] = rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
            positives += 1
            located_pos += bool(page.spans(fold("".join(chars))))
        other = lines[(i + 1) % len(pages)]
        for line in other:
            if fold(line) in page.norm.folded:
                continue
            negatives += 1
            located_neg += bool(page.spans(fold(line)))
    return {"threshold": FUZZY_THRESHOLD, "min_chars": FUZZY_MIN_CHARS,
            "perturbed_true_located": located_pos / positives if positives else None,
            "absent_lines_located": located_neg / negatives if negatives else None}


def demo_cost(work: Path) -> dict[str, Any]:
    """Credits per page of the demo's samples without and with evidence, the simulator
    answering both from the samples' labels (same answers: the difference is the evidence)."""
    from ernie_batch.demo import CONFIG, LABELS, SAMPLES, demo_home
    from ernie_batch.evaluation import read_labels
    from ernie_batch.evaluation.truth import truth_map
    from ernie_batch.sim import SimSettings
    from ernie_batch.store import read_table

    out: dict[str, Any] = {}
    with demo_home() as home:
        for evidence in (False, True):
            cfg = _config(home / SAMPLES, work / f"demo-{evidence}", evidence, home / CONFIG)
            truth = truth_map(read_labels(home / LABELS), cfg)
            run_mounted(cfg, SimSettings(api_key=KEY, scripted=truth))
            pages = read_table(cfg.output.path, "pages").to_pylist()
            name = "with_evidence" if evidence else "without_evidence"
            out[f"credits_per_page_{name}"] = sum(r["credits"] for r in pages) / len(pages)
            out[f"completion_tokens_per_page_{name}"] = (
                sum(r["completion_tokens"] for r in pages) / len(pages))
    return out


def run(scale: float = 1.0) -> dict[str, Any]:
    """See the module docstring; `scale` multiplies the 200 pages."""
    n = max(10, int(200 * scale))
    with tempfile.TemporaryDirectory(prefix="ernie-bench-evidence-") as tmp:
        work = Path(tmp)
        truths = write_corpus(work / "corpus", n)
        speed = speed_figures(work / "corpus", truths)
        caught = misread_figures(work / "corpus", truths, work)
        fuzzy = fuzzy_figures(truths, work / "corpus")
        demo = demo_cost(work)
    return {"scenario": "evidence", "ratio": speed.pop("ratio"), "goal": 0.5, **speed, **caught,
            "fuzzy": fuzzy, "demo": demo}


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)))
