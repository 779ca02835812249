"""Find the documents of a job: walk the sources, classify files by content, hash them.

Discovery only reads what it must: the first bytes (to sniff the type) and the whole file once,
streamed, for the sha256. Files that are not documents of this job (hidden, temporary, partial,
still growing, outside the date range, excluded by a glob) are counted by reason in
`DiscoveryStats.skipped` and produce no `Document`. Files of an unknown type do become
documents (doc_type "unknown") so that the run records a `skipped` row saying why.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ernie_batch.config import SourceOptions
from ernie_batch.errors import ConfigError
from ernie_batch.intake.units import DiscoveryStats, Document
from ernie_batch.location import Location
from ernie_batch.vocab import PassedOver

if TYPE_CHECKING:
    from ernie_batch.intake.objects import KnownObjects

HEAD_BYTES = 1024  # PDF readers accept junk before "%PDF-" within the first KiB

_TEMP_SUFFIXES = (".tmp", ".temp", ".swp", ".bak~", "~")
_PARTIAL_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".filepart")


# --- content sniffing -------------------------------------------------------------------


def sniff_type(head: bytes) -> str:
    """The document type from the first bytes of a file: one of DOC_TYPES or "unknown"."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if _is_bmp(head):
        return "bmp"
    if head[4:8] == b"ftyp":
        return _iso_media_type(head)
    if b"%PDF-" in head[:HEAD_BYTES]:
        return "pdf"
    return "unknown"


_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})


def ftyp_brands(head: bytes) -> tuple[bytes, list[bytes]]:
    """The major brand and the compatible brands of an ISO-BMFF `ftyp` box at the start."""
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size if size >= 16 else 16)
    return head[8:12], [head[i : i + 4] for i in range(16, end - 3, 4)]


def _iso_media_type(head: bytes) -> str:
    """AVIF or HEIF by the ftyp brands; other ISO media (MP4, QuickTime, ...) is "unknown".

    The major brand names the codec where it can (`avif`, `heic`); the generic image brands
    `mif1`/`msf1` say only "HEIF container", so an `avif`/`avis` among the compatible brands
    makes it AVIF (AV1 inside, which Pillow decodes), anything else HEIF (libheif decides).
    """
    major, compatible = ftyp_brands(head)
    if major in _AVIF_BRANDS:
        return "avif"
    if major in (b"mif1", b"msf1") and _AVIF_BRANDS.intersection(compatible):
        return "avif"
    if major in _HEIF_BRANDS:
        return "heif"
    return "unknown"


def _is_bmp(head: bytes) -> bool:
    # "BM" alone is too weak: also require a known DIB header size at offset 14
    return (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124)
    )


def describe_unknown(head: bytes) -> str:
    """A short name for a format we do not send, for the `skipped` row ("HEIF", "ZIP", ...)."""
    if not head:
        return "empty file"
    if head[4:8] == b"ftyp":
        return "ISO media (" + head[8:12].decode("latin-1").strip() + ")"
    known = {
        b"PK\x03\x04": "ZIP/Office",
        b"\xd0\xcf\x11\xe0": "OLE/legacy Office",
        b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
        b"\xff\x4f\xff\x51": "JPEG 2000 codestream",
        b"8BPS": "Photoshop",
        b"%!PS": "PostScript",
        b"\x1f\x8b": "gzip",
        b"AT&TFORM": "DjVu",
    }
    for magic, name in known.items():
        if head.startswith(magic):
            return name
    if head.lstrip().startswith(b"<svg") or b"<svg" in head[:256]:
        return "SVG"
    if _looks_like_text(head):
        return "text"
    return "unrecognised content"


def _looks_like_text(head: bytes) -> bool:
    try:
        head[:512].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head[:512]


