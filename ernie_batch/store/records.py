"""The rows of each table as typed records, beside the Arrow schemas they are written with.

The engine builds `PageRow`, `AttemptRow` and `RunRow`; `as_dict()` gives the one dict that
goes, unchanged, into the journal and into the Parquet buffer.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from ernie_batch.vocab import AttemptOutcome

TS = pa.timestamp("us", tz="UTC")

PAGE_HEAD = [
    pa.field("run_id", pa.string()),
    pa.field("key", pa.string()),
    pa.field("fingerprint", pa.string()),
    pa.field("prep_fingerprint", pa.string()),  # preparation settings alone (no prompt)
    pa.field("source_path", pa.string()),
    pa.field("source_sha256", pa.string()),
    pa.field("source_etag", pa.string()),  # an object's ETag when read (null: a local file)
    pa.field("doc_type", pa.string()),
    pa.field("page", pa.int32()),
    pa.field("page_last", pa.int32()),
    pa.field("page_count", pa.int32()),
    pa.field("content_sha256", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("duplicate_of_path", pa.string()),  # on duplicate rows: where the answer is
    pa.field("duplicate_of_run", pa.string()),
    pa.field("answer_json", pa.string()),
    pa.field("raw_answer", pa.string()),
    pa.field("evidence_json", pa.string()),  # [prompt] evidence: field path -> quote, span, status, box
    pa.field("fields_verified", pa.int32()),
    pa.field("fields_checked", pa.int32()),  # not_checked fields count in neither
]
PAGE_TAIL = [
    pa.field("response_id", pa.string()),
    pa.field("attempts", pa.int16()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    # one request's prompt tokens as estimated before sending (`plan` learns billed/estimated)
    pa.field("prompt_tokens_est", pa.int64()),
    pa.field("credits", pa.float64()),
    pa.field("usd", pa.float64()),
    pa.field("latency_s", pa.float64()),  # the answering attempt's request to response
    pa.field("queued_s", pa.float64()),  # the rest of the unit's time: waits, backoff, retries
    pa.field("model", pa.string()),
    pa.field("started_at", TS),
    pa.field("finished_at", TS),
]

ATTEMPTS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("key", pa.string()),
        pa.field("attempt", pa.int16()),
        pa.field("status_code", pa.int16()),
        pa.field("outcome", pa.string()),
        pa.field("error", pa.string()),
        pa.field("response_id", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("credits", pa.float64()),
        pa.field("usd", pa.float64()),
        pa.field("temperature", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("started_at", TS),
        pa.field("client_request_id", pa.string()),
        pa.field("inference_id", pa.string()),
        pa.field("credits_source", pa.string()),  # body, header, or null (no cost known)
        pa.field("cost_mismatch", pa.bool_()),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("config_path", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("started_at", TS),
        pa.field("finished_at", TS),
        pa.field("documents", pa.int64()),
        pa.field("units_ok", pa.int64()),
        pa.field("units_failed", pa.int64()),
        pa.field("units_skipped", pa.int64()),
        pa.field("units_duplicate", pa.int64()),
        pa.field("units_already_done", pa.int64()),
        pa.field("units_not_sent", pa.int64()),
        pa.field("units_selected", pa.int64()),  # the six counts above add up to it
        pa.field("requests", pa.int64()),
        pa.field("rate_limited", pa.int64()),  # 429s attributed to the limit
        pa.field("refused_sporadic", pa.int64()),  # 429s that did not follow the rate
        pa.field("credits", pa.float64()),
        pa.field("usd", pa.float64()),
        pa.field("outcome", pa.string()),
        pa.field("error", pa.string()),
        pa.field("parent_run_id", pa.string()),
        pa.field("shard", pa.int32()),
        pa.field("hostname", pa.string()),
        pa.field("pid", pa.int64()),
        pa.field("template_path", pa.string()),
        pa.field("schema_path", pa.string()),
        pa.field("prompt_label", pa.string()),
        pa.field("accepted_runs", pa.list_(pa.string())),
    ]
)

# one row per row of the vendor's usage logs (`reconcile`), partitioned by its `created` date
BILLING_SCHEMA = pa.schema(
    [
        pa.field("inference_id", pa.string()),  # the vendor's charge id: rows are unique on it
        pa.field("request_id", pa.string()),
        pa.field("client_request_id", pa.string()),
        pa.field("created", TS),
        pa.field("status", pa.string()),  # succeeded, failed
        pa.field("model", pa.string()),
        pa.field("origin", pa.string()),
        pa.field("cost_credits", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("tokens_input", pa.int64()),
        pa.field("tokens_output", pa.int64()),
        pa.field("tokens_total", pa.int64()),
        pa.field("run_id", pa.string()),  # ours: the attempt it is (null for another's request)
        pa.field("key", pa.string()),
        pa.field("attempt", pa.int16()),
        pa.field("matched", pa.bool_()),  # an attempt row of ours holds it
        pa.field("recorded_credits", pa.float64()),  # what that attempt recorded (null: unknown)
        pa.field("reconcile_id", pa.string()),  # the reconcile that wrote this row
        pa.field("reconciled_at", TS),  # when: the newest row per inference_id is the current one
    ]
)
# `billing` is append-only: a later reconcile that attributes a row otherwise writes it again
BILLING_KEY = "inference_id"
BILLING_NEWEST = ("reconciled_at", "reconcile_id")

# `eval`: one row per (eval id, config, field), and the config's totals in its `field = "*"` row
EVALS_SCHEMA = pa.schema(
    [
        pa.field("eval_id", pa.string()),
        pa.field("config", pa.string()),  # the config's path as given on the command line
        pa.field("fingerprint", pa.string()),
        pa.field("field", pa.string()),  # "*": the version's totals
        pa.field("n", pa.int64()),  # labelled (unit, field) pairs
        pa.field("correct", pa.int64()),
        pa.field("accuracy", pa.float64()),
        pa.field("precision", pa.float64()),  # list fields: items matched / answered
        pa.field("recall", pa.float64()),  # list fields: items matched / labelled
        pa.field("f1", pa.float64()),
        # the rest on "*" rows only (null on field rows)
        pa.field("units", pa.int64()),  # units holding the labelled pages and documents
        pa.field("pages", pa.int64()),  # pages they cover
        pa.field("invalid_rate", pa.float64()),  # attempts answered invalid / answered
        pa.field("credits", pa.float64()),  # every attempt of those units, every run
        pa.field("usd", pa.float64()),
        pa.field("credits_per_page", pa.float64()),
        pa.field("usd_per_page", pa.float64()),
        pa.field("cost_per_correct_field", pa.float64()),  # credits; null when none is correct
        pa.field("latency_mean_s", pa.float64()),  # the answering attempts'
        pa.field("latency_p95_s", pa.float64()),
        pa.field("best", pa.bool_()),  # the most accurate version of this eval
        pa.field("gated", pa.bool_()),  # --gate named it and it fell more than --max-drop behind
        pa.field("run_id", pa.string()),  # this eval's run of the version
        pa.field("prompt_label", pa.string()),
        pa.field("config_path", pa.string()),  # resolved
        pa.field("labels_path", pa.string()),  # resolved
        pa.field("created_at", TS),
    ]
)

_HEAD = tuple(f.name for f in PAGE_HEAD)
_TAIL = tuple(f.name for f in PAGE_TAIL)


def pages_schema(answer_fields: list[pa.Field]) -> pa.Schema:
    """The pages schema of one answer schema: its `answer_<field>` columns between head and tail."""
    return pa.schema([*PAGE_HEAD, *answer_fields, *PAGE_TAIL])


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def encode_schema(schema: pa.Schema) -> str:
    """A schema as text for a journal header (Arrow IPC, base64)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _columns(row: object, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(row, name) for name in names}


