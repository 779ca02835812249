"""Job configuration: one TOML file -> a validated `JobConfig`.

    sections  the sections as pydantic models, their defaults and checks (`JobConfig`)
    load      reading a file, overrides, the prompt resolved (`load_config`); the key (`api_key`)

Every command needs both, so the face imports both.
"""

from ernie_batch.config.load import api_key, load_config
from ernie_batch.config.sections import (
    CREDITS_PER_USD,
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    DEFAULT_SCHEMA,
    DEFAULT_TEMPLATE,
    VACUUM_FLOOR_HOURS,
    ApiOptions,
    BudgetOptions,
    CompactOptions,
    EvalOptions,
    ImageOptions,
    JobConfig,
    LimitOptions,
    OutputOptions,
    PdfOptions,
    PrepareOptions,
    PromptOptions,
    ReconcileOptions,
    RequestOptions,
    RetryOptions,
    ReviewOptions,
    ScaleOptions,
    ScheduleOptions,
    ServerOptions,
    SourceOptions,
    whole_credits,
)
from ernie_batch.errors import ConfigError

__all__ = [
    "CREDITS_PER_USD", "DEFAULT_BASE_URL", "DEFAULT_MODEL", "DEFAULT_SCHEMA", "DEFAULT_TEMPLATE",
    "VACUUM_FLOOR_HOURS", "ApiOptions", "BudgetOptions", "CompactOptions", "ConfigError",
    "EvalOptions", "ImageOptions", "JobConfig", "LimitOptions", "OutputOptions", "PdfOptions",
    "PrepareOptions", "PromptOptions", "ReconcileOptions", "RequestOptions", "RetryOptions",
    "ReviewOptions", "ScaleOptions", "ScheduleOptions", "ServerOptions", "SourceOptions",
    "api_key", "load_config", "whole_credits",
]
