"""From what happened to a unit (a prepared failure, a duplicate, its HTTP calls) to its typed rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from ernie_batch.answers.judge import Verdict, answer_columns
from ernie_batch.answers.prompt import unit_key
from ernie_batch.answers.verify import FieldEvidence, counts, to_json
from ernie_batch.api.client import CallResult
from ernie_batch.intake.units import Document, PageUnit
from ernie_batch.store import AttemptRow, PageRow, sum_exact
from ernie_batch.vocab import AttemptOutcome, UnitStatus


@dataclass(frozen=True, slots=True)
class RowMaker:
    """What every row of one run shares: run id, fingerprint, model, the answer columns."""

    run_id: str
    fingerprint: str
    model: str
    answer_fields: list[pa.Field]
    prep_fingerprint: str | None = None

    def unit_row(self, doc: Document, page: int, last: int, page_count: int | None,
                 status: UnitStatus, error: str | None) -> PageRow:
        """A row with no request behind it: a failure found in preparation, or a duplicate."""
        now = datetime.now(UTC)
        return PageRow(
            run_id=self.run_id, key=unit_key(doc.sha256, page, last, self.fingerprint),
            fingerprint=self.fingerprint, prep_fingerprint=self.prep_fingerprint,
            source_path=str(doc.path), source_sha256=doc.sha256, source_etag=doc.etag,
            doc_type=doc.doc_type, page=page, page_last=last, page_count=page_count,
            status=status, error=error, model=self.model, started_at=now, finished_at=now,
            answers=answer_columns(None, self.answer_fields),
        )

    def answered_row(self, unit: PageUnit, content_sha: str, status: UnitStatus,
                     error: str | None, verdict: Verdict | None, last: CallResult | None,
                     attempts: list[AttemptRow], started: datetime, elapsed: float,
                     evidence: dict[str, FieldEvidence] | None = None,
                     prompt_tokens_est: int | None = None) -> PageRow:
        """The row of a unit that was sent: its final answer (if ok) and the sums of its attempts.

        `latency_s` is the last (answering) attempt's, request to response; `queued_s` the rest
        of the `elapsed` seconds since the unit was picked up (budget waits, backoff, retries).
        """
        row = self.unit_row(unit.doc, unit.page, unit.page_last, unit.page_count, status, error)
        value = verdict.value if (verdict and status == UnitStatus.OK) else None
        row.content_sha256 = content_sha
        if value is not None:
            row.answer_json = json.dumps(value, ensure_ascii=False)
            row.answers = answer_columns(value, self.answer_fields)
        if value is not None and evidence is not None:
            row.evidence_json = to_json(evidence)
            row.fields_verified, row.fields_checked = counts(evidence)
        row.raw_answer = last.content if last else None
        row.response_id = last.response_id if last else None
        row.attempts = len(attempts)
        row.prompt_tokens = sum(a.prompt_tokens or 0 for a in attempts)
        row.prompt_tokens_est = prompt_tokens_est
        row.completion_tokens = sum(a.completion_tokens or 0 for a in attempts)
        row.credits = sum_exact(a.credits for a in attempts)
        row.usd = sum_exact(a.usd for a in attempts)
        row.latency_s = last.latency_s if last else None
        row.queued_s = max(0.0, elapsed - (row.latency_s or 0.0))
        row.started_at = started
        return row

    def attempt_row(self, key: str, n: int, res: CallResult, temperature: float,
                    verdict: Verdict | None, client_request_id: str | None = None) -> AttemptRow:
        outcome = res.outcome
        if verdict is not None and verdict.value is None:
            outcome = AttemptOutcome.INVALID_ANSWER
        return AttemptRow(
            run_id=self.run_id, key=key, attempt=n, status_code=res.status_code,
            outcome=outcome, error=res.error, response_id=res.response_id,
            prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
            credits=res.credits, usd=res.usd, temperature=temperature, latency_s=res.latency_s,
            started_at=res.started_at, client_request_id=client_request_id,
            inference_id=res.inference_id, credits_source=res.credits_source,
            cost_mismatch=res.cost_mismatch,
        )
