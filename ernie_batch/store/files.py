"""Small files that appear whole or not at all (temp name, rename), and a probe of the folder.

The tables' data files are Delta's (`store.delta`); these are small files beside them (the
scale plan and manifests, review pages). The scale plan and manifests are read by other
machines, so they go through the output wherever it lives (`write_small`, `read_small`,
`list_small`: a file under a folder, an object in a bucket; a PUT is atomic by itself).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from ernie_batch.errors import OutputError
from ernie_batch.location import OutputRoot, StrPath


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Whole or not at all (a temporary file beside it, then a rename); no fsync: a power cut
    may leave the previous version (the scale plan and manifests, review pages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def object_store(out: OutputRoot) -> Any:
    """The object-store client of an output in a bucket (its storage options resolved)."""
    from ernie_batch.buckets import client

    location = out.location
    return client(out.object_access(), location.scheme, location.bucket)


def write_small(root: StrPath | OutputRoot, key: str, text: str) -> None:
    """Replace the small file `key` ("a/b.json", below the output) with `text`, whole."""
    out = OutputRoot.of(root)
    if out.is_local:
        write_text_atomic(out.local_path(key), text)
        return
    import obstore

    obstore.put(object_store(out), out.location.join(key).key, text.encode("utf-8"))


def read_small(root: StrPath | OutputRoot, key: str) -> str | None:
    """The text of the small file `key` below the output; None when it does not exist."""
    out = OutputRoot.of(root)
    if out.is_local:
        try:
            return out.local_path(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
    import obstore
    from obstore.exceptions import NotFoundError

    try:
        data = obstore.get(object_store(out), out.location.join(key).key).bytes()
    except (FileNotFoundError, NotFoundError):  # obstore raises the former for a 404
        return None
    return bytes(data).decode("utf-8")


def list_small(root: StrPath | OutputRoot, prefix: str) -> list[str]:
    """The keys of the files below `prefix` ("a/b") of the output, at any depth, sorted."""
    out = OutputRoot.of(root)
    if out.is_local:
        base = out.local_path()
        folder = base / prefix
        return sorted(p.relative_to(base).as_posix() for p in folder.rglob("*")
                      if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
    import obstore

    base = out.location.key + "/" if out.location.key else ""
    below = out.location.join(prefix).key + "/"
    return sorted(m["path"].removeprefix(base)
                  for batch in obstore.list(object_store(out), below) for m in batch)


def _file_in_the_way(root: Path) -> Path | None:
    """The folder itself, or the nearest existing folder above it, when that is not a folder."""
    for path in (root, *root.parents):
        try:
            if path.exists():
                return None if path.is_dir() else path
        except OSError:  # unreadable: the write probe says why
            return None
    return None


def check_writable(root: StrPath | OutputRoot) -> None:
    """Create the folder and prove a file can be written and synced there; on object storage,
    prove an object can be written and deleted there (the bucket exists, the keys may write)."""
    out = OutputRoot.of(root)
    if not out.is_local:
        _check_bucket(out)
        return
    root = out.local_path()
    blocker = _file_in_the_way(root)
    if blocker == root:
        raise OutputError(f"output folder {root} is a file")
    if blocker is not None:
        raise OutputError(f"output folder {root} is not writable: {blocker} is a file")
    probe = root / f".write-probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError(f"output folder {root} is not writable: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # also when the disk was full: leave nothing behind


def _check_bucket(out: OutputRoot) -> None:
    import obstore
    from obstore.exceptions import BaseError

    from ernie_batch.buckets import client

    location = out.location
    store = client(out.object_access(), location.scheme, location.bucket)
    probe = f"{location.key}/.write-probe-{os.getpid()}".lstrip("/")
    try:
        obstore.put(store, probe, b"probe")
        obstore.delete(store, probe)
    except (BaseError, OSError) as exc:  # its kind, status and S3 code: never a credential
        raise OutputError(f"output {out.url} is not writable: {why(exc)}") from None


def why(exc: BaseException) -> str:
    """An object-store error in a few words: its kind, the HTTP status and S3's error code
    (the whole text may quote a signed request)."""
    text = str(exc)
    status = re.search(r"status (\d{3}[A-Za-z ]*)", text)
    code = re.search(r"<Code>(\w+)</Code>", text)
    return ", ".join([type(exc).__name__, *(m.group(1).strip() for m in (status, code) if m)])
