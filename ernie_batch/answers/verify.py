"""Evidence, the checking side: each field's quote located in the page's own text layer, then the
field's value looked for in the page text it matched. Local, deterministic, pure.

Page text and quotes are normalised alike before a quote is located: Unicode NFKC
(ligatures, full-width forms), typographic quotes and dashes folded, whitespace collapsed,
a word hyphenated at a line end joined again (pdfium's own marks, and `-` before a line break
and a lower-case letter), case folded. The matched span is widened to whole tokens (a quote
`24.5` inside `124.50` stands for `124.50`). The value is then looked for in that span of the
PAGE's text, never in the quote: numbers and dates as values (`values`), strings as
normalised text at word boundaries (case kept for `"x-evidence": "case-sensitive"` fields).

A quote not found exactly may be located fuzzily (rapidfuzz's best partial alignment, score
at least `FUZZY_THRESHOLD`, quotes of `FUZZY_MIN_CHARS` or more): a quote with a misread
character still finds its line. That only locates: the value must still stand in the page's
text of that line. The threshold is measured by `ernie-batch bench evidence` (README).

A page is no text layer when it has no letter or digit, or when more than `GARBAGE_SHARE` of
its characters are unmappable (pdfium's Unicode map errors, U+FFFD), control or private-use
characters: a font without a ToUnicode map reads as such garbage.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ernie_batch.answers.evidence import Leaf, leaves
from ernie_batch.answers.values import (
    as_dates,
    as_decimal,
    dates_in,
    numbers_in,
    time_of,
    times_in,
)
from ernie_batch.intake.text import PageText, union_box
from ernie_batch.vocab import EvidenceStatus

FUZZY_THRESHOLD = 90.0  # rapidfuzz partial_ratio, 0-100
FUZZY_MIN_CHARS = 12
GARBAGE_SHARE = 0.10
MAX_SPANS = 16  # occurrences of one quote tried for the value

_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                       "\u2032": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
                       "\u201f": '"', "\u2033": '"', "\u2010": "-", "\u2011": "-",
                       "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-"})
_MARKS = frozenset("\ufffe\x02\u00ad")  # hyphens pdfium (or the font) marks at line ends
_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class FieldEvidence:
    """One field's evidence (CONTRACT: `pages.evidence_json`, FIELD_PATH -> this)."""

    status: EvidenceStatus
    quote: str | None = None
    span: str | None = None  # the page text the quote matched
    box: tuple[float, float, float, float] | None = None  # 0-1 of the displayed page
    page: int | None = None  # the page of the document the span is on

    def as_json(self) -> dict[str, Any]:
        return {"quote": self.quote, "span": self.span, "status": str(self.status),
                "box": list(self.box) if self.box else None, "page": self.page}


@dataclass(frozen=True, slots=True)
class Normalised:
    """Text as matched: `folded` (case folded) and `cased` share positions; `origin` maps each
    position to the character of the page text it came from."""

    folded: str
    cased: str
    origin: list[int]


def normalise(text: str) -> Normalised:
    pieces: list[str] = []
    origin: list[int] = []
    words = list(_WORD.finditer(text))
    hyphens = "-\n" in text or "-\r" in text
    for n, m in enumerate(words):
        word, start = m.group(), m.start()
        if hyphens and _hyphenated(text, words, n):  # `docu-` at a line end, `ment` on the next: joined
            pieces[-1] = pieces[-1][:-1]
            origin.pop()
        elif pieces:
            pieces.append(" ")
            origin.append(start - 1)
        if word.isascii() and not _MARKS.intersection(word):
            pieces.append(word)
            origin.extend(range(start, start + len(word)))
            continue
        for j, ch in enumerate(word):
            if ch in _MARKS:
                continue
            norm = unicodedata.normalize("NFKC", ch).translate(_FOLD)
            pieces.append(norm)
            origin.extend([start + j] * len(norm))
    cased = "".join(pieces)
    folded = cased.lower()
    if len(folded) != len(cased):  # a few letters lower to two (İ): keep those as they are
        folded = "".join(c.lower() if len(c.lower()) == 1 else c for c in cased)
    return Normalised(folded, cased, origin)


def _hyphenated(text: str, words: list[re.Match[str]], n: int) -> bool:
    """A word continues the one before: that one ends in `-` at a line end, this one starts
    with a lower-case letter."""
    if n == 0:
        return False
    prev, word = words[n - 1].group(), words[n].group()
    gap = text[words[n - 1].end():words[n].start()]
    return (len(prev) > 1 and prev.endswith("-") and prev[-2].isalpha()
            and ("\n" in gap or "\r" in gap) and word[0].islower())


def fold(text: str) -> str:
    """`normalise(text).folded`, without positions (quotes, values): ASCII takes a short cut."""
    if text.isascii() and "-\n" not in text and "-\r" not in text and "\x02" not in text:
        return " ".join(text.split()).lower()
    return normalise(text).folded


_GOOD = re.compile(r"[^\W_]")
_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff\U000f0000-\U0010ffff]")


def usable(page: PageText) -> bool:
    """Whether a page's text layer can be verified against (see the module docstring)."""
    good = len(_GOOD.findall(page.text))
    bad = len(_BAD.findall(page.text))
    return good > 0 and bad <= GARBAGE_SHARE * (good + bad)


