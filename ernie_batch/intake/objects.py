"""Sources on object storage: list a prefix, read an object's bytes only when they are new.

A listing gives key, size, ETag and Last-Modified (the object's mtime: `settle_seconds`,
`since`/`until`) and reads no object. The filters are the folders' (globs, names, dates).
An object's bytes are then read (once, streamed: its sha256 and first KiB) only when its
(URL, ETag) is not known to the output: the engine's `known` answers from the `pages` rows
that recorded one. Identity stays the content's sha256 and the ETag is change detection
only (a multipart upload's ETag is no content hash): an object uploaded again with the same
bytes under a new ETag is read, and then counts as done by its content.

The prepare workers read an object through `local_copy`, at the ETag discovery saw
(If-Match): one replaced since is a row saying so, as a changed file is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ernie_batch.buckets import ObjectAccess, client, resolve_access
from ernie_batch.config import SourceOptions
from ernie_batch.errors import ConfigError, InputError, one_line
from ernie_batch.intake.discover import HEAD_BYTES, Bounds, skip_reason, sniff_type
from ernie_batch.intake.units import DiscoveryStats, Document
from ernie_batch.location import Location
from ernie_batch.vocab import PassedOver

# (URL, ETag) pairs -> (sha256, doc_type) of those the output already recorded
KnownObjects = Callable[[list[tuple[str, str]]], Mapping[tuple[str, str], tuple[str, str]]]
READERS = 16  # objects hashed at once: a GET's latency, not the CPU, bounds a listing's reads
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing shows it."""

    location: Location
    size: int
    etag: str
    modified: float  # Last-Modified, seconds since the epoch (the store's clock)


def _info(root: Location, meta: Mapping) -> ObjectInfo:
    return ObjectInfo(Location(root.scheme, root.bucket, meta["path"]), meta["size"],
                      meta["e_tag"] or "", meta["last_modified"].timestamp())


def _store(loc: Location, access: ObjectAccess):  # noqa: ANN202 - an obstore store, lazily imported
    return client(access, loc.scheme, loc.bucket)


def find_objects(source: Location, access: ObjectAccess) -> tuple[Location, list[ObjectInfo]]:
    """The objects of a source and the root they are relative to: the object it names, else
    every object under it as a prefix. ConfigError when the store cannot be listed (no such
    bucket, refused credentials, no endpoint): a scheduled run must not find nothing quietly."""
    import obstore
    from obstore.exceptions import BaseError, NotFoundError

    store = _store(source, access)
    try:
        if source.key:
            with contextlib.suppress(NotFoundError, FileNotFoundError):
                return source.parent, [_info(source, obstore.head(store, source.key))]
        listed = [_info(source, meta)
                  for batch in obstore.list(store, source.key or None, chunk_size=1000)
                  for meta in batch if not meta["path"].endswith("/")]  # folder markers
    except (BaseError, OSError) as exc:  # obstore raises FileNotFoundError for a 404
        raise ConfigError(f"sources.paths: {source}: cannot list: {_reason(exc)}") from None
    return source, sorted(listed, key=lambda o: o.location.key)


def _reason(exc: BaseException) -> str:
    """The first line of an object-store error: its kind and the server's message."""
    return one_line(str(exc).strip().splitlines()[0] if str(exc).strip() else exc, 200)


