"""Sources on object storage, against a real S3 API on loopback: listed like folders, read only
when new to the output, identified by content."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from ernie_batch import store
from ernie_batch.config import SourceOptions
from ernie_batch.errors import ConfigError
from ernie_batch.intake.discover import discover
from ernie_batch.sim import SimSettings
from ernie_batch.sim.app import Simulator
from tests.conftest import (
    PROJECT,
    S3_SECRET,
    SAMPLES,
    TEST_KEY,
    job_config,
    put_object,
    run_mounted,
)

PDF = (SAMPLES / "invoice-2026-0117.pdf").read_bytes()  # 3 pages
PNG = (SAMPLES / "receipt-cafe-aurora.png").read_bytes()
JPG = (SAMPLES / "letter-photo.jpg").read_bytes()


def test_a_listing_is_filtered_like_a_folder(s3) -> None:
    server, bucket = s3
    etag = put_object(bucket, "inbox/2026-01-05/invoice.pdf", PDF)
    put_object(bucket, "inbox/receipt.bin", PNG)  # no extension: typed by content
    put_object(bucket, "inbox/notes.txt", b"just text")
    put_object(bucket, "inbox/.hidden/x.pdf", PDF)
    put_object(bucket, "inbox/scan.pdf.part", PDF)
    put_object(bucket, "inbox/skip-me.jpg", JPG)
    put_object(bucket, "elsewhere/other.pdf", PDF)
    source = f"s3://{bucket}/inbox/"

    docs, stats = discover(SourceOptions(paths=[source], exclude=["skip-*"]))
    assert [d.relative_path for d in docs] == ["2026-01-05/invoice.pdf", "notes.txt",
                                               "receipt.bin"]
    assert [d.doc_type for d in docs] == ["pdf", "unknown", "png"]
    invoice = docs[0]
    assert str(invoice.path) == f"s3://{bucket}/inbox/2026-01-05/invoice.pdf"
    assert (invoice.etag, invoice.size) == (etag, len(PDF))
    assert abs(invoice.mtime - time.time()) < 120  # Last-Modified, the store's clock
    assert stats.skipped == {"excluded": 1, "hidden": 1, "partial": 1}

    dated, _ = discover(SourceOptions(paths=[source], date_from="path", since="2026-01-01",
                                      until="2026-02-01"))
    assert [d.relative_path for d in dated] == ["2026-01-05/invoice.pdf"]
    settling, stats = discover(SourceOptions(paths=[source], settle_seconds=3600))
    assert settling == [] and f"s3://{bucket}/inbox/notes.txt" in map(str, stats.still_growing)
    one, _ = discover(SourceOptions(paths=[f"s3://{bucket}/inbox/receipt.bin"]))
    assert [(str(d.root), d.doc_type) for d in one] == [(f"s3://{bucket}/inbox", "png")]


def test_a_source_that_cannot_be_listed_is_one_line(s3) -> None:
    with pytest.raises(ConfigError, match=r"^sources.paths: s3://no-such-bucket-x/inbox: cannot list"):
        discover(SourceOptions(paths=["s3://no-such-bucket-x/inbox/"]))


def test_known_objects_are_not_read_again(s3) -> None:
    server, bucket = s3
    put_object(bucket, "inbox/a.pdf", PDF)
    etag_b = put_object(bucket, "inbox/b.png", PNG)
    url_b = f"s3://{bucket}/inbox/b.png"
    asked: list[list[tuple[str, str]]] = []

    def known(objects: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
        asked.append(objects)
        return {(url_b, etag_b): ("ab" * 32, "png")}

    before = len(server.gets(bucket, "inbox/"))
    docs, _ = discover(SourceOptions(paths=[f"s3://{bucket}/inbox"]), known=known)
    read = server.gets(bucket, "inbox/")[before:]
    assert read == [f"/{bucket}/inbox/a.pdf"]  # b's bytes were never fetched
    assert sorted(asked[0]) == sorted([(f"s3://{bucket}/inbox/a.pdf", docs[0].etag),
                                       (url_b, etag_b)])
    assert docs[1].sha256 == "ab" * 32 and docs[1].etag == etag_b


def test_sources_arguments_reach_the_bucket_as_urls(s3, tmp_path: Path) -> None:
    """`plan s3://bucket/inbox/` (no Prefect, no request): the argument is a URL, never a
    folder named s3:; a bucket that is not there is one line and exit 2, before a run starts."""
    import json

    from tests.test_cli import cli

    _, bucket = s3
    put_object(bucket, "inbox/invoice.pdf", PDF)
    put_object(bucket, "inbox/r.png", PNG)
    config = ["-c", str(PROJECT / "configs" / "demo.toml"), "--output", str(tmp_path / "out")]
    res = cli("plan", f"s3://{bucket}/inbox/", *config, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout.splitlines()[-1])
    assert (plan["documents"], plan["pages"], plan["requests"]) == (2, 4, 4)
    res = cli("run", "s3://no-such-bucket-y/inbox/", *config, env={"AIMLAPI_API_KEY": TEST_KEY})
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "sources: s3://no-such-bucket-y/inbox: cannot list" in lines[0]
    assert S3_SECRET not in res.stderr + res.stdout
    assert not (tmp_path / "s3:").exists()


@pytest.mark.slow
def test_ernie_batch_run_over_a_bucket(s3, sim_factory, tmp_path: Path) -> None:
    """The whole command: Prefect flow, prepare workers reading the object, a row per page."""
    import json

    from tests.test_cli import cli

    _, bucket = s3
    etag = put_object(bucket, "inbox/r.png", PNG)
    sim = sim_factory()
    res = cli("run", f"s3://{bucket}/inbox/", "-c", str(PROJECT / "configs" / "demo.toml"),
              "--base-url", sim.url, "--output", str(tmp_path / "out"), "--json",
              env={"AIMLAPI_API_KEY": TEST_KEY}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["units_ok"] == 1
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    assert (list(pages["source_path"]), list(pages["source_etag"])) == (
        [f"s3://{bucket}/inbox/r.png"], [etag])
    res = cli("report", "--output", str(tmp_path / "out"), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [f["folder"] for f in json.loads(res.stdout.splitlines()[-1])["folders"]] == [
        f"s3://{bucket}/inbox"]  # the object's folder, not a local path made of its URL
    _no_secret_in(tmp_path / "out")


def _run(cfg, sim: Simulator):
    return run_mounted(cfg, sim.app)


def test_runs_over_a_bucket_send_only_new_content(s3, tmp_path: Path) -> None:
    server, bucket = s3
    put_object(bucket, "inbox/invoice.pdf", PDF)
    png_etag = put_object(bucket, "inbox/receipt.png", PNG)
    put_object(bucket, "inbox/copies/same-receipt.png", PNG)  # same content, another key
    sim = Simulator(SimSettings(api_key=TEST_KEY))
    # prepare workers are processes: they read the objects with the access they are handed
    cfg = job_config("http://sim", tmp_path / "out", [f"s3://{bucket}/inbox/"],
                     **{"prepare.workers": 1})

    first = _run(cfg, sim)
    assert (first.units_ok, first.requests, first.units_duplicate) == (4, 4, 1)
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    assert set(pages["source_path"]) == {f"s3://{bucket}/inbox/invoice.pdf",
                                         f"s3://{bucket}/inbox/receipt.png",
                                         f"s3://{bucket}/inbox/copies/same-receipt.png"}
    copy = pages[pages["source_path"] == f"s3://{bucket}/inbox/receipt.png"].iloc[0]
    assert (copy["status"], copy["duplicate_of_path"]) == (  # sent once, for the first key
        "duplicate", f"s3://{bucket}/inbox/copies/same-receipt.png")
    assert set(pages.loc[pages["source_path"].str.endswith(".png"), "source_etag"]) == {png_etag}
    assert pages["source_etag"].notna().all()

    seen = len(server.gets(bucket, "inbox/"))
    again = _run(cfg, sim)
    assert (again.requests, again.units_already_done) == (0, 5)
    assert server.gets(bucket, "inbox/")[seen:] == []  # not one object's bytes read

    put_object(bucket, "inbox/receipt.png", JPG)  # changed: new content, new ETag
    # the same bytes uploaded again in parts: a new ETag ("...-1"), the same content
    pdf_etag = _multipart(bucket, "inbox/invoice.pdf", PDF)
    seen = len(server.gets(bucket, "inbox/"))
    changed = _run(cfg, sim)
    assert (changed.requests, changed.units_ok, changed.units_already_done) == (1, 1, 4)
    read = server.gets(bucket, "inbox/")[seen:]
    assert read.count(f"/{bucket}/inbox/invoice.pdf") == 1  # hashed, never prepared
    pages = store.read_table(tmp_path / "out", "pages").to_pandas()
    receipt = pages[pages["source_path"].str.endswith(".png")]
    assert receipt["source_sha256"].nunique() == 2  # identity is the content
    assert pdf_etag.endswith("-1\"") and pdf_etag not in set(pages["source_etag"])
    assert len(sim.ledger) == 5
    _no_secret_in(tmp_path / "out")


def _multipart(bucket: str, key: str, data: bytes) -> str:
    import obstore

    from ernie_batch.buckets import client, resolve_access

    obstore.put(client(resolve_access(), "s3", bucket), key, data, use_multipart=True)
    return obstore.head(client(resolve_access(), "s3", bucket), key)["e_tag"]


def _no_secret_in(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert S3_SECRET.encode() not in path.read_bytes(), path
    rows = pd.concat([store.read_table(root, t).to_pandas().astype(str)
                      for t in ("pages", "attempts", "runs")])
    assert not rows.apply(lambda c: c.str.contains(S3_SECRET)).any().any()


def test_known_objects_reads_the_etag_of_parts_newer_than_the_first(tmp_path: Path) -> None:
    """Outputs written before `source_etag` existed: a column only later commits have must
    still be read (else every object is read again)."""
    import pyarrow as pa

    schema = store.pages_schema([])
    row = {name: None for name in schema.names} | {
        "run_id": "20260101T000000Z-aaaaaa", "key": "k1", "source_path": "/old/a.pdf",
        "source_sha256": "aa" * 32, "doc_type": "pdf", "status": "ok"}
    old = schema.remove(schema.get_field_index("source_etag"))
    store.append_rows(tmp_path, "pages", pa.Table.from_pylist([row], schema=old), "2026-01-01")
    new = row | {"key": "k2", "source_path": "s3://b/in/x.png", "source_sha256": "bb" * 32,
                 "doc_type": "png", "source_etag": '"e1"'}
    store.append_rows(tmp_path, "pages", pa.Table.from_pylist([new], schema=schema), "2026-01-02")
    assert store.known_objects(tmp_path, [("s3://b/in/x.png", '"e1"'), ("s3://b/in/x.png", '"e2"'),
                                          ("/old/a.pdf", None)]) == {
        ("s3://b/in/x.png", '"e1"'): ("bb" * 32, "png")}


def test_a_named_profile_gives_the_credentials(s3, tmp_path: Path, monkeypatch) -> None:
    from ernie_batch.buckets import resolve_access

    _, bucket = s3
    put_object(bucket, "inbox/r.png", PNG)
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[scans]\naws_access_key_id = profile-key-id\n"
                           f"aws_secret_access_key = {S3_SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "scans")
    access = resolve_access()
    assert access.config()["aws_access_key_id"] == "profile-key-id" and S3_SECRET not in repr(access)
    docs, _ = discover(SourceOptions(paths=[f"s3://{bucket}/inbox/"]))
    assert [d.doc_type for d in docs] == ["png"]


def test_the_review_shows_pages_of_objects_and_says_when_one_is_gone(s3, tmp_path: Path) -> None:
    """A review of a run over a bucket re-creates each page from the object as it is now."""
    from ernie_batch.review.build import build_review

    server, bucket = s3
    put_object(bucket, "inbox/receipt.png", PNG)
    put_object(bucket, "inbox/gone.png", JPG)
    cfg = job_config("http://sim", tmp_path / "out", [f"s3://{bucket}/inbox/"])
    summary = _run(cfg, Simulator(SimSettings(api_key=TEST_KEY)))
    assert summary.units_ok == 2
    import obstore

    from ernie_batch.buckets import client, resolve_access

    obstore.delete(client(resolve_access(), "s3", bucket), "inbox/gone.png")
    html = tmp_path / "review.html"
    result = build_review(cfg, [summary.run_id], html)
    page = html.read_text()
    assert result.pages == 2 and page.count("<img class=\"thumb\"") == 1
    assert "source gone: object no longer readable: not found" in page
    assert f"s3://{bucket}/inbox" in page and "s3:/" + bucket not in page