class _Page:
    """A page prepared for locating quotes: its normalised text, once per unit."""

    def __init__(self, page: PageText) -> None:
        self.page = page
        self.norm = normalise(page.text)
        self._coords: list[float] | None = None

    def spans(self, needle: str) -> list[tuple[int, int]]:
        hay = self.norm.folded
        out = []
        i = hay.find(needle)
        while i >= 0 and len(out) < MAX_SPANS:
            out.append(_widen(hay, i, i + len(needle)))
            i = hay.find(needle, i + 1)
        if not out and len(needle) >= FUZZY_MIN_CHARS:
            from rapidfuzz import fuzz

            hit = fuzz.partial_ratio_alignment(needle, hay, score_cutoff=FUZZY_THRESHOLD)
            if hit is not None:
                s, e = hit.dest_start, hit.dest_end
                while s < e and hay[s] == " ":  # the window's edges may take a space in
                    s += 1
                while e > s and hay[e - 1] == " ":
                    e -= 1
                if e > s:
                    out.append(_widen(hay, s, e))
        return out

    def text(self, span: tuple[int, int], cased: bool) -> str:
        s, e = span
        return (self.norm.cased if cased else self.norm.folded)[s:e]

    def box(self, span: tuple[int, int]) -> tuple[float, float, float, float] | None:
        origin = self.norm.origin
        if self._coords is None:
            self._coords = self.page.coords()
        return union_box(self._coords, self.page.matrix, origin[span[0]], origin[span[1] - 1] + 1)

    def original(self, span: tuple[int, int]) -> str:
        return " ".join(self.norm.cased[span[0]:span[1]].split())


def _glue(text: str, i: int, left: int, right: int) -> bool:
    """Whether text[i] belongs to the token around it (letters, digits, separators inside
    numbers, dates and ids)."""
    ch = text[i]
    if ch.isalnum():
        return True
    inside = 0 <= left < len(text) and 0 <= right < len(text)
    return inside and ch in ".,'/-" and text[left].isdigit() and text[right].isdigit()


def _widen(text: str, s: int, e: int) -> tuple[int, int]:
    while s > 0 and _glue(text, s - 1, s - 2, s):
        s -= 1
    while e < len(text) and _glue(text, e, e - 1, e + 1):
        e += 1
    return s, e


def _string_in(needle: str, hay: str) -> bool:
    """`needle` stands in `hay` as whole words."""
    if not needle:
        return False
    i = hay.find(needle)
    while i >= 0:
        before = hay[i - 1] if i else " "
        after = hay[i + len(needle)] if i + len(needle) < len(hay) else " "
        if not (needle[0].isalnum() and before.isalnum()) and not (
                needle[-1].isalnum() and after.isalnum()):
            return True
        i = hay.find(needle, i + 1)
    return False


def value_in(leaf: Leaf, span_cased: str, span_folded: str) -> bool:
    """Whether the leaf's value stands in this (normalised) page text: numbers and dates as
    values, strings as words."""
    value = leaf.value
    number = as_decimal(value)
    if number is not None:
        return number in numbers_in(span_cased)
    days = as_dates(value)
    if days:
        if not days & dates_in(span_cased):
            return False
        when = time_of(value)
        return when is None or when in times_in(span_cased)
    if not isinstance(value, str):
        return False
    if leaf.mode == "case-sensitive":
        return _string_in(normalise(value).cased, span_cased)
    return _string_in(fold(value), span_folded)


def verify(answer: Mapping[str, Any], quotes: Mapping[str, str | None] | None,
           schema: Mapping[str, Any], pages: Sequence[PageText] | None) -> dict[str, FieldEvidence]:
    """Every leaf of the answer, by path, with its evidence and status."""
    quotes = quotes or {}
    readable = [_Page(p) for p in pages or () if usable(p)]
    out: dict[str, FieldEvidence] = {}
    for leaf in leaves(answer, schema):
        quote = quotes.get(leaf.path)
        out[leaf.path] = _check(leaf, quote, readable, pages is not None and bool(readable))
    return out


def _check(leaf: Leaf, quote: str | None, pages: list[_Page], has_text: bool) -> FieldEvidence:
    if leaf.mode is None:
        return FieldEvidence(EvidenceStatus.NOT_CHECKED, quote)
    if not has_text:
        return FieldEvidence(EvidenceStatus.NO_TEXT_LAYER, quote)
    needle = fold(quote) if quote else ""
    if not needle:
        return FieldEvidence(EvidenceStatus.NO_QUOTE, quote)
    first: tuple[_Page, tuple[int, int]] | None = None
    for page in pages:
        for span in page.spans(needle):
            first = first or (page, span)
            if value_in(leaf, page.text(span, cased=True), page.text(span, cased=False)):
                return FieldEvidence(EvidenceStatus.VERIFIED, quote, page.original(span),
                                     page.box(span), page.page.page)
    if first is None:
        return FieldEvidence(EvidenceStatus.QUOTE_NOT_ON_PAGE, quote)
    page, span = first
    return FieldEvidence(EvidenceStatus.VALUE_NOT_IN_QUOTE, quote, page.original(span),
                         None, page.page.page)


def counts(evidence: Mapping[str, FieldEvidence]) -> tuple[int, int]:
    """(fields verified, fields checked): `not_checked` fields count in neither."""
    statuses = [e.status for e in evidence.values()]
    return (statuses.count(EvidenceStatus.VERIFIED),
            sum(s != EvidenceStatus.NOT_CHECKED for s in statuses))


def to_json(evidence: Mapping[str, FieldEvidence]) -> str:
    return json.dumps({k: v.as_json() for k, v in evidence.items()}, ensure_ascii=False,
                      separators=(",", ":"))
