"""Evidence per field: values read as values, quotes located in the page's own text layer,
statuses a user can trust, the request within the vendor's rules, the simulator's misreads
caught through the whole pipeline, and real-world PDFs that never crash it."""

from __future__ import annotations

import json
from pathlib import Path

import pikepdf
import pytest

from ernie_batch.answers import evidence, prompt
from ernie_batch.answers.judge import judge
from ernie_batch.answers.merged_evidence import field_status
from ernie_batch.answers.values import as_dates, dates_in, numbers_in
from ernie_batch.answers.verify import counts, verify
from ernie_batch.config import load_config
from ernie_batch.demo.textpdf import Line, Page, text_pdf
from ernie_batch.intake.text import pdf_texts
from ernie_batch.vocab import EvidenceStatus as S
from tests.conftest import CORPUS, PROJECT

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "kind": {"type": "string", "enum": ["invoice", "letter"]},
        "paid": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 400},
        "language": {"type": "string", "x-evidence": False},
        "code": {"type": "string", "x-evidence": "case-sensitive"},
        "date": {"type": "string"},
        "total": {"type": "number"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "description": {"type": "string"}, "amount": {"type": "number"}}}},
    },
}
LINES = ["INVOICE 2026-0117", "Date: 5 Jan 2026", "Reference code AbC-77",
         "Paper, A4, 5 reams   24.50 EUR", "Toner cartridge   1.234,50 EUR",
         "Total due: 99.66 EUR", "This invoice concerns the refur-", "bishment of the office"]


def pages_of(lines: list[str], rotate: int = 0) -> tuple:
    pdf = text_pdf([Page([Line(60, 80 + 20 * i, t) for i, t in enumerate(lines)], rotate=rotate)])
    return pdf_texts(pdf, 1)


def test_numbers_and_dates_are_compared_as_values() -> None:
    assert {1234.5, 24.5} <= {float(n) for n in numbers_in("1,234.50 and 24.50 EUR")}
    assert 1234.5 in {float(n) for n in numbers_in("Summe 1.234,50 €")}
    assert 99.66 in {float(n) for n in numbers_in("Total due: 99.66")}
    assert 96.66 not in {float(n) for n in numbers_in("Total due: 99.66")}
    # digits glued by a dash are an id or a date, never a number; a lone minus is a sign
    assert numbers_in("INVOICE 2026-0117, plots 1-12") == set()
    assert -5 in numbers_in("discount -5.00")
    day = as_dates("2026-01-05")
    assert day and day <= dates_in("05.01.2026") and day <= dates_in("on 5 Jan 2026")
    assert day <= dates_in("January 5, 2026") and not day & dates_in("2026-01-06")


def test_each_field_gets_its_status_against_the_page() -> None:
    answer = {"title": "Invoice 2026-0117", "kind": "invoice", "paid": False, "summary": "s",
              "language": "en", "code": "abc-77", "date": "2026-01-05", "total": 96.66,
              "items": [{"description": "Paper, A4, 5 reams", "amount": 24.5},
                        {"description": "Toner cartridge", "amount": 1234.5}]}
    quotes = {"title": "INVOICE 2026-0117", "date": "Date: 5 Jan 2026",
              "code": "Reference code AbC-77", "total": "Total due: 99.66 EUR",
              "items[0].description": "Paper, A4, 5 reams", "items[0].amount": "24.5",
              "items[1].description": "Toner  cartridge", "items[1].amount": "Toner cartridge 1.234,50"}
    got = verify(answer, quotes, SCHEMA, pages_of(LINES))
    status = {p: e.status for p, e in got.items()}
    assert status == {
        "title": S.VERIFIED, "kind": S.NOT_CHECKED, "paid": S.NOT_CHECKED,
        "summary": S.NOT_CHECKED, "language": S.NOT_CHECKED,
        "code": S.VALUE_NOT_IN_QUOTE,  # case-sensitive: abc-77 is not AbC-77
        "date": S.VERIFIED, "total": S.VALUE_NOT_IN_QUOTE,  # 96.66 misread from 99.66
        "items[0].description": S.VERIFIED, "items[0].amount": S.VERIFIED,
        "items[1].description": S.VERIFIED, "items[1].amount": S.VERIFIED}
    # the quote `24.5` matched inside `24.50`: the span is the page's whole token
    assert got["items[0].amount"].span == "24.50" and got["total"].span == "Total due: 99.66 EUR"
    assert counts(got) == (6, 8)
    box = got["title"].box
    assert box is not None and 0.09 < box[0] < 0.11 and box[1] < box[3] < 0.2 and box[2] < 0.5
    assert got["total"].box is None  # only verified fields are drawn


