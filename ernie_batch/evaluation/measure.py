"""One prompt version measured against the labels, from what the output folder holds.

The answer of a labelled page is the current answer of the unit that holds it (its newest
`ok` row of the version's fingerprint, matched by file content, so the path it was answered
under does not matter); of a labelled document, its newest `documents` row. Money and
invalid answers count every attempt of those units, earlier runs' included; latency is the
answering attempt's (`pages.latency_s`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ernie_batch import store
from ernie_batch.answers.merged_evidence import field_status, page_entries
from ernie_batch.evaluation.labels import Label, LabelSet
from ernie_batch.evaluation.score import Kind, Tolerances, correct, kind_of, overlap
from ernie_batch.location import OutputRoot
from ernie_batch.vocab import AttemptOutcome, UnitStatus

PAGE_COLUMNS = ["key", "source_sha256", "page", "page_last", "status", "answer_json",
                "latency_s", "finished_at", "run_id", "evidence_json"]


@dataclass
class FieldScore:
    """One field over the labels that name it; lists also count their items."""

    n: int = 0
    correct: int = 0
    is_list: bool = False
    matched: int = 0  # list items answered and labelled
    answered: int = 0  # list items answered
    labelled: int = 0  # list items labelled

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def precision(self) -> float | None:
        return self.matched / self.answered if self.is_list and self.answered else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.labelled if self.is_list and self.labelled else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": self.accuracy, "n": self.n}
        if self.is_list:
            out |= {"precision": self.precision, "recall": self.recall, "f1": self.f1}
        return out


@dataclass
class VersionScore:
    """What `eval` reports of one version (the CONTRACT's `--json` keys are `as_json`)."""

    config: str  # as given on the command line
    fingerprint: str
    run_id: str | None = None
    prompt_label: str | None = None
    fields: dict[str, FieldScore] = field(default_factory=dict)
    # labelled fields by their evidence status (answers with evidence only): how far
    # `verified` can be trusted
    by_evidence: dict[str, FieldScore] = field(default_factory=dict)
    units: int = 0  # units holding the labelled pages and documents
    pages: int = 0  # pages those units cover
    answers: int = 0  # their attempts that came back with an answer (valid or not)
    invalid: int = 0  # of them, answers that failed validation
    credits: float = 0.0
    usd: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(f.n for f in self.fields.values())

    @property
    def correct(self) -> int:
        return sum(f.correct for f in self.fields.values())

    @property
    def accuracy(self) -> float | None:
        """Micro-average over labelled (unit, field) pairs."""
        return self.correct / self.n if self.n else None

    @property
    def invalid_rate(self) -> float | None:
        return self.invalid / self.answers if self.answers else None

    @property
    def credits_per_page(self) -> float | None:
        return self.credits / self.pages if self.pages else None

    @property
    def usd_per_page(self) -> float | None:
        return self.usd / self.pages if self.pages else None

    @property
    def cost_per_correct_field(self) -> float | None:
        """Credits per correct field; null when none is correct."""
        return self.credits / self.correct if self.correct else None

    @property
    def latency_mean_s(self) -> float | None:
        return math.fsum(self.latencies) / len(self.latencies) if self.latencies else None

    @property
    def latency_p95_s(self) -> float | None:
        if not self.latencies:
            return None
        return float(np.percentile(self.latencies, 95, method="inverted_cdf"))  # nearest rank

    def as_json(self) -> dict[str, Any]:
        return {"config": self.config, "fingerprint": self.fingerprint,
                "accuracy": self.accuracy, "invalid_rate": self.invalid_rate,
                "credits_per_page": self.credits_per_page, "usd_per_page": self.usd_per_page,
                "cost_per_correct_field": self.cost_per_correct_field,
                "latency_mean_s": self.latency_mean_s, "latency_p95_s": self.latency_p95_s,
                "fields": {name: f.as_json() for name, f in self.fields.items()},
                "by_evidence": {status: {"accuracy": f.accuracy, "n": f.n}
                                for status, f in self.by_evidence.items()}}


def measure(root: OutputRoot, fingerprint: str, schema: Mapping[str, Any], tol: Tolerances,
            labels: LabelSet, config: str) -> VersionScore:
    """Score one version (its fingerprint) on `labels` from the Parquet under `root`."""
    score = VersionScore(config=config, fingerprint=fingerprint)
    shas = sorted({label.sha256 for label in labels.labels})
    units = _current_units(root, fingerprint, shas)
    documents = _current_documents(root, fingerprint, shas)
    props = schema.get("properties") or {}
    used: dict[str, dict[str, Any]] = {}  # key -> row of the units that answer the labels
    for label in labels.labels:
        if label.page is None:
            doc_units = [u for u in units.values() if u["source_sha256"] == label.sha256]
            used |= {u["key"]: u for u in doc_units}
            answer, evidence = documents.get(label.sha256, (None, None))
        else:
            unit = _unit_of(units, label)
            if unit is not None:
                used[unit["key"]] = unit
            ok = unit is not None and unit["status"] == UnitStatus.OK
            answer = unit["answer_json"] if ok else None
            evidence = unit["evidence_json"] if ok else None
        _score_fields(score, label, json.loads(answer) if answer else None, props, tol,
                      page_entries(evidence))
    _count_cost(score, root, used)
    return score


def _score_fields(score: VersionScore, label: Label, answer: dict[str, Any] | None,
                  props: Mapping[str, Any], tol: Tolerances,
                  evidence: dict[str, dict[str, Any]] | None = None) -> None:
    """A label's fields against an answer; no answer (invalid, failed, not sent): all wrong."""
    for name, expected in label.fields.items():
        sub = props.get(name) if isinstance(props.get(name), dict) else {}
        f = score.fields.setdefault(name, FieldScore())
        f.n += 1
        got = answer.get(name) if isinstance(answer, dict) else None
        right = answer is not None and correct(expected, got, sub, name, tol)
        f.correct += right
        if answer is not None and evidence is not None:
            by = score.by_evidence.setdefault(field_status(evidence, name), FieldScore())
            by.n += 1
            by.correct += right
        if kind_of(sub, expected) == Kind.LIST:
            f.is_list = True
            matched, answered, labelled = overlap(expected, got, sub, name, tol)
            f.matched += matched
            f.answered += answered
            f.labelled += labelled


def _current_units(root: OutputRoot, fingerprint: str, shas: list[str]) -> dict[str, dict[str, Any]]:
    """key -> the unit's current row: its newest ok row, else its newest row (no duplicates)."""
    where = (pc.field("fingerprint") == fingerprint) & pc.field("source_sha256").isin(shas)
    table = store.read_columns(root, "pages", PAGE_COLUMNS, where)
    rows = [] if table is None else table.to_pylist()
    rows.sort(key=lambda r: (r["status"] == UnitStatus.OK, r["finished_at"], r["run_id"]))
    return {r["key"]: r for r in rows if r["status"] != UnitStatus.DUPLICATE}


def _current_documents(root: OutputRoot, fingerprint: str, shas: list[str]
                       ) -> dict[str, tuple[str | None, str | None]]:
    """source_sha256 -> (the merged answer, its evidence) of its newest documents row."""
    where = (pc.field("fingerprint") == fingerprint) & pc.field("source_sha256").isin(shas)
    table = store.read_columns(root, "documents", ["key", "source_sha256", "answer_json",
                                                   "built_at", "run_id", "evidence_json"], where)
    if table is None or table.num_rows == 0:
        return {}
    return {r["source_sha256"]: (r["answer_json"], r["evidence_json"])
            for r in store.newest_per_key(table).to_pylist()}


def _unit_of(units: dict[str, dict[str, Any]], label: Label) -> dict[str, Any] | None:
    assert label.page is not None
    return next((u for u in units.values() if u["source_sha256"] == label.sha256
                 and u["page"] <= label.page <= u["page_last"]), None)


def _count_cost(score: VersionScore, root: OutputRoot, used: dict[str, dict[str, Any]]) -> None:
    score.units = len(used)
    score.pages = sum(u["page_last"] - u["page"] + 1 for u in used.values())
    score.latencies = [u["latency_s"] for u in used.values()
                       if u["status"] == UnitStatus.OK and u["latency_s"] is not None]
    if not used:
        return
    table = store.read_columns(root, "attempts", ["key", "outcome", "credits", "usd"],
                               pc.field("key").isin(sorted(used)))
    if table is None:
        return
    outcomes = table["outcome"].to_pylist()
    score.answers = sum(o in (AttemptOutcome.OK, AttemptOutcome.INVALID_ANSWER) for o in outcomes)
    score.invalid = outcomes.count(AttemptOutcome.INVALID_ANSWER)
    score.credits = store.sum_exact(table["credits"].to_pylist())
    score.usd = store.sum_exact(table["usd"].to_pylist())
