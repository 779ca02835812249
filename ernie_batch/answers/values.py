"""Numbers and dates as values, read from page text: `1,234.50` is 1234.5, `05.01.2026` is
`2026-01-05`. Pure functions; verification compares an answer's value with these, never text.

Numbers: digits with thousands separators (`,` `.` `'` or a thin/no-break space) and a
decimal part (`.` or `,`); a minus sign counts only before a number that stands alone. A
number glued to others by `-` or `/` (a date, an invoice number `2026-0117`, a range `1-12`)
is none. Where a notation is ambiguous, every reading is kept: `1,234` is 1234 or 1.234.

Dates: ISO (`2026-01-05`, with a time or not), `2026/01/05`, `05.01.2026` (and `05.01.26`),
`5 Jan 2026`, `5. Januar 2026`, `January 5, 2026`, `5-Jan-2026`; slashes or dashes between
day and month (`01/05/2026`) give both readings unless one is impossible. Month names in
English, German and French.
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

_GROUPED = r"\d{1,3}(?:[,.'\u2009\u202f\u00a0 ]\d{3})+(?:[.,]\d+)?"
_PLAIN = r"\d+(?:[.,]\d+)?"
_NUMBER = re.compile(rf"(?<![\w.,])({_GROUPED}|{_PLAIN})(?![\w]|[.,]\d)")
_MINUS = "-\u2212\u2013"

_MONTHS = {
    1: ("january", "jan", "januar", "janvier", "janv", "jänner"),
    2: ("february", "feb", "februar", "février", "fevrier", "févr", "fev"),
    3: ("march", "mar", "märz", "maerz", "mär", "mars"),
    4: ("april", "apr", "avril", "avr"),
    5: ("may", "mai"),
    6: ("june", "jun", "juni", "juin"),
    7: ("july", "jul", "juli", "juillet", "juil"),
    8: ("august", "aug", "août", "aout"),
    9: ("september", "sep", "sept", "septembre"),
    10: ("october", "oct", "oktober", "okt", "octobre"),
    11: ("november", "nov", "novembre"),
    12: ("december", "dec", "dezember", "dez", "décembre", "decembre", "déc"),
}
_MONTH = {name: number for number, names in _MONTHS.items() for name in names}
_MON = "(" + "|".join(sorted(map(re.escape, _MONTH), key=len, reverse=True)) + r")\.?"

_B = r"(?<![\w.])"  # a date starts a token
_E = r"(?![\w]|[.,/-]\d)"  # and ends one
_DATES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(_B + pattern + _E, re.IGNORECASE), order) for pattern, order in (
        (r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?",
         "ymd"),
        (r"(\d{4})/(\d{1,2})/(\d{1,2})", "ymd"),
        (r"(\d{1,2})\.\s?(\d{1,2})\.\s?(\d{4}|\d{2})", "dmy"),
        (r"(\d{1,2})[/-](\d{1,2})[/-](\d{4}|\d{2})", "either"),
        (r"(\d{1,2})(?:st|nd|rd|th|er)?\.?[\s-]*" + _MON + r"[\s,-]*(\d{4})", "dMy"),
        (_MON + r"\s*(\d{1,2})(?:st|nd|rd|th)?,?\s*(\d{4})", "Mdy"),
    ))


def as_decimal(value: Any) -> Decimal | None:
    """A JSON number as an exact decimal (24.5 and 24.50 are equal), None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:  # inf, nan
        return None


def _readings(token: str) -> set[Decimal]:
    """Every value a number token can mean."""
    seps = [c for c in token if not c.isdigit()]
    if not seps:
        return {Decimal(token)}
    groups = re.split(r"[^\d]", token)
    last = seps[-1]
    out: set[Decimal] = set()
    if all(len(g) == 3 for g in groups[1:]) and len(set(seps)) == 1:
        out.add(Decimal("".join(groups)))  # thousands separators only
        if len(seps) > 1 or last not in ".,":
            return out
    if last in ".,":  # the last separator as the decimal point, the others grouping
        whole = groups[:-1]
        if len(set(seps[:-1])) <= 1 and last not in seps[:-1] and all(
                len(g) == 3 for g in whole[1:]):
            out.add(Decimal("".join(whole) + "." + groups[-1]))
    return out


def numbers_in(text: str) -> set[Decimal]:
    """The values of every number `text` shows, all readings of the ambiguous ones."""
    found: set[Decimal] = set()
    for m in _NUMBER.finditer(text):
        start, end = m.span(1)
        before = text[start - 1] if start else ""
        if before in "-/" and start >= 2 and text[start - 2].isdigit():
            continue  # glued by a dash or slash to the digits before: a date, an id, a range
        if end < len(text) - 1 and text[end] in "-/" and text[end + 1].isdigit():
            continue
        values = _readings(m.group(1))
        if before and before in _MINUS and (start < 2 or not text[start - 2].isalnum()):
            values = {-v for v in values}
        found |= values
    return found


def _year(text: str) -> int:
    year = int(text)
    return year if len(text) == 4 else 2000 + year if year < 70 else 1900 + year


def _make(y: int, m: int, d: int) -> date | None:
    try:
        return date(y, m, d)
    except ValueError:
        return None


def _of_match(m: re.Match[str], order: str) -> set[date]:
    g = m.groups()
    if order == "ymd":
        found = [_make(int(g[0]), int(g[1]), int(g[2]))]
    elif order == "dmy":
        found = [_make(_year(g[2]), int(g[1]), int(g[0]))]
    elif order == "either":
        y = _year(g[2])
        found = [_make(y, int(g[1]), int(g[0])), _make(y, int(g[0]), int(g[1]))]
    elif order == "dMy":
        found = [_make(int(g[2]), _MONTH[g[1].lower()], int(g[0]))]
    else:  # Mdy
        found = [_make(int(g[2]), _MONTH[g[0].lower()], int(g[1]))]
    return {d for d in found if d is not None}


def dates_in(text: str) -> set[date]:
    """Every date `text` shows (both readings of a day-month order it does not settle)."""
    found: set[date] = set()
    for pattern, order in _DATES:
        for m in pattern.finditer(text):
            found |= _of_match(m, order)
    return found


def as_dates(value: Any) -> set[date]:
    """The dates a string names when the whole string is one date (else empty)."""
    if not isinstance(value, str):
        return set()
    text = value.strip()
    for pattern, order in _DATES:
        m = pattern.fullmatch(text)
        if m is not None:
            return _of_match(m, order)
    return set()


_TIME = re.compile(r"[T ](\d{1,2}):(\d{2})")


def time_of(value: str) -> tuple[int, int] | None:
    """(hour, minute) of a date-time string, None for a plain date."""
    m = _TIME.search(value)
    return (int(m.group(1)), int(m.group(2))) if m else None


def times_in(text: str) -> set[tuple[int, int]]:
    return {(int(h), int(mi)) for h, mi in re.findall(r"(?<!\d)(\d{1,2})[:.h](\d{2})(?!\d)", text)}