def test_a_misread_quote_a_missing_one_and_a_page_without_text() -> None:
    pages = pages_of(LINES)
    answer = {"title": "INVOICE 2026-0117", "total": 96.66, "date": "2026-01-05"}
    got = verify(answer, {"title": None, "total": "Total due: 96.66 EUR"}, SCHEMA, pages)
    assert got["total"].status != S.VERIFIED  # fuzzy may find the line; never the value
    assert got["title"].status == S.NO_QUOTE and got["date"].status == S.NO_QUOTE
    assert verify(answer, {"title": "Somewhere else entirely"}, SCHEMA, pages)[
        "title"].status == S.QUOTE_NOT_ON_PAGE
    for none in (None, pages_of([])):  # an image; a scan without text
        assert {e.status for e in verify(answer, {"title": "x"}, SCHEMA, none).values()} == {
            S.NO_TEXT_LAYER}


def test_normalisation_joins_hyphenated_words_and_folds_ligatures_and_case() -> None:
    pages = pages_of(LINES)
    got = verify({"title": "refurbishment"}, {"title": "the refurbishment of the office"},
                 SCHEMA, pages)
    assert got["title"].status == S.VERIFIED
    ligature = text_pdf([Page([Line(60, 80, "Total")])])  # then swap in U+FB01 by hand
    layer = pdf_texts(ligature, 1)[0]
    swapped = type(layer)(1, "\ufb01nal total", layer.boxes + layer.boxes[:24], layer.matrix)
    got = verify({"title": "Final Total"}, {"title": "FINAL TOTAL"}, SCHEMA, (swapped,))
    assert got["title"].status == S.VERIFIED


def test_the_box_is_where_the_page_is_displayed_after_its_rotate() -> None:
    answer, quotes = {"total": 99.66}, {"total": "Total due: 99.66 EUR"}
    flat = verify(answer, quotes, SCHEMA, pages_of(LINES))["total"].box
    turned = verify(answer, quotes, SCHEMA, pages_of(LINES, rotate=90))["total"].box
    assert flat and turned
    # turned a quarter clockwise: the line runs down the page, its left edge near the top
    assert (flat[2] - flat[0]) > (flat[3] - flat[1]) and (turned[3] - turned[1]) > (turned[2] - turned[0])
    assert turned[1] == pytest.approx(flat[0], abs=0.01)


def type3_pdf_without_tounicode() -> bytes:
    """A page whose glyphs are drawn by a Type 3 font with made-up glyph names and no
    ToUnicode map: visible squares, a text layer of nothing readable."""
    pdf = pikepdf.new()
    glyph = pdf.make_stream(b"1000 0 0 0 750 750 d1 0 0 700 700 re f")
    names = [pikepdf.Name(f"/g{i}") for i in range(10)]
    font = pdf.make_indirect(pikepdf.Dictionary(
        Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type3, FontBBox=[0, 0, 750, 750],
        FontMatrix=[0.001, 0, 0, 0.001, 0, 0], FirstChar=48, LastChar=57,
        Widths=[1000] * 10, CharProcs=pikepdf.Dictionary({str(n): glyph for n in names}),
        Encoding=pikepdf.Dictionary(Type=pikepdf.Name.Encoding, Differences=[48, *names]),
        Resources=pikepdf.Dictionary()))
    content = b"BT /F1 24 Tf 72 700 Td (5501234) Tj ET"
    pdf.pages.append(pikepdf.Page(pikepdf.Dictionary(
        Type=pikepdf.Name.Page, MediaBox=[0, 0, 612, 792], Contents=pdf.make_stream(content),
        Resources=pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font)))))
    out = __import__("io").BytesIO()
    pdf.save(out)
    return out.getvalue()