@dataclass(slots=True)
class PageRow:
    """One request unit's row (`pages`): what was asked, what came back, what it cost."""

    run_id: str
    key: str
    fingerprint: str
    source_path: str
    source_sha256: str
    doc_type: str
    page: int
    page_last: int
    page_count: int | None
    status: str
    error: str | None
    model: str
    started_at: datetime
    finished_at: datetime
    source_etag: str | None = None
    duplicate_of_path: str | None = None
    duplicate_of_run: str | None = None
    prep_fingerprint: str | None = None
    content_sha256: str | None = None
    answer_json: str | None = None
    raw_answer: str | None = None
    evidence_json: str | None = None
    fields_verified: int | None = None
    fields_checked: int | None = None
    answers: dict[str, Any] = field(default_factory=dict)  # answer_<field> -> cell
    response_id: str | None = None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_est: int | None = None  # null on rows of units never sent
    credits: float = 0.0
    usd: float = 0.0
    latency_s: float | None = None
    queued_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**_columns(self, _HEAD), **self.answers, **_columns(self, _TAIL)}


ATTEMPT_COLUMNS = tuple(f.name for f in ATTEMPTS_SCHEMA)


@dataclass(slots=True)
class AttemptRow:
    """One HTTP request's row (`attempts`): its outcome, tokens, credits and timing.

    A `lost` row (sent, no response recorded) knows only what was known before sending:
    tokens, credits, usd and latency are null.
    """

    run_id: str
    key: str
    attempt: int
    status_code: int | None
    outcome: str
    error: str | None
    response_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    credits: float | None
    usd: float | None
    temperature: float | None
    latency_s: float | None
    started_at: datetime
    client_request_id: str | None = None
    inference_id: str | None = None
    credits_source: str | None = None
    cost_mismatch: bool | None = None

    @classmethod
    def lost(cls, run_id: str, key: str, attempt: int, started_at: datetime,
             client_request_id: str | None, temperature: float | None, error: str) -> AttemptRow:
        """The row of a request that was sent and whose response was never recorded."""
        return cls(run_id=run_id, key=key, attempt=attempt, status_code=None, outcome=AttemptOutcome.LOST,
                   error=error, response_id=None, prompt_tokens=None, completion_tokens=None,
                   credits=None, usd=None, temperature=temperature, latency_s=None,
                   started_at=started_at, client_request_id=client_request_id)

    def as_dict(self) -> dict[str, Any]:
        return _columns(self, ATTEMPT_COLUMNS)


