"""Shards and manifests: the selection split by content, written where every worker can read it.

Documents are split by content (sha256), so the same content at several paths lands in one
shard (sent once there, `duplicate` rows for the others) and no two shards ever answer the
same unit. Each shard's manifest holds its documents as discovered (path, sha256, type,
size) and how to run them: the config file and the overrides, every path absolute, so a
worker started anywhere finds the same files. Never the key: workers have their own.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ernie_batch.scale.channel import Channel, read_json, write_json
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

    def write(self, channel: Channel) -> None:
        write_json(channel.plan, asdict(self))

    @classmethod
    def read(cls, channel: Channel) -> Plan | None:
        value = read_json(channel.plan)
        if not isinstance(value, dict):
            return None
        value["attempts"] = [[Attempt(**a) for a in shard] for shard in value.get("attempts", [])]
        return cls(**value)


def write_manifest(channel: Channel, shard: int, docs: list[Document],
                   how: dict[str, Any]) -> Path:
    """The shard's manifest: its documents and `how` to run them (config, overrides, kind).

    Each attempt at the shard gets its own run id, given with the flow run's parameters.
    """
    path = channel.manifest(shard)
    write_json(path, {**how, "coordinator_run_id": channel.folder.name, "shard": shard,
                      "documents": [document_json(d) for d in docs]})
    return path
