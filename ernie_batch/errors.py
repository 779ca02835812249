"""Every error ernie-batch raises on purpose, under one base, each phrased as one line.

A caller that wants "anything ernie-batch refused" catches `ErnieBatchError`; one that
catches a builtin today (a `ValueError` for bad media or a bad schedule) still can:

    ErnieBatchError
    ├── ConfigError           a config, flag or key problem: file, field, what is wrong
    │   ├── ScheduleError     (also ValueError) the [schedule] cannot be served
    │   └── LabelsError       an `eval` labels file that cannot be used: file, line, what
    ├── InputError            a document, page or media part that cannot be used
    │   ├── ContentError      (also ValueError) a request's media part cannot be decoded
    │   ├── PdfError          a PDF or page that cannot be prepared (row status, pages)
    │   └── ImageError        an image or frame that cannot be prepared
    ├── OutputError           the output folder cannot be used (found before any request)
    │   └── UnconvertedOutputError  written by an earlier release: `ernie-batch migrate` first
    ├── LockedError           another live run holds the output folder
    │   └── LeaseLost         a lease this process held was taken over (or not renewed in time)
    ├── BudgetStopped         the run is stopping: no more requests may be sent
    ├── UsageLogsError        the vendor's usage logs could not be read (401, 403, network)
    │   └── NoUsageLogs       the endpoint has no usage logs (404: vLLM, Ollama)
    └── ServerStartError      (also RuntimeError) the local Prefect server did not come up

The simulator's HTTP control-flow exception (`ernie_batch.sim.validation.ApiError`) is not a user
error and stays outside this tree.
"""

from __future__ import annotations

import re

from ernie_batch.vocab import UnitStatus

# "stream <_io.BytesIO object at 0x7f..>: " - how qpdf names a file opened from memory (the
# PDF fallbacks do): no use to a reader, and an address makes every row's text unique
_OBJECT_REPR = re.compile(r"(?:stream )?<[\w.]+ object at 0x[0-9a-fA-F]+>(?::|,)?\s*")


class ErnieBatchError(Exception):
    """Base of every error ernie-batch raises on purpose; str() is one line."""


class ConfigError(ErnieBatchError):
    """A configuration problem, already phrased as one line: where, which field, what is wrong."""


class ScheduleError(ConfigError, ValueError):
    """The config's [schedule] cannot be served; the message is one line."""


class LabelsError(ConfigError):
    """A labels file (`eval --labels`) that cannot be used; the message names file and line."""


class InputError(ErnieBatchError):
    """A document, page or media part that cannot be used; str() is the row's error."""


class ContentError(InputError, ValueError):
    """A content part whose media cannot be decoded (the API answers 400)."""


class PdfError(InputError):
    """A PDF (or page) that cannot be prepared: `status` is the row status, str() its error."""

    def __init__(
        self, message: str, status: UnitStatus = UnitStatus.INPUT_ERROR, page: int = 1, page_last: int = 1
    ) -> None:
        super().__init__(message)
        self.status = status
        self.page, self.page_last = page, max(page, page_last)  # 1-based, for per-page rows


class ImageError(InputError):
    """An image (or one frame) that cannot be prepared; the message is the row's error."""


class OutputError(ErnieBatchError):
    """The output folder cannot be used (unwritable, full): found before any request is sent."""


class UnconvertedOutputError(OutputError):
    """The output folder holds an earlier release's tables (Parquet parts): migrate it first."""


class LockedError(ErnieBatchError):
    """Another live run holds the output folder's lock."""


class LeaseLost(LockedError):
    """A lease this process held was taken over, or could not be renewed within its ttl: its
    holder must stop writing."""


class BudgetStopped(ErnieBatchError):
    """The run is stopping: no more requests may be sent."""


class UsageLogsError(ErnieBatchError):
    """The vendor's usage logs (`GET /v2/logs`) could not be read: a key, network or server problem."""


class NoUsageLogs(UsageLogsError):
    """The endpoint has no usage logs (404): an OpenAI-compatible server that is not the vendor's."""


class ServerStartError(ErnieBatchError, RuntimeError):
    """The local Prefect server did not become healthy; the message says where its log is."""


def one_line(text: object, limit: int = 300) -> str:
    """Whitespace collapsed to single spaces, cut at `limit` characters (an ellipsis marks a cut).

    Default object reprs (`<_io.BytesIO object at 0x...>`) are dropped: the row names its
    file already. An exception with an empty message gives its class name, so a row never
    says nothing.
    """
    line = " ".join(_OBJECT_REPR.sub("", str(text)).split())
    if isinstance(text, BaseException):
        line = line or type(text).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def first_error(exc: ValueError) -> str:
    """One line out of a ValueError or a pydantic ValidationError (a schedule, a cron)."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        return str(errors()[0]["msg"]).removeprefix("Value error, ")
    return str(exc).strip().splitlines()[0]