def test_a_garbage_text_layer_never_verifies_what_is_not_visibly_there() -> None:
    layers = pdf_texts(type3_pdf_without_tounicode(), 1)
    assert layers is not None
    got = verify({"total": 5501234, "title": "TOTAL 5.50"},
                 {"total": "5501234", "title": "TOTAL 5.50"}, SCHEMA, layers)
    assert S.VERIFIED not in {e.status for e in got.values()}
    garbage = type(layers[0])(1, "\ufffd\ufffd\ufffd 55 \ufffd\ufffd\ufffd\ufffd", b"\0" * 16 * 12,
                              layers[0].matrix)
    assert verify({"total": 55}, {"total": "55"}, SCHEMA, (garbage,))["total"].status == (
        S.NO_TEXT_LAYER)


def test_judge_sets_the_evidence_apart_before_validating() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}},
              "required": ["title"], "additionalProperties": False}
    wrapped = json.dumps({"answer": {"title": "A"}, "evidence": {"title": "A", "x": 5}})
    v = judge(wrapped, "stop", schema, evidence=True)
    assert v.value == {"title": "A"} and v.quotes == {"title": "A", "x": "5"}
    flat = judge('{"title": "A", "evidence": {"title": ["odd"]}}', "stop", schema, evidence=True)
    assert flat.value == {"title": "A"} and flat.quotes == {"title": None}
    plain = judge('{"title": "A"}', "stop", schema, evidence=True)
    assert plain.value == {"title": "A"} and plain.quotes == {}
    assert judge('{"answer": {"title": 1}, "evidence": {}}', "stop", schema, True).value is None
    assert judge(wrapped, "stop", schema).value is None  # off: the wrapper is no answer


def test_the_request_asks_for_one_quote_per_checkable_path_and_the_fingerprint_moves() -> None:
    cfg = load_config(PROJECT / "configs" / "demo.toml")
    on = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"evidence": True})})
    assert prompt.fingerprint(on) != prompt.fingerprint(cfg)
    # without evidence, jobs keep the fingerprints they had before it existed (computed on the
    # commit before it): no page is sent again for an upgrade, x-evidence marks included
    assert prompt.fingerprint(load_config(None)) == (
        "1972bfcc96d98cc143551005b89f1808d8205be4d7a9cb98f7cb658a75639a86")
    assert prompt.fingerprint(cfg) == (
        "c9f52bc27c7d71ed35cc919410a447492deaa10560f309de825456f70220f20d")
    fmt = prompt.response_format(on, "json_schema")
    wrapper = fmt["json_schema"]["schema"]
    assert set(wrapper["properties"]) == {"answer", "evidence"}
    assert wrapper["properties"]["answer"] == cfg.resolved.sent_schema
    asked = wrapper["properties"]["evidence"]
    assert asked["additionalProperties"] is False  # strict: every path named
    assert {"title", "date", "total_amount", "line_items[0].amount",
            "line_items[19].description"} <= set(asked["properties"])
    assert not {"document_type", "summary", "language", "keywords[0]"} & set(asked["properties"])
    assert evidence.extra_completion_tokens(cfg.resolved.schema) > 0


def test_fields_of_a_list_have_one_status() -> None:
    entries = {"items[0].amount": {"status": "verified"}, "items[1].amount": {"status": "no_quote"},
               "title": {"status": "verified"}, "kind": {"status": "not_checked"}}
    assert field_status(entries, "items") == S.NO_QUOTE
    assert field_status(entries, "title") == S.VERIFIED
    assert field_status(entries, "kind") == S.NOT_CHECKED


def test_the_pipeline_catches_every_misread_of_the_simulator(tmp_path) -> None:
    """Through the engine and the simulator, which quotes the page it reads and misreads a
    quarter of all fields (half of them with the misread value written into the quote)."""
    from ernie_batch.bench.evidence import misread_figures, write_corpus

    truths = write_corpus(tmp_path / "corpus", 16)
    got = misread_figures(tmp_path / "corpus", truths, tmp_path)
    assert got["misread_values"] > 10 and got["misread_recall"] == 1.0
    assert got["correct_verified_share"] >= 0.99
    assert got["statuses"].get("quote_not_on_page") and got["statuses"].get("value_not_in_quote")


