"""The config's sections as pydantic models, with their defaults and checks: what a job is."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from ernie_batch.answers.template import ResolvedPrompt
from ernie_batch.buckets import check_options, resolve_access
from ernie_batch.location import Location, OutputRoot, default_state_dir

DEFAULT_MODEL = "baidu/ernie-4.5-vl-424b-a47b"
DEFAULT_BASE_URL = "https://api.aimlapi.com/v1"
CREDITS_PER_USD = 2_000_000  # the vendor's published conversion


def whole_credits(credits: float) -> int:
    """Credits as the vendor bills them (headers, usage logs): an integer, halves rounded up."""
    return math.floor(credits + 0.5)

DEFAULT_TEMPLATE = (
    "You are reading page $page of $page_count of the document '$file_name'.\n"
    "Extract the requested fields and answer with JSON only."
)

DEFAULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        # x- keywords are never sent (nor hashed): these two are not on the page as written
        "language": {"type": "string", "x-evidence": False},
        "summary": {"type": "string", "x-evidence": False},
    },
    "required": ["title", "language", "summary"],
    "additionalProperties": False,
}


class _Section(BaseModel):
    # an assignment is validated too: `cfg.output.path = Path(...)` becomes a Location
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# `[output] storage_options` / `[sources] storage_options`: settings of the object-store
# client (buckets.py); a value may be "env:NAME", a secret must be
StorageOptionsField = dict[str, str | bool | int | float]


def _storage_options(v: dict[str, Any]) -> dict[str, str]:
    return check_options(v)


class SourceOptions(_Section):
    """Where documents come from and which files count."""

    # local folders or files, or object-store prefixes and objects (s3://bucket/inbox/)
    paths: list[Location] = Field(default_factory=lambda: [Location.parse("data/inbox")])
    include: list[str] = Field(default_factory=lambda: ["**/*"])
    exclude: list[str] = Field(default_factory=list)
    follow_symlinks: bool = False
    settle_seconds: float = 0.0  # files modified more recently than this are still growing
    since: str | None = None  # ISO date or datetime, inclusive
    until: str | None = None  # ISO date or datetime, exclusive
    date_from: Literal["mtime", "path"] = "mtime"
    path_date_pattern: str = r"(\d{4}-\d{2}-\d{2})"
    storage_options: StorageOptionsField = Field(default_factory=dict)  # empty: the output's

    _options = field_validator("storage_options")(_storage_options)


class ApiOptions(_Section):
    """The endpoint: AI/ML API by default, any OpenAI-compatible vision endpoint otherwise."""

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key_env: str = "AIMLAPI_API_KEY"
    secret_block: str | None = None  # name of a Prefect Secret block holding the key
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    allow_insecure_http: bool = False  # send the key over plain HTTP to a non-loopback host
    usage_logs_url: str | None = None  # GET /v2/logs; default: base_url less its /v1, + /v2/logs


class RequestOptions(_Section):
    """Model parameters sent with every request (they are part of the fingerprint)."""

    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0.01, le=1)
    seed: int | None = Field(default=None, ge=1)
    response_format: Literal["json_schema", "json_object", "text"] = "json_schema"
    strict: bool = True
    system_message: bool = False  # instructions as a system message (some models reject it)
    image_detail: Literal["low", "high", "auto"] | None = None


class PromptOptions(_Section):
    """The one prompt template of the job and its output schema."""

    template: str | None = None
    template_file: Path | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    output_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_file: Path | None = None
    schema_name: str = "page_extraction"
    label: str | None = None  # a name for this prompt version in runs and reports (not hashed)
    # ask for a quote per field and verify it against the page's text layer (hashed: the
    # request changes); see answers/evidence.py
    evidence: bool = False

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_of_each(self) -> PromptOptions:
        if self.template is not None and self.template_file is not None:
            raise ValueError("give either template or template_file, not both")
        if self.output_schema is not None and self.schema_file is not None:
            raise ValueError("give either schema or schema_file, not both")
        return self


class LimitOptions(_Section):
    """The request budget. 0 means off for each limit."""

    concurrency: int = Field(default=16, ge=1, le=2048)
    rpm: float = Field(default=60.0, ge=0)
    tpm: float = Field(default=0.0, ge=0)
    adaptive: bool = True  # lower the rate on 429s, climb back after successes
    # the server's limit window; rpm and tpm stay per minute (rpm * window_s / 60 per window).
    # Shorter windows compress time for benchmarks and tests against the simulator
    window_s: float = Field(default=60.0, gt=0)


class RetryOptions(_Section):
    transport: int = Field(default=5, ge=0, le=50)  # retries after transport trouble, 429, 5xx
    answer: int = Field(default=2, ge=0, le=10)  # retries after an invalid answer
    temperature_step: float = Field(default=0.2, ge=0, le=1)
    backoff_base_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)


class ImageOptions(_Section):
    max_side: int = Field(default=1600, ge=64, le=20000)
    max_bytes: int = Field(default=4_000_000, ge=10_000)
    jpeg_quality: int = Field(default=85, ge=20, le=100)
    all_frames: bool = False  # animations, multi-image HEIF: every frame, not only the first
    max_pixels: int = Field(default=178_956_970, ge=1)  # Pillow's bomb limit by default


class PdfOptions(_Section):
    mode: Literal["pdf", "image"] = "pdf"  # send page PDFs, or render pages to images
    pages_per_request: int = Field(default=1, ge=1, le=100)
    render_max_side: int = Field(default=1288, ge=64, le=10000)
    first_page: int = Field(default=1, ge=1)
    last_page: int | None = Field(default=None, ge=1)
    max_pages: int | None = Field(default=None, ge=1)  # documents with more pages are skipped
    password: SecretStr | None = None


class PrepareOptions(_Section):
    workers: int = Field(default=0, ge=-1, le=64)  # 0: one per core; -1: inline, no processes
    timeout_s: float = Field(default=120.0, gt=0)  # per document
    queue_size: int = Field(default=64, ge=1)
    max_tasks_per_worker: int = Field(default=500, ge=0)  # recycle workers (0: never)


class OutputOptions(_Section):
    path: Location = Location.parse("data/output")  # a local folder, or s3://bucket/prefix
    # a run commits what arrived to its Delta tables this often, and at its end (the journal
    # holds every row in between); sooner when this many page rows wait (a memory bound)
    commit_every_s: float = Field(default=10.0, gt=0)
    flush_rows: int = Field(default=5000, ge=1)
    # an output on object storage: what arrived is also written (not committed) this often,
    # so a machine lost for good costs at most about this many seconds of answers
    stage_every_s: float = Field(default=5.0, gt=0)
    storage_options: StorageOptionsField = Field(default_factory=dict)
    # the local journal and state of a run whose output is on object storage (unused for a
    # local output, whose journal is OUTPUT/_journal); default: `state_folder`
    state_dir: Path | None = None
    # an output on object storage: a run's (or compaction's) lock is a lease object renewed
    # every third of this; a holder that stops renewing (killed, or cut off) loses it after
    lease_ttl_s: float = Field(default=60.0, gt=2)

    _options = field_validator("storage_options")(_storage_options)

    def state_folder(self, environ: dict[str, str] | None = None) -> Path:
        """Where runs of this output keep local state: `state_dir`, or `default_state_dir`."""
        if self.state_dir is not None:
            return self.state_dir.expanduser()
        return default_state_dir(self.path, environ)

    def root(self) -> OutputRoot:
        """The output as the store takes it: on object storage with its access resolved now
        (`env:` references read; ConfigError for one unset)."""
        location = self.path.absolute()
        access = resolve_access(self.storage_options) if location.is_remote else None
        return OutputRoot(OutputRoot.of(location).url, access,
                          self.state_folder() if location.is_remote else None, self.lease_ttl_s)


class BudgetOptions(_Section):
    max_credits: float | None = Field(default=None, gt=0)
    # price used for estimates (plan, budget): credits per token
    credits_per_prompt_token: float = Field(default=0.882, ge=0)
    credits_per_completion_token: float = Field(default=2.625, ge=0)
    # completion tokens of one answer, for estimates; unset: a typical answer of the schema
    expected_completion_tokens: int | None = Field(default=None, ge=0)


class ScheduleOptions(_Section):
    cron: str | None = None
    interval_minutes: float | None = Field(default=None, gt=0)
    timezone: str = "UTC"


class ReconcileOptions(_Section):
    """`ernie-batch reconcile` against the vendor's usage logs, and its schedule under `serve`."""

    lag_s: float = Field(default=120.0, ge=0)  # the vendor logs a charge this long after delivery
    cron: str | None = None  # serve reconciles on this cron (schedule.timezone), when set
    lookback_days: float = Field(default=3.0, gt=0, le=92)  # scheduled: runs started this recently