def remote_documents(sources: Iterable[Location], opts: SourceOptions, now: float,
                     bounds: Bounds, stats: DiscoveryStats, access: ObjectAccess,
                     known: KnownObjects | None = None) -> list[Document]:
    """The documents under object-store sources: filtered as files are, read only when new."""
    chosen: list[tuple[Location, ObjectInfo]] = []
    for source in sources:
        root, infos = find_objects(source, access)
        for info in infos:
            reason = skip_reason(info.location.relative_to(root), info.modified, opts, now, bounds)
            if reason:
                stats.skip(reason)
                if reason == PassedOver.STILL_GROWING:
                    stats.still_growing.append(info.location)
                continue
            chosen.append((root, info))
    seen = known([(str(i.location), i.etag) for _, i in chosen]) if known and chosen else {}
    docs: list[Document] = []
    unread: list[tuple[Location, ObjectInfo]] = []
    for root, info in chosen:
        hit = seen.get((str(info.location), info.etag))
        if hit is None:
            unread.append((root, info))
        else:
            docs.append(Document(info.location, root, hit[0], hit[1], info.size, info.modified,
                                 info.etag))
    with ThreadPoolExecutor(READERS) as pool:
        for doc in pool.map(lambda ri: _read(*ri, access), unread):
            if doc is None:
                stats.skip(PassedOver.UNREADABLE)
            else:
                docs.append(doc)
    return docs


def _read(root: Location, info: ObjectInfo, access: ObjectAccess) -> Document | None:
    """Read one object once: its sha256 and type, under the ETag of the bytes read (it may
    have changed since the listing: what was read is what is recorded). None: unreadable."""
    import obstore
    from obstore.exceptions import BaseError

    digest, head = hashlib.sha256(), b""
    try:
        result = obstore.get(_store(info.location, access), info.location.key)
        for chunk in result.stream(CHUNK):
            if len(head) < HEAD_BYTES:
                head += bytes(chunk[:HEAD_BYTES - len(head)])
            digest.update(chunk)
        meta = result.meta
    except (BaseError, OSError):
        return None
    return Document(info.location, root, digest.hexdigest(), sniff_type(head), meta["size"],
                    meta["last_modified"].timestamp(), meta["e_tag"] or info.etag)


@contextlib.contextmanager
def local_copy(loc: Location, etag: str | None, access: ObjectAccess | None) -> Iterator[Path]:
    """An object's bytes (as discovery saw them: If-Match on its ETag, when given) in a
    temporary file that is gone after the block. InputError (the row's error) when it is gone
    or replaced."""
    import obstore
    from obstore.exceptions import BaseError, NotFoundError, PreconditionError

    if access is None:
        raise InputError(f"{loc}: no object-store access was handed to the worker")
    options = {"if_match": etag} if etag else {}
    with tempfile.TemporaryDirectory(prefix="ernie-batch-object-") as tmp:
        path = Path(tmp) / (loc.name or "object")
        try:
            result = obstore.get(_store(loc, access), loc.key, options=options)
            with path.open("wb") as fh:
                for chunk in result.stream(CHUNK):
                    fh.write(chunk)
        except PreconditionError:
            raise InputError("object changed since discovery (its ETag differs)") from None
        except (NotFoundError, FileNotFoundError):
            raise InputError("object no longer readable: not found") from None
        except (BaseError, OSError) as exc:
            raise InputError(f"object no longer readable: {_reason(exc)}") from None
        yield path


@contextlib.contextmanager
def readable(loc: Location, etag: str | None,
             storage_options: Mapping[str, str]) -> Iterator[Path]:
    """A source's bytes as a local file: the file itself, or a temporary copy of the object
    (`local_copy`, at `etag` when given) for a source on object storage."""
    if not loc.is_remote:
        yield Path(loc)
        return
    with local_copy(loc, etag, resolve_access(storage_options)) as path:
        yield path


def source_problem(source: str | os.PathLike[str] | Location,
                   storage_options: Mapping[str, str]) -> str | None:
    """Why a source cannot be read (one line), or None: a local path that does not exist, or
    a prefix that cannot be listed (one request). Checked before a run starts."""
    try:
        loc = Location.parse(source)
    except ValueError as exc:
        return str(exc)
    if not loc.is_remote:
        return None if Path(loc).expanduser().exists() else f"{loc} does not exist"
    import obstore
    from obstore.exceptions import BaseError

    store = _store(loc, resolve_access(storage_options))
    try:
        next(iter(obstore.list(store, loc.key or None, chunk_size=1)), None)
    except (BaseError, OSError) as exc:
        return f"{loc}: cannot list: {_reason(exc)}"
    return None
