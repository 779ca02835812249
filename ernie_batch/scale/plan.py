"""Shards and manifests: the selection split by content, written where the output is.

Documents are split by content (sha256), so the same content at several paths lands in one
shard (sent once there, `duplicate` rows for the others) and no two shards ever answer the
same unit. Each shard's manifest holds everything its run needs, as data: its documents as
discovered (object URLs with their ETags, sha256, type, size), the job's config (the
template and the schema inline, as text: never a file to open), the options (kind, force,
retry_failed). Never the key: workers have their own. Nothing in it is a path a worker must
find on its disk, so a worker on another machine, sharing only the Prefect server and the
object store, runs it as it is.

The manifests live with the output, through the output's own store (a file under a folder,
an object in a bucket: `store.files.write_small`), under `_scale/<coordinator run id>/`:
`plan.json` (the coordinator's, kept so a coordinator run again resumes it) and
`shard-<n>.json` (a shard run reads its own once, when it starts, named by its flow run's
parameters). Not the flow run's parameters themselves: a shard's documents may be thousands
(megabytes), and Prefect stores, shows and returns parameters with every read of the flow
run (the coordinator reads its shard runs every half second). Nothing is polled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ernie_batch.config import JobConfig, load_config
from ernie_batch.intake.units import Document
from ernie_batch.location import Location, OutputRoot
from ernie_batch.store.files import list_small, read_small, write_small

SCALE_DIR = "_scale"


def write_json(root: OutputRoot, key: str, value: Any) -> None:
    """Replace `key` below the output with `value` as JSON, whole."""
    write_small(root, key, json.dumps(value, separators=(",", ":")))


def read_json(root: OutputRoot, key: str) -> Any:
    """The JSON value of `key` below the output, or None when it is missing or unreadable."""
    text = read_small(root, key)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Folder:
    """The files of one coordinator's run, below its output (keys, not paths)."""

    root: OutputRoot
    coordinator_run_id: str

    @classmethod
    def of(cls, root: OutputRoot | str | Path, coordinator_run_id: str) -> Folder:
        return cls(OutputRoot.of(root), coordinator_run_id)

    @property
    def key(self) -> str:
        return f"{SCALE_DIR}/{self.coordinator_run_id}"

    @property
    def plan(self) -> str:
        return f"{self.key}/plan.json"

    def manifest(self, shard: int) -> str:
        return f"{self.key}/shard-{shard}.json"


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
        write_json(folder.root, folder.plan, asdict(self))

    @classmethod
    def read(cls, folder: Folder) -> Plan | None:
        value = read_json(folder.root, folder.plan)
        if not isinstance(value, dict):
            return None
        value["attempts"] = [[Attempt(**a) for a in shard] for shard in value.get("attempts", [])]
        known = {f for f in cls.__dataclass_fields__}  # a plan of an earlier version: its fields
        return cls(**{k: v for k, v in value.items() if k in known})


def job_data(cfg: JobConfig, sources: list[str] | None, shards: int) -> dict[str, Any]:
    """The job's config as data, all a shard needs of it: the template and the schema inline
    (their text, not their files), the sources given on the command line, the output as the
    coordinator names it (a folder absolute), each shard's share of `budget.max_credits`
    (README "Running on several machines"). No secret: the key is never in a config, a
    storage option is a reference (`env:NAME`) or no secret (`buckets.check_options`), and a
    PDF password is refused on a pool (`coordinator.pool_problem`)."""
    data = cfg.model_dump(mode="json", by_alias=True, exclude={"pdf": {"password"}})
    data["prompt"] |= {"template": cfg.resolved.template, "template_file": None,
                       "schema": cfg.resolved.schema, "schema_file": None}
    data["output"]["path"] = OutputRoot.of(cfg.output.path).url
    if sources:
        data["sources"]["paths"] = [str(Location.parse(s).absolute()) for s in sources]
    if cfg.budget.max_credits is not None:
        data["budget"]["max_credits"] = cfg.budget.max_credits / shards
    return data


def provenance(cfg: JobConfig) -> dict[str, str | None]:
    """Where the coordinator's config, template and schema were: recorded in each shard
    run's `runs` row as a single run records its own, never opened by a shard."""
    named = {"config_path": cfg.config_path, "template_path": cfg.resolved.template_path,
             "schema_path": cfg.resolved.schema_path}
    return {k: str(v) if v is not None else None for k, v in named.items()}


def job_config(data: dict[str, Any], named: dict[str, str | None] | None = None) -> JobConfig:
    """The config `job_data` wrote, validated as a config file is (ConfigError: one line);
    `named` (`provenance`) only says where its files were."""
    cfg = load_config(None, data)
    named = named or {}

    def path(key: str) -> Path | None:
        return Path(named[key]) if named.get(key) else None

    resolved = dataclasses.replace(cfg.resolved, template_path=path("template_path"),
                                   schema_path=path("schema_path"))
    return cfg.model_copy(update={"config_path": path("config_path"), "resolved": resolved})


def selection_digest(how: dict[str, Any], shards: int, shas: list[str]) -> str:
    """What identifies a coordinated run's plan: the same command over the same content."""
    text = json.dumps([how, shards, sorted(shas)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def find_unfinished(root: OutputRoot, digest: str) -> Plan | None:
    """The plan of a coordinator of this selection that died before writing its `runs` row."""
    from ernie_batch import store

    plans = [Plan.read(Folder(root, key.split("/")[1])) for key in list_small(root, SCALE_DIR)
             if key.count("/") == 2 and key.endswith("/plan.json")]
    candidates = [p for p in plans if p is not None and p.selection == digest]
    if not candidates:
        return None
    runs = store.read_columns(root, "runs", ["run_id"], include_rejected=True)
    finished = set(runs["run_id"].to_pylist()) if runs is not None else set()
    unfinished = [p for p in candidates if p.coordinator_run_id not in finished]
    return unfinished[-1] if unfinished else None


def write_manifest(folder: Folder, shard: int, docs: list[Document],
                   how: dict[str, Any]) -> str:
    """The shard's manifest (its key below the output): its documents and `how` to run them
    (`job_data`, `provenance`, kind, force, retry_failed).

    Each attempt at the shard gets its own run id, given with the flow run's parameters.
    """
    key = folder.manifest(shard)
    write_json(folder.root, key, {**how, "coordinator_run_id": folder.coordinator_run_id,
                                  "shard": shard, "documents": [document_json(d) for d in docs]})
    return key
