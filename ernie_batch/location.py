"""Where sources and output live: a local path or an object-store URL, never one mistaken for the other.

`pathlib.Path("s3://bucket/inbox")` is `s3:/bucket/inbox`, a folder relative to the current
one; so every place a user names (`output.path`, `sources.paths`, SOURCES, `--output`) is
parsed once into a `Location`, which keeps a local path exactly as given (`str()` is what
`str(Path(...))` was) and an object-store URL as scheme, bucket and key. A local location
is `os.PathLike`, so `Path(location)` and `open(location)` keep working where a folder is
meant; a remote one refuses to become a path, loudly, rather than become a wrong folder.

An output is one more thing: an `OutputRoot`, its location with how to reach it (the
object-store access, never printed) and where a run keeps what must stay local to its
machine (journal, run-id locks: `state_dir`). The store takes a root as text, any
`os.PathLike`, a `Location` or an `OutputRoot`; only `OutputRoot.of` interprets it.

`gs://` and `az://` parse like `s3://` (they reach the same object-store layer); only
`s3://` is tested here.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from ernie_batch.buckets import ObjectAccess

REMOTE_SCHEMES = ("s3", "gs", "az")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)\Z", re.DOTALL)


@dataclass(frozen=True, slots=True, eq=False)
class Location:
    """A local path (`local` set) or an object-store location (`scheme`, `bucket`, `key`).

    A remote `key` never starts or ends with "/": `s3://b/inbox/` and `s3://b/inbox` name the
    same prefix (a "folder"); "" is the whole bucket. A local location equals (and hashes as)
    its path and answers its path's methods, so code and tests that held paths keep working.
    """

    scheme: str  # "file" or one of REMOTE_SCHEMES
    bucket: str = ""
    key: str = ""
    local: Path | None = None

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Location) -> Location:
        """A location from what a user wrote; ValueError (one line) when it cannot be one."""
        if isinstance(value, Location):
            return value
        if isinstance(value, os.PathLike):
            return cls("file", local=Path(value))
        if not isinstance(value, str):
            raise ValueError(f"{value!r}: not a path or a URL")
        m = _URL.match(value.strip())
        if m is None:
            if not value.strip():
                raise ValueError("an empty path")
            return cls("file", local=Path(value))
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "file":
            return cls("file", local=Path(rest or "/"))
        if scheme not in REMOTE_SCHEMES:
            raise ValueError(f"{value}: unsupported URL scheme {scheme!r} "
                             f"(a local path, or {', '.join(s + '://' for s in REMOTE_SCHEMES)})")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{value}: no bucket name ({scheme}://BUCKET/PREFIX)")
        return cls(scheme, bucket, key.strip("/"))

    @property
    def is_remote(self) -> bool:
        return self.local is None

    def __getattr__(self, name: str) -> Any:
        """A local location answers as its `Path` does (`glob`, `exists`, `mkdir`, ...): code
        that held `output.path` as a Path keeps working. A remote one has no such methods."""
        if name.startswith("__") or name in Location.__slots__:
            raise AttributeError(name)
        if self.local is None:
            raise AttributeError(f"{self} is on object storage: it has no {name!r}")
        return getattr(self.local, name)

    def _identity(self) -> object:
        return self.local if self.local is not None else (self.scheme, self.bucket, self.key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Location):
            return self._identity() == other._identity()
        if isinstance(other, PurePath):
            return self.local == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._identity())

    def __str__(self) -> str:
        if self.local is not None:
            return str(self.local)
        return f"{self.scheme}://{self.bucket}" + (f"/{self.key}" if self.key else "")

    def __fspath__(self) -> str:
        if self.local is None:
            raise TypeError(f"{self} is on object storage, not a local path")
        return os.fspath(self.local)

    def join(self, *parts: str) -> Location:
        """The location `parts` below this one ("a/b" or "a", "b")."""
        if self.local is not None:
            return Location("file", local=self.local.joinpath(*parts))
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return Location(self.scheme, self.bucket, f"{self.key}/{tail}".strip("/"))

    def __truediv__(self, part: str) -> Location:
        return self.join(part)

    @property
    def parent(self) -> Location:
        if self.local is not None:
            return Location("file", local=self.local.parent)
        return Location(self.scheme, self.bucket, self.key.rpartition("/")[0])

    @property
    def name(self) -> str:
        if self.local is not None:
            return self.local.name
        return self.key.rpartition("/")[2]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def absolute(self) -> Location:
        """A local path with `~` expanded and made absolute (not resolved); a URL as it is."""
        if self.local is None:
            return self
        return Location("file", local=self.local.expanduser().absolute())

    def relative_to(self, root: Location) -> str:
        """This location under `root`, as a posix path; ValueError when it is not under it."""
        if self.local is not None and root.local is not None:
            return self.local.relative_to(root.local).as_posix()
        if (self.scheme, self.bucket) != (root.scheme, root.bucket) or self.local or root.local:
            raise ValueError(f"{self} is not under {root}")
        if not root.key:
            return self.key
        if not self.key.startswith(root.key + "/"):
            raise ValueError(f"{self} is not under {root}")
        return self.key[len(root.key) + 1:]

    # pydantic: a config field typed `Location` reads a string (or a path) and writes one back
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(str))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, str]:
        return {"type": "string", "description": "a local path or s3://bucket/prefix"}


StrPath = str | os.PathLike[str]  # what the reading API takes: "data/output" as the README shows


def default_state_dir(location: Location, environ: dict[str, str] | None = None) -> Path:
    """Where runs of an output keep local state by default: `OUTPUT/_journal` for a folder;
    for a URL one folder per output under the user's cache (`$XDG_CACHE_HOME`, else
    ~/.cache)/ernie-batch/state."""
    if not location.is_remote:
        return Path(location) / "_journal"
    env = os.environ if environ is None else environ
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(location).encode()).hexdigest()[:12]
    return cache / "ernie-batch" / "state" / f"{location.bucket}-{digest}"


@dataclass(frozen=True)
class OutputRoot:
    """An output: where its tables live (`url`: an absolute folder or a URL), how to reach it
    (`access`: None for a folder, or the environment's), and its local state folder."""

    url: str
    access: ObjectAccess | None = field(default=None, repr=False, compare=False)
    state_dir: Path | None = field(default=None, compare=False)
    lease_ttl_s: float = field(default=60.0, compare=False)  # locks on object storage
    # False only for `migrate`, which works on tables still (partly) in the earlier layout
    check_layout: bool = field(default=True, repr=False, compare=False)

    @classmethod
    def of(cls, root: StrPath | Location | OutputRoot) -> OutputRoot:
        if isinstance(root, OutputRoot):
            return root
        location = Location.parse(root)
        if location.is_remote:
            return cls(str(location))
        return cls(os.path.abspath(os.path.expanduser(os.fspath(location))))

    @property
    def location(self) -> Location:
        return Location.parse(self.url)

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def storage_options(self) -> dict[str, str] | None:
        """What delta-rs is given (None: a folder, or the environment, which it reads itself)."""
        return self.access.config() if self.access is not None else None

    def object_access(self) -> ObjectAccess:
        """How an object-store client reaches the output: as given, else from the environment."""
        from ernie_batch.buckets import resolve_access

        return self.access if self.access is not None else resolve_access()

    @property
    def journal_dir(self) -> Path:
        """Where runs journal their rows and hold their run-id locks: on this machine."""
        return self.state_dir if self.state_dir is not None else default_state_dir(self.location)

    def table_uri(self, table: str) -> str:
        return f"{self.url}/{table}"

    def local_path(self, *parts: str) -> Path:
        """A path under a local root (locks, the old layout): none for a URL."""
        if not self.is_local:
            from ernie_batch.errors import OutputError

            raise OutputError(f"output {self.url}: a local folder is needed here")
        return Path(self.url, *parts)

    def arrow_filesystem(self, table: str) -> pafs.FileSystem | None:
        """The filesystem a reader of `table`'s data files uses: pyarrow's own for a local
        folder (three times faster than going through delta-rs's handler), None (delta-rs's
        handler, with the storage options) elsewhere."""
        if not self.is_local:
            return None
        import pyarrow.fs as pafs

        return pafs.SubTreeFileSystem(self.table_uri(table), pafs.LocalFileSystem())

    def __str__(self) -> str:
        return self.url