@pytest.mark.skipif(not (CORPUS / "pdf").is_dir(), reason=f"no corpus at {CORPUS}")
def test_real_world_pdfs_never_crash_and_never_verify_an_invented_quote() -> None:
    from ernie_batch.config import ImageOptions, PdfOptions
    from ernie_batch.intake.discover import sha256_file
    from ernie_batch.intake.prepare import prepare_document
    from ernie_batch.intake.units import Document, PageUnit

    seen = 0
    for path in sorted([*(CORPUS / "pdf").glob("*.pdf"), *(CORPUS / "bad").glob("*.pdf")]):
        doc = Document(path, path.parent, sha256_file(path), "pdf", path.stat().st_size,
                       path.stat().st_mtime)
        for mode in ("pdf", "image"):
            for unit in prepare_document(doc, ImageOptions(), PdfOptions(mode=mode), text=True):
                if not isinstance(unit, PageUnit):
                    continue
                seen += 1
                invented = {"title": "Quarterly revenue of Zyxwv Holdings: 48,213.07 USD",
                            "total": 48213.07}
                got = verify(invented, {"title": invented["title"], "total": "48,213.07"},
                             SCHEMA, unit.text)
                assert S.VERIFIED not in {e.status for e in got.values()}, path.name
    assert seen > 10


def evidence_output(root: Path) -> tuple[object, Path]:
    """One run with evidence over a text PDF of two pages and the demo's receipt image."""
    import shutil

    from ernie_batch.sim import SimSettings, Simulator
    from tests.conftest import SAMPLES, job_config, run_mounted

    src = root / "in"
    src.mkdir(parents=True)
    (src / "invoice.pdf").write_bytes(text_pdf([
        Page([Line(60, 80 + 20 * i, t) for i, t in enumerate(LINES)]),
        Page([Line(60, 80, "Page two"), Line(60, 100, "Stapler   12.25 EUR")], rotate=90)]))
    shutil.copy(SAMPLES / "receipt-cafe-aurora.png", src)
    cfg = job_config("http://x", root / "out", [src], **{"prompt.evidence": True})
    run_mounted(cfg, Simulator(SimSettings(api_key="sk-test-DISTINCTIVE-7f3a9c1e5b")).app)
    return cfg, root / "out"


def test_pages_documents_report_and_review_carry_the_evidence(tmp_path) -> None:
    from ernie_batch.money.report import dataset_report
    from ernie_batch.review import build_review
    from ernie_batch.store import read_table

    cfg, out = evidence_output(tmp_path)
    pages = {r["page"] if r["doc_type"] == "pdf" else 0: r
             for r in read_table(out, "pages").to_pylist()}
    pdf_page, image = pages[1], pages[0]
    entries = json.loads(pdf_page["evidence_json"])
    assert pdf_page["fields_verified"] > 0
    assert pdf_page["fields_checked"] == sum(e["status"] != "not_checked" for e in entries.values())
    assert all(set(e) == {"quote", "span", "status", "box", "page"} for e in entries.values())
    assert {e["status"] for e in json.loads(image["evidence_json"]).values()} <= {
        "no_text_layer", "not_checked"} and image["fields_verified"] == 0
    doc = read_table(out, "documents", current=True).to_pylist()
    merged = next(json.loads(d["evidence_json"]) for d in doc if d["doc_type"] == "pdf")
    items = [p for p in merged if p.startswith("line_items[")]
    assert {merged[p]["page"] for p in items} <= {1, 2}  # each item's entries from its page
    report = dataset_report(out)
    run = report["runs"][0]
    assert run["fields_checked"] == sum(r["fields_checked"] or 0 for r in pages.values())
    assert {"field", "fields_verified", "fields_checked", "share_verified"} <= set(
        report["evidence"][0])
    html = build_review(cfg, [run["run_id"]], tmp_path / "review.html").files[0].read_text()
    assert 'class="ev-badge ev-verified"' in html and 'id="f-unverified"' in html
    assert '<svg class="boxes" viewBox="0 0 1 1"' in html and "<rect " in html
