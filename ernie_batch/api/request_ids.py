"""The `X-Client-Request-Id` of each attempt: built from run id, unit key and attempt number, and read back.

The vendor accepts 1-128 characters of `A-Z a-z 0-9 . _ : -` and silently drops anything
else (the request still runs and is billed, but nothing correlates it), so the builder
never lets another character or a longer value through: a part that does not fit the rule
is replaced by a digest of itself. The id is `eb:<run_id>:<key>:<attempt>`; `parse()` reads
it back, so `reconcile` knows a vendor row for a selected run even when no attempt row holds it
(a run still writing, or a journal not folded yet).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

VENDOR_RULE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PREFIX = "eb"
_PART = re.compile(r"[A-Za-z0-9._-]+")  # one part: the rule's characters, less the separator
_DIGITS = re.compile(r"[1-9][0-9]{0,18}")
_MAX_RUN_ID = 40
_MAX_KEY = 64


def _fit(part: str, limit: int) -> str:
    """The part itself when it follows the rule and fits; otherwise a digest standing for it."""
    if len(part) <= limit and _PART.fullmatch(part):
        return part
    return "h." + hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[: limit - 2]


def run_part(run_id: str) -> str:
    """How a run id appears inside the ids (itself, for every id `store.new_run_id` makes)."""
    return _fit(run_id, _MAX_RUN_ID)


def build(run_id: str, key: str, attempt: int) -> str:
    """The id of one attempt: unique per (run, unit, attempt), always within the vendor's rule.

    At most 3 + 40 + 1 + 64 + 1 + len(str(attempt)) characters: 128 holds attempt numbers
    up to 19 digits; the attempt is an int16 column, so it never comes close.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt}")
    value = f"{PREFIX}:{run_part(run_id)}:{_fit(key, _MAX_KEY)}:{attempt}"
    if not VENDOR_RULE.fullmatch(value):  # only a preposterous attempt number gets here
        raise ValueError(f"attempt number too large for a request id: {attempt}")
    return value


@dataclass(frozen=True, slots=True)
class RequestRef:
    """What an id built here says: whose attempt it was (`run_id` as `run_part` gives it)."""

    run_id: str
    key: str
    attempt: int


def parse(value: str | None) -> RequestRef | None:
    """The (run id, key, attempt) of an id `build()` made; None for anything else."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != PREFIX or not _DIGITS.fullmatch(parts[3]):
        return None
    return RequestRef(parts[1], parts[2], int(parts[3]))
