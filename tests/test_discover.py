"""Discovery: walk, filters, type by content, hashes, order."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ernie_batch.config import SourceOptions
from ernie_batch.errors import ConfigError
from ernie_batch.intake.discover import (
    describe_unknown,
    discover,
    glob_match,
    sha256_file,
    sniff_type,
)

PDF = b"%PDF-1.4\n%fake\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16


def write(path: Path, data: bytes, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def names(docs) -> list[str]:
    return [d.relative_path for d in docs]


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (PDF, "pdf"),
        (b"junk before the header %PDF-1.7", "pdf"),
        (JPEG, "jpeg"),
        (PNG, "png"),
        (b"GIF89a\x01\x00", "gif"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "webp"),
        (b"II*\x00\x08\x00", "tiff"),
        (b"MM\x00*\x00\x00", "tiff"),
        (b"BM" + b"\x00" * 12 + (40).to_bytes(4, "little"), "bmp"),
        (b"BM but text", "unknown"),
        (b"", "unknown"),
        (b"\x00\x00\x00\x18ftypheic", "heif"),
        (b"\x00\x00\x00\x18ftypmp42", "unknown"),
    ],
)
def test_sniff_type(head: bytes, kind: str) -> None:
    assert sniff_type(head) == kind


def test_describe_unknown() -> None:
    assert describe_unknown(b"\x00\x00\x00\x18ftypmp42\x00") == "ISO media (mp42)"
    assert describe_unknown(b"PK\x03\x04rest") == "ZIP/Office"
    assert describe_unknown(b"hello, world") == "text"


def test_glob_match() -> None:
    assert glob_match("a/b/c.pdf", "**/*.pdf")
    assert glob_match("c.pdf", "**/*.pdf")
    assert glob_match("a/b/c.pdf", "*.pdf")  # no slash: matches the name
    assert not glob_match("a/b/c.pdf", "a/*.pdf")
    assert glob_match("a/b/c.pdf", "a/**")
    assert glob_match("scan-7.jpg", "scan-[0-9].jpg")


def test_type_by_content_and_skips(tmp_path: Path) -> None:
    old = time.time() - 3600
    write(tmp_path / "b.pdf", PDF, old)
    write(tmp_path / "sub" / "a-photo.txt", JPEG, old)  # wrong extension: content decides
    write(tmp_path / "sub" / "empty.pdf", b"", old)
    write(tmp_path / "notes.docx", b"PK\x03\x04", old)
    write(tmp_path / ".hidden.pdf", PDF, old)
    write(tmp_path / ".git" / "x.pdf", PDF, old)
    write(tmp_path / "~$report.docx", PDF, old)
    write(tmp_path / "upload.pdf.part", PDF, old)
    write(tmp_path / "scan.tmp", PDF, old)
    write(tmp_path / "growing.pdf", PDF)  # modified just now
    docs, stats = discover(SourceOptions(paths=[tmp_path], settle_seconds=60))
    assert names(docs) == ["b.pdf", "notes.docx", "sub/a-photo.txt", "sub/empty.pdf"]
    assert [d.doc_type for d in docs] == ["pdf", "unknown", "jpeg", "unknown"]
    assert stats.found == 4
    assert stats.skipped == {"hidden": 2, "temporary": 2, "partial": 1, "still_growing": 1}
    assert stats.still_growing == [tmp_path / "growing.pdf"]
    b = docs[0]
    assert b.size == len(PDF) and b.sha256 == hashlib.sha256(PDF).hexdigest()
    assert Path(b.path).is_absolute() and b.root == tmp_path


def test_include_exclude(tmp_path: Path) -> None:
    for name in ("in/a.pdf", "in/b.png", "in/drafts/c.pdf"):
        write(tmp_path / name, PDF)
    opts = SourceOptions(paths=[tmp_path], include=["**/*.pdf"], exclude=["**/drafts/**"])
    docs, stats = discover(opts)
    assert names(docs) == ["in/a.pdf"]
    assert stats.skipped == {"excluded": 2}


def test_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(root / "real" / "a.pdf", PDF)
    write(outside / "secret.pdf", PDF)
    (root / "inside-link").symlink_to(root / "real")
    (root / "escape").symlink_to(outside)
    (root / "loop").symlink_to(root)
    docs, stats = discover(SourceOptions(paths=[root]))
    assert names(docs) == ["real/a.pdf"] and stats.skipped == {"symlink": 3}
    docs, stats = discover(SourceOptions(paths=[root], follow_symlinks=True))
    assert names(docs) == ["inside-link/a.pdf", "real/a.pdf"]
    assert stats.skipped == {"symlink": 2}


def test_dates_from_mtime(tmp_path: Path) -> None:
    day = datetime(2026, 11, 25, 12, tzinfo=UTC).timestamp()
    write(tmp_path / "before.pdf", PDF, day - 86400)
    write(tmp_path / "on.pdf", PDF, day)
    write(tmp_path / "after.pdf", PDF, day + 86400)
    opts = SourceOptions(paths=[tmp_path], since="2026-11-25", until="2026-11-26")
    docs, stats = discover(opts)
    assert names(docs) == ["on.pdf"] and stats.skipped == {"outside_dates": 2}


def test_dates_from_path(tmp_path: Path) -> None:
    for day in ("2026-11-24", "2026-11-25", "2026-11-26"):
        write(tmp_path / "inbox" / day / "scan.pdf", PDF)
    write(tmp_path / "inbox" / "undated" / "scan.pdf", PDF)
    opts = SourceOptions(paths=[tmp_path], since="2026-11-25", date_from="path")
    docs, stats = discover(opts)
    assert names(docs) == ["inbox/2026-11-25/scan.pdf", "inbox/2026-11-26/scan.pdf"]
    assert stats.skipped == {"outside_dates": 2}


def test_path_pattern_with_groups(tmp_path: Path) -> None:
    write(tmp_path / "2026" / "03" / "07" / "a.pdf", PDF)
    write(tmp_path / "2025" / "12" / "31" / "b.pdf", PDF)
    opts = SourceOptions(
        paths=[tmp_path],
        since="2026-01-01",
        date_from="path",
        path_date_pattern=r"(\d{4})/(\d{2})/(\d{2})",
    )
    assert names(discover(opts)[0]) == ["2026/03/07/a.pdf"]


def test_bad_date_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sources.since: not an ISO date"):
        discover(SourceOptions(paths=[tmp_path], since="last tuesday"))


def test_order_is_deterministic_across_sources(tmp_path: Path) -> None:
    write(tmp_path / "z" / "1.pdf", PDF)
    write(tmp_path / "a" / "2.pdf", PDF)
    docs, _ = discover(SourceOptions(paths=[tmp_path / "z", tmp_path / "a", tmp_path / "z"]))
    assert [d.path for d in docs] == sorted([tmp_path / "a" / "2.pdf", tmp_path / "z" / "1.pdf"])


def test_a_missing_source_is_an_error_and_a_single_file_a_source(tmp_path: Path) -> None:
    one = write(tmp_path / "one.pdf", PDF)
    docs, stats = discover(SourceOptions(paths=[one]))
    assert names(docs) == ["one.pdf"] and stats.skipped == {}
    with pytest.raises(ConfigError, match=r"sources.paths: .*nope does not exist"):
        discover(SourceOptions(paths=[tmp_path / "nope", one]))


def test_sha256_streams(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = write(tmp_path / "big.bin", data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
