"""The simulator's evidence: answers with a quote per field, read from the PDF it receives.

A request asks for evidence with the wrapper schema (`json_schema` mode: properties `answer`
and `evidence`) or, in the text modes, in words (`{"answer": ...` in its prompt). For a PDF
the simulator reads each page's text layer (pypdf) and quotes the line where a value
stands (its own plain search, independent of the pipeline's verification); for an image,
which it cannot read, it copies the value as text, as a model transcribing it would.

Unscripted pages are read from the page: string fields take a line of it, numbers a number
on it, date fields a date on it (`read_page`). Scripted pages (the truth of labels) go
through the version's seeded misreads (`misreads`); a misread value then gets, as a real
model's would, either the true line as its quote (only the value is wrong) or that line with
the misread value written into it (a quote that is not on the page), each half the time
(drawn from the seed, the media digest and the field path).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ernie_batch.intake.content import iter_media
from ernie_batch.sim.answers import generate_value
from ernie_batch.sim.misreads import Rates, draw, misread
from ernie_batch.sim.validation import Checked

QUOTE_FOLLOWS = 0.5  # a misread value written into its quote, this share of the time
# a number standing alone (not part of a date, an id like 2026-0117, or a range like 1-12)
_NUMBER = re.compile(r"(?<![\w.,/-])\d(?:[\d.,]*\d)?(?![\w/-]|[.,]\d)")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}")
# how pages write a date besides ISO (the simulator's own short list)
_DATE_STYLES = ("%d.%m.%Y", "%d %b %Y", "%d %B %Y", "%B %d, %Y", "%b %d, %Y", "%d/%m/%Y")


def wants_evidence(checked: Checked) -> bool:
    props = checked.schema.get("properties")
    if isinstance(props, dict) and set(props) == {"answer", "evidence"}:
        return True
    return any('{"answer"' in text and '"evidence"' in text for text in _texts(checked))


def _texts(checked: Checked) -> Iterator[str]:
    for msg in checked.messages:
        content = msg.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p.get("text", "") for p in content if isinstance(p, dict))


def answer_schema(checked: Checked) -> dict[str, Any]:
    props = checked.schema.get("properties") or {}
    inner = props.get("answer") if set(props) == {"answer", "evidence"} else None
    return inner if isinstance(inner, dict) else checked.schema


def _asked_paths(checked: Checked) -> set[str] | None:
    """The paths a strict evidence schema names (None: any path may be quoted)."""
    ev = (checked.schema.get("properties") or {}).get("evidence")
    if isinstance(ev, dict) and ev.get("additionalProperties") is False:
        return set(ev.get("properties") or {})
    return None


def page_lines(checked: Checked) -> list[str] | None:
    """The text lines of every PDF page the request carries; None when it carries no PDF.

    Read with pypdf, not pdfium: the pipeline verifies with pdfium, and pdfium is not
    thread-safe (a simulator serving from a thread beside a run preparing pages inline).
    """
    import io

    import pypdf

    lines: list[str] | None = None
    for mime, data in iter_media(checked.messages):
        if mime != "application/pdf":
            continue
        lines = lines or []
        try:
            for page in pypdf.PdfReader(io.BytesIO(data)).pages:
                lines += [ln for ln in page.extract_text().splitlines() if ln.strip()]
        except Exception:  # noqa: BLE001 - a page it cannot read is quoted from nothing
            continue
    return lines


def _number(token: str) -> float:
    """A number token's value: one kind of separator before three digits groups thousands
    (`1,234`), else it is the decimal point; with both kinds the last is (`1.234,50`). NaN
    when it is no number (`1.2.3`)."""
    seps = re.findall(r"[.,]", token)
    groups = re.split(r"[.,]", token)
    grouped = all(len(g) == 3 for g in groups[1:])
    if not seps:
        return float(token)
    if len(set(seps)) == 1:
        if len(seps) > 1 or len(groups[-1]) == 3:
            return float("".join(groups)) if grouped else float("nan")
        return float(f"{groups[0]}.{groups[1]}")
    if seps[-1] in seps[:-1] or not all(len(g) == 3 for g in groups[1:-1]):
        return float("nan")
    return float("".join(groups[:-1]) + "." + groups[-1])


def _renderings(value: Any) -> list[str]:
    """How a page may write a value: a date in the usual styles, anything else as itself."""
    text = str(value)
    if isinstance(value, str) and _ISO.fullmatch(value):
        day = datetime.strptime(value, "%Y-%m-%d")
        styles = [day.strftime(f) for f in _DATE_STYLES]
        return [text, *styles, *(s.lstrip("0") for s in styles if s.startswith("0"))]
    return [text]


def find(value: Any, lines: list[str]) -> tuple[str, str] | None:
    """(the line, the text in it) where a value stands, None when it is on no line."""
    if isinstance(value, bool) or value is None or value == "":
        return None
    for line in lines:
        hit = None
        if isinstance(value, int | float):
            hit = next((m.group() for m in _NUMBER.finditer(line)
                        if abs(_number(m.group()) - value) < 1e-9), None)
        else:
            for text in _renderings(value):
                at = line.lower().find(text.lower())
                if at >= 0:
                    hit = line[at:at + len(text)]
                    break
        if hit is not None:
            return line.strip(), hit
    return None


def _render_like(value: Any, token: str) -> str:
    """A misread value written as the page writes the true one (`99.66` -> `96.66`)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and re.search(
            r"[.,]\d+$", token):
        decimals = len(re.split(r"[.,]", token)[-1])
        return f"{value:.{decimals}f}"
    return str(value)


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def read_page(schema: dict[str, Any], digest: str, lines: list[str]) -> Any:
    """A generated answer whose strings, numbers and dates are taken from the page's lines."""
    value = generate_value(schema, digest)
    numbers = [m.group() for ln in lines for m in _NUMBER.finditer(ln)]
    dates = [d for ln in lines for d in _ISO.findall(ln)]

    def pick(options: list[str], path: str) -> str | None:
        return options[int(draw(0, digest, path, "read") * len(options))] if options else None

    def fill(node: Any, sub: Any, path: str) -> Any:
        sub = sub if isinstance(sub, dict) else {}
        if isinstance(node, dict):
            props = sub.get("properties") or {}
            return {k: fill(v, props.get(k), f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v, sub.get("items"), f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, bool) or "enum" in sub or "const" in sub or node is None:
            return node
        if isinstance(node, int | float):
            token = pick(numbers, path)
            return node if token is None else (
                round(_number(token)) if isinstance(node, int) else _number(token))
        if isinstance(node, str) and "maxLength" not in sub:
            return pick(dates if "date" in path.lower() else lines, path) or node
        return node

    return fill(value, schema, "")


def answer_with_evidence(checked: Checked, truth: Any, rates: Rates, seed: int) -> dict[str, Any]:
    """`{"answer", "evidence"}` for one request: the truth (scripted) or the page as read,
    misread at the version's rates, each value quoted as described above."""
    schema = answer_schema(checked)
    lines = page_lines(checked)
    if truth is not None:
        base = truth
    elif lines:
        base = read_page(schema, checked.digest, lines)
    else:
        base = generate_value(schema, checked.digest)
    answer = misread(base, checked, rates, seed, schema) if rates else base
    truths = dict(leaves(base))
    asked = _asked_paths(checked)
    evidence: dict[str, str | None] = {}
    for path, value in leaves(answer):
        if not path or (asked is not None and path not in asked):
            continue
        true = truths.get(path)
        found = find(true, lines) if lines is not None else None
        if path in truths and value == true:
            quote = found[0] if found else None if lines is not None else _text(value)
        elif found is None:
            quote = _text(value)  # a value with no line behind it: made up, quoted as such
        elif draw(seed, checked.digest, path, "quote") < QUOTE_FOLLOWS:
            quote = found[0].replace(found[1], _render_like(value, found[1]), 1)
        else:
            quote = found[0]
        evidence[path] = quote
    return {"answer": answer, "evidence": evidence}


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    return str(value)