class ReviewOptions(_Section):
    """The review page (`ernie-batch review`, and one per run when `html` is true)."""

    html: bool = False  # write OUTPUT/review/<run_id>.html at the end of each run
    pages_per_file: int = Field(default=2000, ge=1)  # more pages split into linked files
    thumb_side: int = Field(default=800, ge=64, le=4000)  # longest side of a thumbnail, pixels
    # JPEG bytes a thumbnail may take (base64 in the page adds a third: 15,000 -> 20 KB)
    thumb_bytes: int = Field(default=15_000, ge=10_000)


class ScaleOptions(_Section):
    """Runs split into shard runs on a Prefect work pool (`run`/`backfill --pool`)."""

    pool: str | None = None  # a work pool made by `ernie-batch deploy`; unset: one process
    shards: int = Field(default=2, ge=1, le=256)
    retries: int = Field(default=2, ge=0, le=10)  # a crashed shard run is submitted again


# vacuum never deletes a file younger than this: a reader or writer in flight may still use it
VACUUM_FLOOR_HOURS = 24.0


class CompactOptions(_Section):
    cron: str | None = None  # `serve` compacts the output on this schedule (schedule.timezone)
    target_file_mb: int = Field(default=128, ge=1)  # optimize writes files of about this size
    vacuum_retention_hours: float = Field(default=168.0, ge=VACUUM_FLOOR_HOURS)


