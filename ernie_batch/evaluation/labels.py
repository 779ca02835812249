"""The labels file of `eval`: one JSON object a line naming a unit (file and page, or the
whole document) and the field values a correct answer holds.

    {"path": "samples/invoice.pdf", "page": 1, "fields": {"title": "INVOICE 7", "total_amount": 12.5}}

Paths are relative to the labels file; `"page": null` labels the document (its merged
answer in the `documents` table). Every problem is a `LabelsError` naming file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ernie_batch.errors import LabelsError
from ernie_batch.intake.discover import sha256_file


@dataclass(frozen=True)
class Label:
    """What one line of the labels file says; `sha256` is the file's content when read."""

    path: Path  # resolved
    page: int | None  # None: the whole document
    fields: dict[str, Any]
    line: int
    sha256: str


@dataclass(frozen=True)
class LabelSet:
    source: Path
    labels: tuple[Label, ...]

    @property
    def files(self) -> list[Path]:
        return sorted({label.path for label in self.labels})

    def selection(self) -> dict[str, set[int] | None]:
        """Path -> the labelled pages (None: the whole document is labelled): the run's subset."""
        chosen: dict[str, set[int] | None] = {}
        for label in self.labels:
            key = str(label.path)
            if label.page is None or (key in chosen and chosen[key] is None):
                chosen[key] = None
            else:
                chosen.setdefault(key, set()).add(label.page)  # type: ignore[union-attr]
        return chosen


def read_labels(path: Path) -> LabelSet:
    """Read and check a labels file: valid JSON lines, files that exist, no unit twice."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise LabelsError(f"{path}: cannot read the labels: {reason}") from None
    base = path.resolve().parent
    labels: list[Label] = []
    seen: dict[tuple[Path, int | None], int] = {}
    hashes: dict[Path, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label = _parse(line, f"{path}:{n}", base, n, hashes)
        unit = (label.path, label.page)
        if unit in seen:
            raise LabelsError(f"{path}:{n}: {label.path.name} page {label.page} is labelled "
                              f"again (first on line {seen[unit]})")
        seen[unit] = n
        labels.append(label)
    if not labels:
        raise LabelsError(f"{path}: no labels (one JSON object a line)")
    return LabelSet(path.resolve(), tuple(labels))


def _parse(line: str, where: str, base: Path, n: int, hashes: dict[Path, str]) -> Label:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise LabelsError(f"{where}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LabelsError(f"{where}: a label is a JSON object with path, page and fields")
    unknown = sorted(set(obj) - {"path", "page", "fields"})
    if unknown:
        raise LabelsError(f"{where}: unknown key {unknown[0]!r} (a label has path, page, fields)")
    raw, page, fields = obj.get("path"), obj.get("page"), obj.get("fields")
    if not isinstance(raw, str) or not raw:
        raise LabelsError(f"{where}: path: a file path relative to the labels file")
    if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
        raise LabelsError(f"{where}: page: a page number from 1, or null for the whole document")
    if not isinstance(fields, dict) or not fields:
        raise LabelsError(f"{where}: fields: an object of field names and their correct values")
    resolved = (base / Path(raw).expanduser()).resolve()
    if not resolved.is_file():
        raise LabelsError(f"{where}: path: {raw} is not a file ({resolved})")
    if resolved not in hashes:
        hashes[resolved] = sha256_file(resolved)
    return Label(resolved, page, fields, n, hashes[resolved])
