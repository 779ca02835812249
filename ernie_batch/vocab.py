"""The words every table, summary and exit shares: unit statuses, attempt and run outcomes, exit codes.

Each is defined once here. They are `StrEnum`s, so the values written to Parquet, the
journal and `--json` are the plain strings users filter on (`status == "ok"`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class UnitStatus(StrEnum):
    """What became of one request unit (the `pages.status` column)."""

    OK = "ok"
    INVALID_ANSWER = "invalid_answer"  # answers kept failing validation
    API_ERROR = "api_error"  # transport, 429, 5xx or 4xx until retries ran out
    INPUT_ERROR = "input_error"  # the file or page could not be prepared
    SKIPPED = "skipped"  # not sent by rule (unsupported type, pdf.max_pages)
    DUPLICATE = "duplicate"  # same content already answered under another path


# retried by later runs by themselves: invalid_answer, api_error; these only with --retry-failed
FINAL_FAILURES = frozenset({UnitStatus.INPUT_ERROR, UnitStatus.SKIPPED})
FAILED = frozenset({UnitStatus.INVALID_ANSWER, UnitStatus.API_ERROR, UnitStatus.INPUT_ERROR})


class EvidenceStatus(StrEnum):
    """How a field's value stands against the page's own text (`pages.evidence_json`)."""

    VERIFIED = "verified"  # the quote is on the page and the value stands in what it matched
    QUOTE_NOT_ON_PAGE = "quote_not_on_page"
    VALUE_NOT_IN_QUOTE = "value_not_in_quote"  # the quote is there, the value is not
    NO_TEXT_LAYER = "no_text_layer"  # an image, a scan without text, a garbage text layer
    NO_QUOTE = "no_quote"  # the model gave none
    NOT_CHECKED = "not_checked"  # not expected on the page as written (enums, booleans, ...)


class AttemptOutcome(StrEnum):
    """How one HTTP request ended (the `attempts.outcome` column)."""

    OK = "ok"
    INVALID_ANSWER = "invalid_answer"  # billed, but the answer failed validation
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx
    TRANSPORT_ERROR = "transport_error"  # timeout, reset, unreadable body
    BAD_REQUEST = "bad_request"  # another 4xx: the request is wrong
    FATAL = "fatal"  # 401, 403, 404: the whole run stops
    LOST = "lost"  # sent, but no response recorded: the process died or abandoned it (credits null)


class CreditsSource(StrEnum):
    """Where an attempt's credits came from (the `attempts.credits_source` column; null: no cost known)."""

    BODY = "body"  # meta.usage.credits_used of the response body
    HEADER = "header"  # x-aimlapi-credits-used: the body was lost or carried none


class RunKind(StrEnum):
    """What started a run (the `runs.kind` column)."""

    RUN = "run"
    INGEST = "ingest"  # a scheduled run of the ingest flow
    BACKFILL = "backfill"
    DEMO = "demo"
    EVAL = "eval"
    COORDINATOR = "coordinator"  # splits a selection into shard runs on a work pool
    SHARD = "shard"
    REBUILD = "rebuild"  # `documents --rebuild`: a new generation of documents, nothing sent


class MergeRule(StrEnum):
    """How a document's page answers merge into one value (a schema property's `x-merge`)."""

    FIRST = "first"  # the first non-null value in page order (the default, arrays aside)
    LAST = "last"  # the last non-null value
    CONCAT = "concat"  # arrays: every item, in page order (the default for arrays)
    UNIQUE = "unique"  # arrays: concat without repeats (a row repeated across a page break)
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    ALL = "all"  # every page that answers must agree; disagreement is a conflict


class RunOutcome(StrEnum):
    """How a run ended (the `runs.outcome` column and the summary)."""

    COMPLETED = "completed"
    PARTIAL = "partial"  # some units failed
    FATAL_API_ERROR = "fatal_api_error"
    BUDGET_STOPPED = "budget_stopped"
    INTERRUPTED = "interrupted"


class PreviewCheck(StrEnum):
    """What the review found when it re-created a page from its source (a card's thumbnail)."""

    MATCH = "match"  # the media re-created is byte for byte what was sent (content_sha256)
    DIFFERS = "differs"  # same source, other media: preparation options or libraries changed
    UNCHECKED = "unchecked"  # nothing recorded to compare with (the page was never sent)
    GONE = "gone"  # the source file is no longer there: placeholder
    CHANGED = "changed"  # the source file's sha256 is not the one recorded: placeholder
    UNAVAILABLE = "unavailable"  # the page cannot be rendered: placeholder with the reason


class PassedOver(StrEnum):
    """Why discovery did not consider a file (`files_passed_over` in summaries and `--json`)."""

    EXCLUDED = "excluded"  # sources.include / exclude
    HIDDEN = "hidden"  # a dot-file or a file in a dot-folder
    TEMPORARY = "temporary"  # an editor's or a copier's temporary file
    PARTIAL = "partial"  # a download still in progress (.part, .crdownload, ...)
    STILL_GROWING = "still_growing"  # modified within sources.settle_seconds
    OUTSIDE_DATES = "outside_dates"  # dated outside [since, until), or no date in its path
    SYMLINK = "symlink"  # a symlink, not followed (or out of the source, or a loop)
    NOT_A_FILE = "not_a_file"  # a device, a socket, a fifo
    UNREADABLE = "unreadable"


class ExitCode(IntEnum):
    """The process exit codes of every command (README "Exit codes")."""

    OK = 0  # everything selected ended ok, or nothing was due
    FAILED = 1  # something new failed in this run (not a unit an earlier run gave up on)
    USAGE = 2  # usage or config error, missing key, unusable output folder
    FATAL = 3  # 401, 403, 404 from the API
    BUDGET = 4  # stopped by budget.max_credits
    LOCKED = 5  # output folder locked by another run
    GATE = 6  # eval --gate: the gated version is worse than allowed
    SERVER = 7  # the Prefect server did not become healthy
    SIGINT = 130
    SIGTERM = 143


RUN_EXIT = {
    RunOutcome.COMPLETED: ExitCode.OK,
    RunOutcome.PARTIAL: ExitCode.FAILED,
    RunOutcome.FATAL_API_ERROR: ExitCode.FATAL,
    RunOutcome.BUDGET_STOPPED: ExitCode.BUDGET,
    RunOutcome.INTERRUPTED: ExitCode.FAILED,
}


@dataclass(slots=True)
class Tally:
    """Units by status: the one place statuses are counted (progress, manifest, recovery)."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    duplicate: int = 0

    def add(self, status: str) -> None:
        if status == UnitStatus.OK:
            self.ok += 1
        elif status == UnitStatus.DUPLICATE:
            self.duplicate += 1
        elif status == UnitStatus.SKIPPED:
            self.skipped += 1
        elif status in FAILED:
            self.failed += 1

    @classmethod
    def of(cls, statuses: Iterable[str]) -> Tally:
        tally = cls()
        for status in statuses:
            tally.add(status)
        return tally