class ServerOptions(_Section):
    """The local Prefect server of `run`, `backfill`, `demo` and `serve` when no PREFECT_API_URL
    is configured (`ernie_batch.server`): one per home, kept running between commands."""

    background: bool = True  # false: each command starts (and stops) a server of its own
    home: Path | None = None  # its PREFECT_HOME (database, state file, log); unset: PREFECT_HOME
    port: int = Field(default=0, ge=0, le=65535)  # 0: a free port, chosen when it starts
    idle_shutdown_minutes: float = Field(default=10.0, gt=0)  # no command, no request that long


class EvalOptions(_Section):
    """How `ernie-batch eval` scores this version's answers against labels."""

    # relative tolerance per number field ("total_amount", or "line_items.amount" inside lists)
    tolerances: dict[str, float] = Field(default_factory=dict)
    default_tolerance: float = Field(default=0.005, ge=0)  # numbers without their own: 0.5 %

    @field_validator("tolerances")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, t in v.items() if t < 0]
        if bad:
            raise ValueError(f"{bad[0]}: a tolerance is a relative difference, 0 or more")
        return v


class JobConfig(_Section):
    """Everything one job needs; `prompt.fingerprint()` digests what shapes an answer."""

    name: str = "ernie-batch"
    sources: SourceOptions = Field(default_factory=SourceOptions)
    api: ApiOptions = Field(default_factory=ApiOptions)
    request: RequestOptions = Field(default_factory=RequestOptions)
    prompt: PromptOptions = Field(default_factory=PromptOptions)
    limits: LimitOptions = Field(default_factory=LimitOptions)
    retries: RetryOptions = Field(default_factory=RetryOptions)
    images: ImageOptions = Field(default_factory=ImageOptions)
    pdf: PdfOptions = Field(default_factory=PdfOptions)
    prepare: PrepareOptions = Field(default_factory=PrepareOptions)
    output: OutputOptions = Field(default_factory=OutputOptions)
    budget: BudgetOptions = Field(default_factory=BudgetOptions)
    schedule: ScheduleOptions = Field(default_factory=ScheduleOptions)
    reconcile: ReconcileOptions = Field(default_factory=ReconcileOptions)
    review: ReviewOptions = Field(default_factory=ReviewOptions)
    compact: CompactOptions = Field(default_factory=CompactOptions)
    scale: ScaleOptions = Field(default_factory=ScaleOptions)
    eval: EvalOptions = Field(default_factory=EvalOptions)  # how `ernie-batch eval` scores
    server: ServerOptions = Field(default_factory=ServerOptions)

    # resolved by load_config, not read from the file
    config_path: Path | None = Field(default=None, exclude=True)
    resolved: ResolvedPrompt = Field(
        default_factory=lambda: ResolvedPrompt(DEFAULT_TEMPLATE, DEFAULT_SCHEMA), exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _sources_reach_storage(self) -> JobConfig:
        """Sources on object storage use the output's storage options unless they have their own."""
        if not self.sources.storage_options and self.output.storage_options:
            self.sources.storage_options = dict(self.output.storage_options)
        return self
