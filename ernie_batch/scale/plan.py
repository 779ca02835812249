"""Shards and manifests: the selection split by content, written where every worker can read it.

Documents are split by content (sha256), so the same content at several paths lands in one
shard (sent once there, `duplicate` rows for the others) and no two shards ever answer the
same unit. Each shard's manifest holds its documents as discovered (path, sha256, type,
size) and how to run them: the config file and the overrides, every path absolute, so a
worker started anywhere finds the same files. Never the key: workers have their own.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ernie_batch.config import JobConfig
from ernie_batch.scale.channel import SCALE_DIR, Channel, read_json, write_json
from ernie_batch.units import Document


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
    return {"path": str(doc.path), "root": str(doc.root), "sha256": doc.sha256,
            "doc_type": doc.doc_type, "size": doc.size, "mtime": doc.mtime}


def document_of(value: dict[str, Any]) -> Document:
    return Document(path=Path(value["path"]), root=Path(value["root"]), sha256=value["sha256"],
                    doc_type=value["doc_type"], size=int(value["size"]),
                    mtime=float(value["mtime"]))


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
    per_window: float  # the shared limit: requests per window
    window_s: float
    attempts: list[list[Attempt]] = field(default_factory=list)  # per shard, oldest first
    documents: list[int] = field(default_factory=list)  # per shard

    def write(self, channel: Channel) -> None:
        write_json(channel.plan, asdict(self))

    @classmethod
    def read(cls, channel: Channel) -> Plan | None:
        value = read_json(channel.plan)
        if not isinstance(value, dict):
            return None
        value["attempts"] = [[Attempt(**a) for a in shard] for shard in value.get("attempts", [])]
        return cls(**value)


def absolute_overrides(cfg: JobConfig, overrides: dict[str, Any],
                       sources: list[Path] | None) -> dict[str, Any]:
    """The overrides a worker needs to see what the coordinator sees: every path absolute."""
    out = dict(overrides)
    out["output.path"] = str(Path(cfg.output.path).absolute())
    out["sources.paths"] = [str(Path(p).expanduser().absolute())
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
    plans = [Plan.read(Channel(d)) for d in sorted(folder.iterdir())] if folder.is_dir() else []
    candidates = [p for p in plans if p is not None and p.selection == digest]
    if not candidates:
        return None
    runs = store.read_columns(root, "runs", ["run_id"], include_rejected=True)
    finished = set(runs["run_id"].to_pylist()) if runs is not None else set()
    unfinished = [p for p in candidates if p.coordinator_run_id not in finished]
    return unfinished[-1] if unfinished else None


def write_manifest(channel: Channel, shard: int, docs: list[Document],
                   how: dict[str, Any]) -> Path:
    """The shard's manifest: its documents and `how` to run them (config, overrides, kind).

    Each attempt at the shard gets its own run id, given with the flow run's parameters.
    """
    path = channel.manifest(shard)
    write_json(path, {**how, "coordinator_run_id": channel.folder.name, "shard": shard,
                      "documents": [document_json(d) for d in docs]})
    return path