RUN_COLUMNS = tuple(f.name for f in RUNS_SCHEMA)


@dataclass(slots=True)
class RunRow:
    """A run's manifest (`runs`), written last: what it saw, did and spent, and how it ended.

    A coordinator's row (`kind = "coordinator"`) has null counters and money: its shard runs
    (`parent_run_id` = its id) carry them, so nothing is counted twice.
    """

    run_id: str
    kind: str | None
    config_path: str | None
    fingerprint: str | None
    started_at: datetime
    finished_at: datetime | None
    documents: int | None
    units_ok: int | None
    units_failed: int | None
    units_skipped: int | None
    units_duplicate: int | None
    units_already_done: int | None
    units_not_sent: int | None
    requests: int | None
    credits: float | None
    usd: float | None
    outcome: str
    error: str | None
    parent_run_id: str | None = None
    shard: int | None = None
    hostname: str | None = None
    pid: int | None = None
    template_path: str | None = None
    schema_path: str | None = None
    prompt_label: str | None = None
    accepted_runs: list[str] | None = None
    units_selected: int | None = None  # None: unknown (a killed run's, a coordinator's)
    rate_limited: int | None = None
    refused_sporadic: int | None = None  # None: not known (a run recovered from its journal)

    def as_dict(self) -> dict[str, Any]:
        return _columns(self, RUN_COLUMNS)


def answer_fields_of(pages: pa.Schema) -> list[pa.Field]:
    """The `answer_<field>` columns of a pages schema (what lies between head and tail)."""
    fixed = set(_HEAD) | set(_TAIL)
    return [f for f in pages if f.name not in fixed]


DOCUMENT_HEAD = [
    pa.field("run_id", pa.string()),  # the run that built this generation of the row
    pa.field("key", pa.string()),  # sha256 of source_sha256 and fingerprint
    pa.field("fingerprint", pa.string()),
    pa.field("source_sha256", pa.string()),
    pa.field("source_paths", pa.list_(pa.string())),
    pa.field("doc_type", pa.string()),
    pa.field("page_count", pa.int32()),
    pa.field("pages_ok", pa.int32()),
    pa.field("pages_failed", pa.int32()),
    pa.field("pages_missing", pa.int32()),
    pa.field("complete", pa.bool_()),
    pa.field("answer_json", pa.string()),
]
DOCUMENT_TAIL = [
    pa.field("provenance_json", pa.string()),
    pa.field("evidence_json", pa.string()),  # each merged field's, from the page it came from
    pa.field("conflicts_json", pa.string()),
    pa.field("credits", pa.float64()),
    pa.field("usd", pa.float64()),
    pa.field("built_at", TS),
]


def documents_schema(answer_fields: list[pa.Field]) -> pa.Schema:
    """The documents schema of one answer schema: `answer_<field>` typed as in `pages`."""
    return pa.schema([*DOCUMENT_HEAD, *answer_fields, *DOCUMENT_TAIL])


_DOC_HEAD = tuple(f.name for f in DOCUMENT_HEAD)
_DOC_TAIL = tuple(f.name for f in DOCUMENT_TAIL)


@dataclass(slots=True)
class DocumentRow:
    """One document's row (`documents`): its pages' answers merged, where each value came from."""

    run_id: str
    key: str
    fingerprint: str
    source_sha256: str
    source_paths: list[str]
    doc_type: str | None
    page_count: int | None
    pages_ok: int
    pages_failed: int
    pages_missing: int
    complete: bool
    answer_json: str | None
    answers: dict[str, Any]  # answer_<field> -> cell
    provenance_json: str
    conflicts_json: str | None  # None: no field whose rule is `all` saw pages disagree
    credits: float
    usd: float
    built_at: datetime
    evidence_json: str | None = None  # null: no page of it carries evidence

    def as_dict(self) -> dict[str, Any]:
        return {**_columns(self, _DOC_HEAD), **self.answers, **_columns(self, _DOC_TAIL)}
