"""Shards and manifests: the selection split by content, written where every worker can read it.

Documents are split by content (sha256), so the same content at several paths lands in one
shard (sent once there, `duplicate` rows for the others) and no two shards ever answer the
same unit. Each shard's manifest holds its documents as discovered (path, sha256, type,
size) and how to run them: the config file and the overrides, every path absolute, so a
worker started anywhere finds the same files. Never the key: workers have their own.

The files live under `OUTPUT/_scale/<coordinator run id>/`: `plan.json` (the coordinator's,
kept so a coordinator run again resumes it) and `shard-<n>.json` (a shard run reads its own
once, when it starts, named by its flow run's parameters). Nothing is polled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ernie_batch.config import JobConfig
from ernie_batch.intake.units import Document
from ernie_batch.location import Location
from ernie_batch.store.files import write_text_atomic

SCALE_DIR = "_scale"


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` as JSON, atomically (readers see the old or the new file)."""
    write_text_atomic(path, json.dumps(value, separators=(",", ":")))


def read_json(path: Path) -> Any:
    """The JSON value of `path`, or None when it is missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


@dataclass(frozen=True)
class Folder:
    """The files of one coordinator's run."""

    path: Path

    @classmethod
    def of(cls, output: Path, coordinator_run_id: str) -> Folder:
        return cls(Path(output) / SCALE_DIR / coordinator_run_id)

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    def manifest(self, shard: int) -> Path:
        return self.path / f"shard-{shard}.json"


def split(docs: list[Document], shards: int) -> list[list[Document]]:
    """Documents by content into `shards` groups of about the same size, deterministically."""
    by_content: dict[str, list[Document]] = {}
    for doc in docs:
        by_content.setdefault(doc.sha256, []).append(doc)
    groups: list[list[Document]] = [[] for _ in range(shards)]
    sizes = [0] * shards
    for sha in sorted(by_content, key=lambda s: (-sum(d.size for d in by_content[s]), s)):
        target = min(range(shards), key=lambda i: (sizes[i], i))  # the lightest so far
        groups[target].extend(by_content[sha])
        sizes[target] += sum(d.size for d in by_content[sha])
    return [sorted(g, key=lambda d: str(d.path)) for g in groups]


def document_json(doc: Document) -> dict[str, Any]:
    """A document as its manifest holds it: a path or an object's URL, and its ETag (an
    object's: a later run then knows it without reading it again)."""
    return {"path": str(doc.path), "root": str(doc.root), "sha256": doc.sha256,
            "doc_type": doc.doc_type, "size": doc.size, "mtime": doc.mtime, "etag": doc.etag}


def document_of(value: dict[str, Any]) -> Document:
    """The document `document_json` wrote (paths and URLs parsed as `Location`s)."""
    return Document(path=value["path"], root=value["root"], sha256=value["sha256"],
                    doc_type=value["doc_type"], size=int(value["size"]),
                    mtime=float(value["mtime"]), etag=value.get("etag"))


@dataclass
class Attempt:
    """One shard run submitted for a shard: its run id and its Prefect flow run."""

    run_id: str
    flow_run_id: str | None = None
    submitted_at: float = field(default_factory=time.time)


@dataclass
class Plan:
    """What a coordinator set out to do; kept so a coordinator run again can resume it."""

    coordinator_run_id: str
    selection: str  # a digest of what was selected and how (resuming needs the same)
    shards: int
    attempts: list[list[Attempt]] = field(default_factory=list)  # per shard, oldest first
    documents: list[int] = field(default_factory=list)  # per shard

    def write(self, folder: Folder) -> None:
        write_json(folder.plan, asdict(self))

    @classmethod
    def read(cls, folder: Folder) -> Plan | None:
        value = read_json(folder.plan)
        if not isinstance(value, dict):
            return None
        value["attempts"] = [[Attempt(**a) for a in shard] for shard in value.get("attempts", [])]
        known = {f for f in cls.__dataclass_fields__}  # a plan of an earlier version: its fields
        return cls(**{k: v for k, v in value.items() if k in known})


def absolute_overrides(cfg: JobConfig, overrides: dict[str, Any],
                       sources: list[str] | None) -> dict[str, Any]:
    """The overrides a worker needs to see what the coordinator sees: every path absolute
    (an object-store URL stays as it is)."""
    out = dict(overrides)
    out["output.path"] = str(Location.parse(cfg.output.path).absolute())
    out["sources.paths"] = [str(Location.parse(p).absolute())
                            for p in (sources or cfg.sources.paths)]
    for key in ("prompt.template_file", "prompt.schema_file"):
        if out.get(key):
            out[key] = str(Path(out[key]).expanduser().absolute())
    return out


def shard_overrides(overrides: dict[str, Any], cfg: JobConfig, shards: int) -> dict[str, Any]:
    """Each shard's share of `budget.max_credits` (README "Running on several machines")."""
    if cfg.budget.max_credits is None:
        return overrides
    return {**overrides, "budget.max_credits": cfg.budget.max_credits / shards}


def selection_digest(how: dict[str, Any], shards: int, shas: list[str]) -> str:
    """What identifies a coordinated run's plan: the same command over the same content."""
    text = json.dumps([how, shards, sorted(shas)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def find_unfinished(root: Path, digest: str) -> Plan | None:
    """The plan of a coordinator of this selection that died before writing its `runs` row."""
    from ernie_batch import store

    folder = Path(root) / SCALE_DIR
    plans = [Plan.read(Folder(d)) for d in sorted(folder.iterdir())] if folder.is_dir() else []
    candidates = [p for p in plans if p is not None and p.selection == digest]
    if not candidates:
        return None
    runs = store.read_columns(root, "runs", ["run_id"], include_rejected=True)
    finished = set(runs["run_id"].to_pylist()) if runs is not None else set()
    unfinished = [p for p in candidates if p.coordinator_run_id not in finished]
    return unfinished[-1] if unfinished else None


def write_manifest(folder: Folder, shard: int, docs: list[Document],
                   how: dict[str, Any]) -> Path:
    """The shard's manifest: its documents and `how` to run them (config, overrides, kind).

    Each attempt at the shard gets its own run id, given with the flow run's parameters.
    """
    path = folder.manifest(shard)
    write_json(path, {**how, "coordinator_run_id": folder.path.name, "shard": shard,
                      "documents": [document_json(d) for d in docs]})
    return path