def read_head(path: Path, n: int = HEAD_BYTES) -> bytes:
    with path.open("rb") as fh:
        return fh.read(n)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, streamed in chunks (never the whole file in memory)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# --- globs and names ----------------------------------------------------------------------


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob with `**` (any number of folders), `*`, `?` and `[...]` to a regex."""
    i, out = 0, []
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE if os.name == "nt" else 0)


def glob_match(rel: str, pattern: str) -> bool:
    """Match a posix path relative to the source root; a pattern without "/" matches the name."""
    target = rel if "/" in pattern else rel.rsplit("/", 1)[-1]
    return _glob_regex(pattern).match(target) is not None


def name_skip_reason(rel_parts: tuple[str, ...]) -> str | None:
    """Why a file is not a document by its name alone: hidden, temporary or partial."""
    if any(part.startswith(".") for part in rel_parts):
        return PassedOver.HIDDEN
    name = rel_parts[-1].lower()
    if name.startswith("~$") or name.startswith("~lock") or name.endswith(_TEMP_SUFFIXES):
        return PassedOver.TEMPORARY
    if name.endswith(_PARTIAL_SUFFIXES):
        return PassedOver.PARTIAL
    return None


# --- dates -----------------------------------------------------------------------------------


def parse_bound(value: str | None, what: str = "date") -> datetime | None:
    """An ISO date or datetime as an aware UTC datetime (naive values are taken as UTC)."""
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{what}: not an ISO date or datetime: {value!r}") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def path_date(rel: str, pattern: str) -> datetime | None:
    """The date in a path (e.g. inbox/2026-11-25/...); several groups are joined with "-"."""
    m = re.search(pattern, rel)
    if m is None:
        return None
    text = "-".join(g for g in m.groups() if g) if m.groups() else m.group(0)
    try:
        return parse_bound(text.replace("/", "-").replace("_", "-"))
    except ValueError:
        return None


def in_range(when: datetime, since: datetime | None, until: datetime | None) -> bool:
    """since is inclusive, until exclusive."""
    return (since is None or when >= since) and (until is None or when < until)


Bounds = tuple[datetime | None, datetime | None]


# --- the walk --------------------------------------------------------------------------------


def _walk(root: Path, follow: bool, stats: DiscoveryStats) -> Iterator[Path]:
    """Regular files under root; symlinks only when `follow`, and never out of the root."""
    real_root = root.resolve()
    stack: list[tuple[Path, frozenset[Path]]] = [(root, frozenset())]
    while stack:
        folder, ancestors = stack.pop()
        try:
            real = folder.resolve()
            if real in ancestors:
                stats.skip(PassedOver.SYMLINK)
                continue
            ancestors = ancestors | {real}
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            stats.skip(PassedOver.UNREADABLE)
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                if not follow:
                    stats.skip(PassedOver.SYMLINK)
                    continue
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    stats.skip(PassedOver.SYMLINK)
                    continue
                if not target.is_relative_to(real_root):
                    stats.skip(PassedOver.SYMLINK)
                    continue
            try:
                if entry.is_dir(follow_symlinks=follow):
                    stack.append((path, ancestors))
                elif entry.is_file(follow_symlinks=follow):
                    yield path
                else:
                    stats.skip(PassedOver.NOT_A_FILE)
            except OSError:
                stats.skip(PassedOver.UNREADABLE)


def skip_reason(rel: str, mtime: float, opts: SourceOptions, now: float,
                bounds: Bounds) -> str | None:
    """Why a file found by the walk (or an object by a listing) is not a document of this job,
    or None. `rel` is its path under the source, `mtime` when it last changed."""
    if not any(glob_match(rel, p) for p in opts.include) or any(
        glob_match(rel, p) for p in opts.exclude
    ):
        return PassedOver.EXCLUDED
    reason = name_skip_reason(tuple(rel.split("/")))
    if reason:
        return reason
    if opts.settle_seconds > 0 and mtime > now - opts.settle_seconds:
        return PassedOver.STILL_GROWING
    since, until = bounds
    if since is None and until is None:
        return None
    if opts.date_from == "path":
        when = path_date(rel, opts.path_date_pattern)
        if when is None:
            return PassedOver.OUTSIDE_DATES
    else:
        when = datetime.fromtimestamp(mtime, UTC)
    return None if in_range(when, since, until) else PassedOver.OUTSIDE_DATES


def discover(
    opts: SourceOptions, *, now: float | None = None, known: KnownObjects | None = None
) -> tuple[list[Document], DiscoveryStats]:
    """Every file of the sources that passes the filters, as Documents sorted by path.

    A source is a local folder or file, or an object-store prefix or object
    (`s3://bucket/inbox/`: `objects.remote_documents`, which reads an object's bytes only
    when `known` does not know its (URL, ETag)). `now` (epoch seconds) decides which files
    are still growing; tests pass it explicitly. Raises ValueError for an unparseable
    since/until and ConfigError for a source that does not exist or cannot be listed: a
    scheduled run over an unmounted share must fail loudly, not find nothing.
    """
    now = time.time() if now is None else now
    bounds = (parse_bound(opts.since, "sources.since"), parse_bound(opts.until, "sources.until"))
    stats = DiscoveryStats()
    found: dict[str, Document] = {}
    sources = [_location(source) for source in opts.paths]
    for source in sources:
        if source.is_remote:
            continue
        root = source.local
        assert root is not None
        if root.is_file():
            candidates: Iterator[Path] = iter([root])
            root = root.parent
        elif root.is_dir():
            candidates = _walk(root, opts.follow_symlinks, stats)
        else:
            raise ConfigError(f"sources.paths: {source} does not exist")
        for path in candidates:
            if str(path) in found:
                continue
            doc = _document(path, root, opts, now, bounds, stats)
            if doc is not None:
                found[str(path)] = doc
    remote = [s for s in sources if s.is_remote]
    if remote:
        from ernie_batch.buckets import resolve_access
        from ernie_batch.intake.objects import remote_documents

        access = resolve_access(opts.storage_options)
        for doc in remote_documents(remote, opts, now, bounds, stats, access, known):
            found.setdefault(str(doc.path), doc)
    docs = sorted(found.values(), key=lambda d: str(d.path))
    stats.found = len(docs)
    return docs, stats


def _location(source: str | os.PathLike[str] | Location) -> Location:
    """A source as given (config, flag, or a caller's path), absolute when local."""
    try:
        return Location.parse(source).absolute()
    except ValueError as exc:
        raise ConfigError(f"sources.paths: {exc}") from None


def _document(
    path: Path, root: Path, opts: SourceOptions, now: float, bounds: Bounds, stats: DiscoveryStats
) -> Document | None:
    rel = path.relative_to(root).as_posix()
    try:
        st = path.stat()
        reason = skip_reason(rel, st.st_mtime, opts, now, bounds)
        if reason:
            stats.skip(reason)
            if reason == PassedOver.STILL_GROWING:
                stats.still_growing.append(Location.parse(path))
            return None
        head = read_head(path)
        digest = sha256_file(path)
    except OSError:
        stats.skip(PassedOver.UNREADABLE)
        return None
    return Document(
        path=path,
        root=root,
        sha256=digest,
        doc_type=sniff_type(head),
        size=st.st_size,
        mtime=st.st_mtime,
    )
