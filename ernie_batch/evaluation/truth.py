"""The simulator's truth for labelled samples: what a perfect reader answers for each unit's
media, built from the labels and the prepare stage at test or demo time.

Keyed by `content_sha256`, the digest of the media a request carries (what
`SimSettings.scripted` maps), so nothing ships as media hashes: those change with Pillow and
pikepdf versions. Each labelled page's answer holds its labelled values; the schema's other
fields are generated. Documents' labels add nothing: their answers are merged from pages.
"""

from __future__ import annotations

from typing import Any

from ernie_batch.config import JobConfig, SourceOptions
from ernie_batch.evaluation.labels import LabelSet
from ernie_batch.intake.content import parts_sha256
from ernie_batch.intake.discover import discover
from ernie_batch.intake.prepare import prepare_document
from ernie_batch.intake.units import PageUnit
from ernie_batch.sim.answers import generate_value


def truth_map(labels: LabelSet, cfg: JobConfig) -> dict[str, Any]:
    """content_sha256 -> the true answer of every labelled page, prepared as `cfg` prepares it."""
    schema = cfg.resolved.sent_schema
    docs, _ = discover(SourceOptions(paths=labels.files))
    truth: dict[str, Any] = {}
    for doc in docs:
        pages = [lb for lb in labels.labels if lb.page is not None and lb.sha256 == doc.sha256]
        if not pages:
            continue
        for unit in prepare_document(doc, cfg.images, cfg.pdf):
            if not isinstance(unit, PageUnit):
                continue
            digest = parts_sha256(unit.parts)
            fields = {k: v for lb in pages if unit.page <= lb.page <= unit.page_last  # type: ignore[operator]
                      for k, v in lb.fields.items()}
            if fields:
                truth[digest] = {**generate_value(schema, digest), **fields}
    return truth
